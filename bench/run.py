"""Run the benchmark families on the devices present: tables, JSON and plots in one command.

    python bench/run.py [--device cpu|cuda|all] [--families sparse,cpu,xl,table2] [--quick]

Families and the devices they run on:

    sparse   bench/sparse_attention.py   Triton block-sparse kernels vs SDPA, FlexAttention,
                                         the masked reference                       (cuda)
    cpu      bench/cpu_attention.py      C++ CPU kernels vs SDPA, FlexAttention      (cpu)
    xl       bench/xl_attention.py       Transformer-XL kernel vs the original
                                         formulation; the paper's evaluation table   (cpu, cuda)
    table2   bench/paper_table2.py       the Sparse Transformer paper's Table 2      (cpu, cuda)

``--device all`` (the default) means the CPU and, when present, the GPU; a GPU family or
``--device cuda`` without CUDA is skipped with a message. Each family prints its progress
(case and elapsed time), then its table; its JSON (standard header of bench/common.py) goes to
bench/results/<family>_<device>[_quick].json and its plots beside it as PNG (--quick outputs
are git-ignored). ``python bench/report.py --write-readme`` then puts the latest results into
the README.

A family whose effattn backend cannot run here (bench/common.py: the C++ CPU kernels not built,
no Triton on the GPU) is refused with the reason; the others still run, and the exit status
is 1.

A full CPU run takes about 15 minutes on two quiet cores (FlexAttention's compilation, SDPA with
dense masks up to n = 16384, and the vanilla side of the XL evaluation table dominate);
``--quick`` takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import cpu_attention  # noqa: E402
import paper_table2  # noqa: E402
import report  # noqa: E402
import xl_attention  # noqa: E402

FAMILIES = {
    "sparse": ("sparse_attention", ("cuda",)),
    "cpu": ("cpu_attention", ("cpu",)),
    "xl": ("xl_attention", ("cpu", "cuda")),
    "table2": ("paper_table2", ("cpu", "cuda")),
}


def run_sparse(device: str, quick: bool, progress: common.Progress) -> dict:
    """bench/sparse_attention.py through its CLI entry point, its JSON given the standard
    header (that script is maintained separately and writes {"meta", "rows"})."""
    import sparse_attention

    common.require_backend("sparse_attention", device, "triton")
    info = common.machine(device)
    argv = ["--quick"] if quick else []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sparse.json"
        progress(f"{info['name']}: python bench/sparse_attention.py {' '.join(argv)}")
        rc = sparse_attention.main(argv + ["--out", str(out)])
        if rc:
            raise RuntimeError(f"bench/sparse_attention.py exited with {rc}")
        raw = json.loads(out.read_text())
    return common.payload(
        "sparse_attention", device, info, {"argv": argv, "quick": quick}, raw["rows"],
        meta=raw.get("meta"), quick=quick,
    )  # fmt: skip


def run_family(name: str, device: str, quick: bool, progress: common.Progress) -> dict:
    """One family's run on one device; returns its result document."""
    if name == "sparse":
        return run_sparse(device, quick, progress)
    if name == "cpu":
        return cpu_attention.run(quick=quick, progress=progress)
    if name == "xl":
        return xl_attention.run(device, quick, progress=progress)
    if name == "table2":
        return paper_table2.run(device, quick, progress=progress)
    raise ValueError(name)


def plan(devices: list[str], families: list[str]) -> list[tuple[str, str]]:
    """(family, device) pairs to run, printing why the others are skipped."""
    todo = []
    for device in devices:
        for name in families:
            if device not in FAMILIES[name][1]:
                if device == "cpu" and "cuda" in devices:
                    continue  # it runs on the GPU instead: nothing to report
                print(f"skip {name} on {device}: it runs on {', '.join(FAMILIES[name][1])}")
                continue
            todo.append((name, device))
    return todo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument(
        "--families",
        default=",".join(FAMILIES),
        help=f"comma-separated subset of {','.join(FAMILIES)} (default: all)",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (minutes)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = ap.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")

    cuda = torch.cuda.is_available()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not cuda:
        print("no CUDA device here: skipping the GPU runs (sparse; xl and table2 on cuda)")
        devices.remove("cuda")
    todo = plan(devices, families)
    total = common.Progress("run")
    total(f"{len(todo)} runs: {', '.join(f'{n}/{d}' for n, d in todo) or 'nothing to do'}")
    written, refused = [], []
    for i, (name, device) in enumerate(todo, 1):
        family = FAMILIES[name][0]
        total(f"({i}/{len(todo)}) {family} on {device}{' --quick' if args.quick else ''}")
        try:
            doc = run_family(name, device, args.quick, common.Progress(f"{family}/{device}"))
        except common.BackendMissing as e:
            total(f"refused {family} on {device}: {e}")
            refused.append(f"{family}/{device}")
            continue
        path = common.write_json(doc, common.result_path(family, device, args.quick))
        written.append(path)
        print(f"\n{report.TITLES[family][0]} ({doc['machine']['name']})\n")
        print(report.render_doc(doc) + "\n")
        if not args.no_plots:
            written += report.plot_doc(doc, path.with_suffix(""))
        total(f"{family} on {device} done")
    for path in written:
        print(
            f"wrote {path.relative_to(common.ROOT) if path.is_relative_to(common.ROOT) else path}"
        )
    if refused:
        print(f"refused (their effattn backend cannot run here): {', '.join(refused)}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())

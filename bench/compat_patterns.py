"""CPU benchmark of issue 17's patterns: column / axial / per-head strided and DeepSpeed's
sparsity configs, each against the built-in pattern it is measured by.

At n = 4096, H = 8, D = 64, B = 1, fp32, effattn's C++ CPU backend, forward ("fwd") and
forward + backward ("fwd+bwd"). Cases run round-robin (one call of each per round, after a
warm-up round) so that other processes' load falls on all of them alike; reported per case:
median and min wall time, median process CPU time, and the planned work efficiency (useful /
computed entries at 64 x 64 blocks). Ratios are medians of the same run.

Targets (issue 17, forward):

    per_head(local(128), column(128))              <= 0.7 x strided(128)
    axial(64)  (a 64 x 64 image)                     <= 1.0 x strided(64)
    FixedSparsityConfig(num_heads=8).pattern()       <= 1.2 x fixed(64, 16, causal=False)

and, for information, DeepSpeed's other configs through pattern() against the same mask as
from_mask (what they needed before), and the moved global blocks of a short last window.

    python bench/compat_patterns.py [--repeats 15] [--n 4096] [--threads 1]

Writes JSON with the standard header (bench/common.py) to bench/results/compat_patterns_cpu.json
(compat_patterns_cpu_<t>threads.json with --threads t). On a shared machine, one thread gives
the steadier figures: with two, a call waits for whichever thread another process delayed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import effattn  # noqa: E402
from effattn import patterns  # noqa: E402
from effattn.compat import deepspeed as ds  # noqa: E402
from effattn.decompose import planned_work_efficiency  # noqa: E402

FAMILY = "compat_patterns"
H, D = 8, 64
PASSES = ("fwd", "fwd+bwd")


def cases(n: int) -> tuple[dict, list[tuple[str, str, float]]]:
    """({name: pattern}, [(case, baseline, target ratio or nan)])."""
    fixed_ds = ds.FixedSparsityConfig(num_heads=H)
    pats = {
        "strided(128)": patterns.strided(128),
        "per_head(local(128), column(128))": patterns.per_head(
            patterns.local(128), patterns.column(128)
        ),
        "union(local(128), column(128))": patterns.union(patterns.local(128), patterns.column(128)),
        "strided(64)": patterns.strided(64),
        "axial(64)": patterns.axial(64),
        "fixed(64, 16, causal=False)": patterns.fixed(64, 16, causal=False),
        "FixedSparsityConfig().pattern()": fixed_ds.pattern(),
        "fixed(64, 16)": patterns.fixed(64, 16),
        "FixedSparsityConfig().pattern(causal=True)": fixed_ds.pattern(causal=True),
    }
    pairs = [
        ("per_head(local(128), column(128))", "strided(128)", 0.7),
        ("axial(64)", "strided(64)", 1.0),
        ("FixedSparsityConfig().pattern()", "fixed(64, 16, causal=False)", 1.2),
        ("FixedSparsityConfig().pattern(causal=True)", "fixed(64, 16)", 1.2),
        ("union(local(128), column(128))", "strided(128)", float("nan")),
    ]
    # DeepSpeed's block-granular configs: pattern() against from_mask of the same mask.
    others = {
        "BigBirdSparsityConfig": ds.BigBirdSparsityConfig(H).pattern(seed=0),
        "BSLongformerSparsityConfig": ds.BSLongformerSparsityConfig(H).pattern(),
        "FixedSparsityConfig(attention=unidirectional)": ds.FixedSparsityConfig(
            H, attention="unidirectional"
        ).pattern(),
        "VariableSparsityConfig(num_random_blocks=1)": ds.VariableSparsityConfig(
            H, num_random_blocks=1
        ).pattern(seed=0),
    }
    for name, p in others.items():
        pats[f"{name}.pattern()"] = p
        pats[f"{name} from_mask"] = patterns.from_mask(p.mask(n, n, H))
        pairs.append((f"{name}.pattern()", f"{name} from_mask", float("nan")))
    return pats, pairs


def run(n: int = 4096, repeats: int = 15, progress=None) -> dict:
    machine = common.machine("cpu")
    backend = common.require_backend(FAMILY, "cpu")
    progress = progress or common.Progress(FAMILY)
    pats, pairs = cases(n)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, H, n, D, generator=g) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def call(pattern, pass_):
        if pass_ == "fwd":
            with torch.no_grad():
                effattn.sparse_attention(q, k, v, pattern, backend=backend)
        else:
            out = effattn.sparse_attention(*leaves, pattern, backend=backend)
            out.backward(dout)

    rows = []
    for pass_ in PASSES:
        wall = {name: [] for name in pats}
        cpu = {name: [] for name in pats}
        for r in range(repeats + 1):  # round 0 warms up (layouts, plans, masks)
            for name, pattern in pats.items():
                c, t = time.process_time(), time.perf_counter()
                call(pattern, pass_)
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
            progress(f"{pass_}: round {r}/{repeats}")
        for name, pattern in pats.items():
            rows.append(
                {
                    "pattern": name,
                    "pass": pass_,
                    "n": n,
                    "backend": backend,
                    "work_efficiency": planned_work_efficiency(pattern, n, n, 64, 64),
                    "density": pattern.density(n, n, H),
                    # The first call of a case builds its layouts (and a from_mask's masks).
                    "first_call_s": wall[name][0],
                    **common.summarize(wall[name][1:]),
                    "times_s": wall[name][1:],
                    **common.summarize(cpu[name][1:], "cpu_"),
                    "cpu_times_s": cpu[name][1:],
                }
            )
    by = {(r["pattern"], r["pass"]): r for r in rows}
    ratios = []
    for case, base, target in pairs:
        for pass_ in PASSES:
            a, b = by[(case, pass_)], by[(base, pass_)]
            ratios.append(
                {
                    "case": case,
                    "baseline": base,
                    "pass": pass_,
                    "ratio": a["median_s"] / b["median_s"],
                    "cpu_ratio": a["cpu_median_s"] / b["cpu_median_s"],
                    "target": None if target != target else target,  # nan: no target
                }
            )
    args = {"n": n, "repeats": repeats, "H": H, "D": D, "B": 1, "dtype": "float32"}
    return common.payload(FAMILY, "cpu", machine, args, rows, ratios=ratios)


def table(doc: dict) -> str:
    rows = [
        [
            r["pattern"],
            r["pass"],
            f"{r['median_s'] * 1e3:.1f}",
            f"{r['min_s'] * 1e3:.1f}",
            f"{r['cpu_median_s'] * 1e3:.1f}",
            f"{r['first_call_s'] * 1e3:.0f}",
            f"{r['work_efficiency']:.2f}",
        ]
        for r in doc["rows"]
    ]
    heads = ["pattern", "pass", "median ms", "min ms", "cpu median ms", "first call ms"]
    heads.append("work eff.")
    lines = [common.markdown_table(heads, rows), ""]
    for r in doc["ratios"]:
        verdict = ""
        if r["target"] is not None and r["pass"] == "fwd":
            verdict = (
                f" (target <= {r['target']}: {'met' if r['ratio'] <= r['target'] else 'MISSED'})"
            )
        lines.append(
            f"{r['case']} / {r['baseline']} {r['pass']}: {r['ratio']:.2f}x wall, "
            f"{r['cpu_ratio']:.2f}x cpu{verdict}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        doc = run(args.n, args.repeats)
    except common.BackendMissing as e:
        print(e, file=sys.stderr)
        return 1
    print(table(doc))
    print(
        f"load average: start {doc['machine']['load_average']}, end "
        f"{doc['machine']['load_average_end']}; {doc['machine']['name']}"
    )
    tag = "" if args.threads is None else f"{args.threads}threads"
    path = common.write_json(doc, common.result_path(FAMILY, "cpu", tag=tag))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

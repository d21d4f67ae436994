"""CPU benchmark: effattn's C++ kernels vs PyTorch SDPA and FlexAttention.

For each sequence length n (B=1, H=8, D=64, fp32) and each pattern (fixed(128, 16),
strided(128), and causal as a parity check), in one run:

    sdpa_causal   F.scaled_dot_product_attention(is_causal=True): the baseline of every ratio
    effattn       effattn.sparse_attention(..., backend="cpu"); refuses to run without the C++
                  kernels (bench/common.py: what ran)
    sdpa_mask     SDPA with the pattern's dense bool mask [1, 1, n, n]
    flex          FlexAttention, torch.compile'd, forward only (it has no CPU backward)

each forward ("fwd") and forward + backward ("fwd+bwd"). Reported: median wall time over
--repeats runs after a warm-up (min, max and IQR alongside, since other processes share the
CPU; at most 3 runs for calls over 10 s), the time relative to SDPA causal at the same n and
pass (measured in the same run, before and after the other methods, all samples pooled), the
median process CPU time and its ratio likewise (a view that other processes' load does not
inflate), and the extra peak memory of the first timed call (bench/common.py: growth of the
resident set over the call, Linux only). SDPA with a dense mask is skipped (and reported so)
when its memory, extrapolated quadratically from the previous n, would exceed --mem-budget-gb.

Prints a table and the CPU targets at n = 8192; writes JSON with the standard header
(bench/common.py) to bench/results/cpu_attention_cpu[_quick].json.

    python bench/cpu_attention.py            # n = 2048 .. 16384
    python bench/cpu_attention.py --quick    # n = 2048, 4096; fewer repeats; no FlexAttention
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import effattn  # noqa: E402
from effattn import patterns  # noqa: E402
from effattn.ops import cpu as cpu_ops  # noqa: E402

FAMILY = "cpu_attention"
BACKEND = "cpu"  # what this family measures: effattn's C++ CPU kernels
H, D = 8, 64
TARGET_N = 8192
SLOW_S = 10.0
PASSES = ("fwd", "fwd+bwd")
HEADER = (
    f"{'n':>6} {'method':<12} {'pattern':<15} {'pass':<8} {'median s':>9} "
    f"{'min-max s':>15} {'x sdpa':>7} {'speedup':>8} {'cpu s':>8} {'cpu x':>6} "
    f"{'extra MiB':>10} {'density':>8}"
)


# --------------------------------------------------------------------------- cases
def flex_mask_mod(pattern_name: str):
    """FlexAttention mask_mod for the patterns of this benchmark (element definitions)."""
    if pattern_name == "fixed(128, 16)":
        return lambda b, h, i, j: (j <= i) & ((j // 128 == i // 128) | (j % 128 >= 112))
    if pattern_name == "strided(128)":
        return lambda b, h, i, j: (j <= i) & ((i - j < 128) | ((i - j) % 128 == 0))
    if pattern_name == "causal()":
        return lambda b, h, i, j: j <= i
    raise ValueError(f"no mask_mod for {pattern_name}")


def make_inputs(n: int, grad: bool):
    """q, k, v [1, H, n, D] (requiring grad for the backward pass) and an output gradient."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, torch.randn(1, H, n, D, generator=g)


BACKENDS = {"sdpa_causal": "sdpa", "sdpa_mask": "sdpa", "flex": "flex_attention"}
"""What serves each method's calls; effattn's rows carry the effattn backend ("cpu")."""


def runner(kind: str, pattern, n: int, backward: bool, state: dict):
    """A closure running one case, inputs created up front (outside the measured region)."""
    q, k, v, dout = make_inputs(n, backward)

    def finish(out):
        if backward:
            out.backward(dout)
            for t in (q, k, v):
                t.grad = None

    if kind == "sdpa_causal":
        return lambda: finish(F.scaled_dot_product_attention(q, k, v, is_causal=True))
    if kind == "effattn":
        return lambda: finish(effattn.sparse_attention(q, k, v, pattern, backend=BACKEND))
    if kind == "sdpa_mask":
        mask = pattern.mask(n, n)[None]
        return lambda: finish(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    if kind == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        key = (pattern.name, n)
        if key not in state.setdefault("block_masks", {}):
            state["block_masks"][key] = create_block_mask(
                flex_mask_mod(pattern.name), None, None, n, n, device="cpu"
            )
        if "flex" not in state:
            state["flex"] = torch.compile(flex_attention)
        bm, fa = state["block_masks"][key], state["flex"]
        return lambda: fa(q, k, v, block_mask=bm)
    raise ValueError(kind)


def _measure_case(kind, pattern, n, passname, repeats, state) -> dict:
    """One timed case: its row with the samples, their summary and the extra peak memory."""
    fn = runner(kind, pattern, n, passname == "fwd+bwd", state)
    row = {"n": n, "method": kind, "pattern": pattern.name, "pass": passname}
    row["backend"] = BACKENDS.get(kind, BACKEND)
    row.update(common.measure(fn, "cpu", repeats, slow_s=SLOW_S))
    if kind != "sdpa_causal":
        row["density_vs_causal"] = pattern.density(n) / patterns.causal().density(n)
    return row


def _add_ratios(rows: list[dict]) -> None:
    """Wall and CPU time relative to SDPA causal's pooled samples at the same n and pass."""
    wall, cpu = {}, {}
    for ps in PASSES:
        base = [r for r in rows if r["method"] == "sdpa_causal" and r["pass"] == ps]
        wall[ps] = statistics.median(t for r in base for t in r["times_s"])
        cpu[ps] = statistics.median(t for r in base for t in r["cpu_times_s"])
    for r in rows:
        if "median_s" in r:
            r["sdpa_causal_median_s"] = wall[r["pass"]]
            r["ratio_to_sdpa_causal"] = r["median_s"] / wall[r["pass"]]
            r["cpu_ratio_to_sdpa_causal"] = r["cpu_median_s"] / cpu[r["pass"]]


def run(
    sizes: list[int] | None = None,
    quick: bool = False,
    repeats: int | None = None,
    flex: bool | None = None,
    mem_budget_gb: float = 6.0,
    progress: common.Progress | None = None,
) -> dict:
    """Run the benchmark (module docstring); returns the result document with every figure.

    Defaults: n = 2048 .. 16384, 5 repeats, FlexAttention on; with quick, n = 2048, 4096,
    2 repeats and no FlexAttention (its compilation alone takes a minute).
    """
    common.require_backend(FAMILY, "cpu", BACKEND)
    progress = progress or common.Progress(FAMILY)
    sizes = sizes or ([2048, 4096] if quick else [2048, 4096, 8192, 16384])
    repeats = repeats or (2 if quick else 5)
    use_flex = (not quick) if flex is None else flex
    pats = [patterns.fixed(128, 16), patterns.strided(128), patterns.causal()]
    info = common.machine("cpu")
    progress(f"{info['name']}, load {info['load_average']}")
    progress(HEADER)

    results, state, mask_mem = [], {}, {}
    for n in sizes:
        rows = []

        def measure(kind, pattern, passname, n=n):
            row = _measure_case(kind, pattern, n, passname, repeats, state)
            progress(_format_row(row))
            return row

        rows += [measure("sdpa_causal", patterns.causal(), ps) for ps in PASSES]
        for p in pats:
            rows += [measure("effattn", p, ps) for ps in PASSES]
            if p.name == "causal()":
                continue
            for passname in PASSES:
                prev = mask_mem.get((p.name, passname))
                predicted = prev[1] * (n / prev[0]) ** 2 if prev and prev[1] else 0.0
                if predicted > mem_budget_gb * 1024:
                    rows.append(
                        {
                            "n": n,
                            "method": "sdpa_mask",
                            "pattern": p.name,
                            "pass": passname,
                            "backend": "sdpa",
                            "skipped": f"~{predicted / 1024:.1f} GB "
                            f"predicted > --mem-budget-gb {mem_budget_gb}",
                        }
                    )
                    progress(_format_row(rows[-1]))
                    continue
                r = measure("sdpa_mask", p, passname)
                mask_mem[(p.name, passname)] = (n, r["extra_peak_mib"])
                rows.append(r)
            if use_flex:
                rows.append(measure("flex", p, "fwd"))
        # The baseline again after the other methods, all its samples pooled: load that changed
        # during the sweep of this n then weighs on the baseline as on the methods.
        rows += [measure("sdpa_causal", patterns.causal(), ps) for ps in PASSES]
        _add_ratios(rows)
        results.extend(rows)

    args = {"sizes": sizes, "repeats": repeats, "flex": use_flex, "mem_budget_gb": mem_budget_gb}
    config = {
        "B": 1,
        "H": H,
        "D": D,
        "dtype": "float32",
        "effattn_isa": cpu_ops.isas()[0] if cpu_ops.ISA is None else cpu_ops.ISA,
        "effattn_blocks": [cpu_ops.BLOCK_M, cpu_ops.BLOCK_N],
    }
    return common.payload(
        FAMILY, "cpu", info, args, results, config=config, quick=quick, targets=_targets(results)
    )


def _format_row(r: dict) -> str:
    if "skipped" in r:
        return f"{r['n']:>6} {r['method']:<12} {r['pattern']:<15} {r['pass']:<8} skipped: {r['skipped']}"
    mem = "-" if r["extra_peak_mib"] is None else f"{r['extra_peak_mib']:.0f}"
    dens = f"{r['density_vs_causal']:.3f}" if "density_vs_causal" in r else ""
    # The ratio to SDPA causal is known only once the baseline's second measurement is in.
    ratio = r.get("ratio_to_sdpa_causal")
    rel = f"{ratio:>7.3f} {1 / ratio:>7.1f}x" if ratio else f"{'':>7} {'':>8}"
    crel = f"{r['cpu_ratio_to_sdpa_causal']:>6.3f}" if ratio else f"{'':>6}"
    return (
        f"{r['n']:>6} {r['method']:<12} {r['pattern']:<15} {r['pass']:<8} "
        f"{r['median_s']:>9.4f} {r['min_s']:>7.4f}-{r['max_s']:<7.4f} {rel} "
        f"{r['cpu_median_s']:>8.4f} {crel} {mem:>10} {dens:>8}"
    )


def table(doc: dict) -> str:
    """Markdown table per n, pattern and pass: effattn beside SDPA causal, SDPA with the mask
    and FlexAttention (median seconds; speed-ups over SDPA causal in wall and CPU time)."""
    rows = doc["rows"]
    out = []
    for n in doc["args"]["sizes"]:
        for r in rows:
            if (r["n"], r["method"]) != (n, "effattn"):
                continue

            mem = "-" if r["extra_peak_mib"] is None else f"{r['extra_peak_mib']:.0f}"
            out.append(
                [
                    n,
                    f"`{r['pattern']}`",
                    f"{r['density_vs_causal']:.3f}",
                    r["pass"],
                    f"{r['sdpa_causal_median_s']:.3f}",
                    f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f})",
                    f"{1 / r['ratio_to_sdpa_causal']:.2f}x / {1 / r['cpu_ratio_to_sdpa_causal']:.2f}x",
                    _cell(rows, r, "sdpa_mask"),
                    _cell(rows, r, "flex"),
                    mem,
                ]
            )
    headers = ["n", "pattern", "density", "pass", "SDPA causal s", "effattn s (min-max)"]
    headers += ["speed-up (wall / CPU time)", "SDPA + mask s", "FlexAttention s"]
    return common.markdown_table(headers + ["effattn extra MiB"], out)


def _cell(rows: list[dict], r: dict, method: str) -> str:
    """Median seconds of another method in r's case, "skipped", or "-" when not run."""
    key = (r["n"], method, r["pattern"], r["pass"])
    o = next((x for x in rows if (x["n"], x["method"], x["pattern"], x["pass"]) == key), None)
    if o is None:
        return "-"
    return "skipped" if "skipped" in o else f"{o['median_s']:.3f}"


def _find(results, n, method, pattern, passname):
    for r in results:
        if (r["n"], r["method"], r["pattern"], r["pass"]) == (n, method, pattern, passname):
            return r if "median_s" in r else None
    return None


def _targets(results) -> dict:
    """The CPU targets at n = 8192 (and memory at the largest n), as measured."""
    lines, checks = [f"# targets at n = {TARGET_N}"], {}
    for name in ("fixed(128, 16)", "strided(128)"):
        r = _find(results, TARGET_N, "effattn", name, "fwd")
        if r is None:
            continue
        bound = 2 * r["density_vs_causal"] * r["sdpa_causal_median_s"]
        ok = r["median_s"] <= bound
        checks[f"{name} fwd <= 2 x density x sdpa_causal"] = ok
        lines.append(
            f"  {name} fwd {r['median_s']:.4f} s <= 2 x {r['density_vs_causal']:.3f} x "
            f"{r['sdpa_causal_median_s']:.4f} = {bound:.4f} s: {'met' if ok else 'MISSED'}"
        )
        flex = _find(results, TARGET_N, "flex", name, "fwd")
        if flex is not None:
            lines.append(
                f"  {name} fwd vs FlexAttention: {flex['median_s'] / r['median_s']:.1f}x "
                "faster (target: >= 15x)"
            )
    r = _find(results, TARGET_N, "effattn", "fixed(128, 16)", "fwd+bwd")
    if r is not None:
        speedup = 1 / r["ratio_to_sdpa_causal"]
        checks["fixed(128, 16) fwd+bwd >= 3x faster than sdpa_causal"] = speedup >= 3
        lines.append(
            f"  fixed(128, 16) fwd+bwd {speedup:.2f}x faster than SDPA causal (>= 3x): "
            f"{'met' if speedup >= 3 else 'MISSED'}"
        )
    n_max = max(r["n"] for r in results)
    r = _find(results, n_max, "effattn", "fixed(128, 16)", "fwd+bwd")
    if r is not None and r["extra_peak_mib"] is not None:
        tensors_mib = 8 * n_max * H * D * 4 / 2**20  # q, k, v, out, dout, dq, dk, dv
        ok = r["extra_peak_mib"] <= 2 * tensors_mib
        checks[f"fwd+bwd extra memory at n={n_max} within 2x of q,k,v,out and grads"] = ok
        lines.append(
            f"  fixed(128, 16) fwd+bwd extra peak at n={n_max}: "
            f"{r['extra_peak_mib']:.0f} MiB vs 2 x {tensors_mib:.0f} MiB: "
            f"{'met' if ok else 'MISSED'}"
        )
    return {"checks": checks, "lines": lines}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 2048, 4096, 2 repeats, no flex")
    ap.add_argument("--sizes", type=int, nargs="+", help="sequence lengths")
    ap.add_argument("--repeats", type=int, help="timed runs per case (default 5, quick 2)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: unchanged)")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--mem-budget-gb", type=float, default=6.0, help="skip dense masks above")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/...)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        doc = run(
            args.sizes,
            args.quick,
            args.repeats,
            False if args.no_flex else None,
            args.mem_budget_gb,
        )
    except common.BackendMissing as e:
        raise SystemExit(str(e)) from None
    print(HEADER)
    for r in doc["rows"]:
        print(_format_row(r))
    for line in doc["targets"]["lines"]:
        print(line)
    out = common.write_json(doc, args.out or common.result_path(FAMILY, "cpu", args.quick))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmark: effattn's Triton block-sparse kernels vs SDPA and FlexAttention.

For each head dim D (64, 128), sequence length n (2048 .. 32768; batch B = max(1, 16384 // n),
H = 16 heads, bf16 by default) and pattern (strided(128), fixed(128, 16), fixed(128, 32),
causal as a parity check), in one run:

    sdpa_causal   F.scaled_dot_product_attention(is_causal=True) on the flash backend: the
                  baseline of the targets (pattern-independent, measured once per n and D)
    effattn       effattn.sparse_attention(..., backend="triton")
    effattn_cuda  effattn.sparse_attention(..., backend="cuda"), when the CUDA C++ kernels are
                  built (EFFATTN_CUDA=1) and the head dim is one they serve (64, 128)
    flex          FlexAttention with the same mask (mask_mod + block mask), torch.compile'd
    reference     effattn.reference.attention with the dense mask (O(n^2) memory; skipped when
                  its score matrices would exceed --mem-budget-gb)

each forward ("fwd") and forward + backward ("fwd+bwd"). Reported: median milliseconds
(triton.testing.do_bench), TFLOP/s counted on the useful entries only (4 * D flops per allowed
(query, key) pair forward, 2.5x that backward; Pattern.count_allowed), and the peak memory
the call adds on top of its inputs (torch.cuda.max_memory_allocated).

Targets, checked at every n and printed: effattn fwd+bwd time <= 2 x (useful entries
relative to causal) x SDPA causal time, i.e. at least half of flash's TFLOP/s on useful
entries; and >= 1.2x faster than FlexAttention for strided and fixed at n >= 8192.

Writes JSON with the device name to bench/results/sparse_attention_<device>.json (``_quick``
with --quick). Without a CUDA device it prints a message and exits with status 0.

    python bench/sparse_attention.py            # full sweep
    python bench/sparse_attention.py --quick    # n = 2048, 8192; D = 64; two patterns
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (first: it decides which effattn is imported)

import effattn  # noqa: E402
from effattn import patterns  # noqa: E402

H = 16
TOKENS = 16384
RESULTS = common.RESULTS
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- cases
def flex_mask_mod(pattern):
    """FlexAttention mask_mod with the pattern's element definition (self-attention, n_q = n_k)."""
    kind = getattr(pattern, "kind", None)
    if pattern.name == "causal()":
        return lambda b, h, i, j: j <= i
    if isinstance(kind, patterns.Strided) and kind.causal:
        l = kind.stride
        return lambda b, h, i, j: (j <= i) & ((i - j < l) | ((i - j) % l == 0))
    if isinstance(kind, patterns.Fixed) and kind.num_patterns == 1 and kind.causal:
        l, c = kind.stride, kind.summary
        return lambda b, h, i, j: (j <= i) & ((j // l == i // l) | (j % l >= l - c))
    raise ValueError(f"no mask_mod for {pattern.name}")


def bench_patterns(quick: bool):
    if quick:
        return [patterns.strided(128), patterns.fixed(128, 16)]
    return [
        patterns.strided(128),
        patterns.fixed(128, 16),
        patterns.fixed(128, 32),
        patterns.causal(),
    ]


def make_inputs(b, n, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(n * 1000 + d)
    q, k, v, dout = (
        torch.randn(b, H, n, d, device="cuda", dtype=dtype, generator=g) for _ in range(4)
    )
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, dout


BACKENDS = {
    "sdpa_causal": "sdpa_flash",
    "effattn": "triton",
    "effattn_cuda": "cuda",
    "flex": "flex_attention",
    "reference": "reference",
}
"""What serves each method's calls (the effattn names are passed to sparse_attention as is)."""


def method(kind, pattern, q, k, v, state):
    """A function computing the attention output for one method."""
    if kind == "sdpa_causal":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run
    if kind in ("effattn", "effattn_cuda"):
        return lambda: effattn.sparse_attention(q, k, v, pattern, backend=BACKENDS[kind])
    if kind == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        n = q.shape[2]
        block_mask = create_block_mask(flex_mask_mod(pattern), None, None, n, n, device="cuda")
        if "flex" not in state:
            state["flex"] = torch.compile(flex_attention)
        fa = state["flex"]
        return lambda: fa(q, k, v, block_mask=block_mask)
    if kind == "reference":
        mask = pattern.mask(q.shape[2], k.shape[2], device="cuda").unsqueeze(0)
        return lambda: effattn.reference.attention(q, k, v, mask)
    raise ValueError(kind)


def measure(fn, inputs, dout, backward: bool, rep_ms: int):
    """(median ms, extra peak MiB) of fn (+ its backward), gradients reset between calls."""
    from triton.testing import do_bench

    def step():
        out = fn()
        if backward:
            out.backward(dout)

    def clear():
        for t in inputs:
            t.grad = None

    step()  # compilation outside the measurement
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    clear()
    ms = do_bench(step, rep=rep_ms, return_mode="median", grad_to_none=list(inputs))
    return ms, peak


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 2048, 8192; D = 64; 2 patterns")
    ap.add_argument("--sizes", type=int, nargs="+", help="sequence lengths")
    ap.add_argument("--head-dims", type=int, nargs="+", help="head dims (default 64 128)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--mem-budget-gb", type=float, default=24.0, help="skip the dense reference")
    ap.add_argument("--rep-ms", type=int, help="do_bench time budget per case (default 200)")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/...)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sparse_attention benchmark: no CUDA device here, nothing to measure")
        return 0

    sizes = args.sizes or ([2048, 8192] if args.quick else [2048, 4096, 8192, 16384, 32768])
    head_dims = args.head_dims or ([64] if args.quick else [64, 128])
    rep_ms = args.rep_ms or (50 if args.quick else 200)
    dtype = DTYPES[args.dtype]
    device = torch.cuda.get_device_name()
    try:
        common.require_backend("sparse_attention", "cuda", BACKENDS["effattn"])
    except common.BackendMissing as e:
        print(e)
        return 1
    kinds = ["effattn", "reference"] + ([] if args.no_flex else ["flex"])
    skipped = {}
    try:  # the CUDA C++ kernels are measured beside Triton when they are built
        common.require_backend("sparse_attention", "cuda", BACKENDS["effattn_cuda"])
        kinds.insert(1, "effattn_cuda")
    except common.BackendMissing as e:
        skipped["effattn_cuda"] = str(e)
        print(f"effattn_cuda skipped: {e}")
    rows, state = [], {}

    def record(**row):
        row["backend"] = BACKENDS[row["method"]]
        rows.append(row)
        tf = row.get("tflops")
        print(
            f"{row['method']:<12} {row['pattern']:<16} D={row['d']:<4} n={row['n']:<6} "
            f"{row['pass']:<8} {row['ms']:9.3f} ms  "
            f"{'-' if tf is None else f'{tf:7.1f}'} TFLOP/s  {row['peak_mib']:9.1f} MiB",
            flush=True,
        )

    for d in head_dims:
        for n in sizes:
            b = max(1, TOKENS // n)
            causal_useful = b * patterns.causal().count_allowed(n, n, H)
            q, k, v, dout = make_inputs(b, n, d, dtype)
            base = {}
            for backward in (False, True):
                pass_ = "fwd+bwd" if backward else "fwd"
                flops = 4 * d * causal_useful * (3.5 if backward else 1.0)
                fn = method("sdpa_causal", None, q, k, v, state)
                ms, peak = measure(fn, (q, k, v), dout, backward, rep_ms)
                base[pass_] = ms
                record(method="sdpa_causal", pattern="causal()", d=d, n=n, b=b, h=H,
                       ms=ms, tflops=flops / ms / 1e9, peak_mib=peak, useful=causal_useful,
                       **{"pass": pass_})  # fmt: skip
            for pattern in bench_patterns(args.quick):
                useful = b * pattern.count_allowed(n, n, H)
                density = useful / causal_useful
                for kind in kinds:
                    if kind == "reference" and 3 * 4 * b * H * n * n > args.mem_budget_gb * 2**30:
                        print(f"reference    {pattern.name:<16} D={d:<4} n={n:<6} skipped (memory)")
                        continue
                    for backward in (False, True):
                        pass_ = "fwd+bwd" if backward else "fwd"
                        fn = method(kind, pattern, q, k, v, state)
                        try:
                            ms, peak = measure(fn, (q, k, v), dout, backward, rep_ms)
                        except torch.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            print(f"{kind:<12} {pattern.name:<16} D={d:<4} n={n:<6} out of memory")
                            continue
                        flops = 4 * d * useful * (3.5 if backward else 1.0)
                        row = dict(method=kind, pattern=pattern.name, d=d, n=n, b=b, h=H,
                                   ms=ms, tflops=flops / ms / 1e9, peak_mib=peak, useful=useful,
                                   density_vs_causal=density, **{"pass": pass_})  # fmt: skip
                        row["vs_sdpa_causal_budget"] = ms / (2 * density * base[pass_])
                        record(**row)
                torch.cuda.empty_cache()
            del q, k, v, dout
            torch.cuda.empty_cache()

    print("\ntargets (fwd+bwd):")
    ok = True
    for r in rows:
        if r["method"] != "effattn" or r["pass"] != "fwd+bwd":
            continue
        budget = r["vs_sdpa_causal_budget"]
        line = f"  {r['pattern']:<16} D={r['d']:<4} n={r['n']:<6} time / (2 x density x SDPA) = "
        line += f"{budget:5.2f} {'ok' if budget <= 1 else 'MISSED'}"
        flex = next(
            (f for f in rows if f["method"] == "flex" and f["pass"] == "fwd+bwd"
             and (f["pattern"], f["d"], f["n"]) == (r["pattern"], r["d"], r["n"])),
            None,
        )  # fmt: skip
        if flex is not None:
            speedup = flex["ms"] / r["ms"]
            need = r["n"] >= 8192 and r["pattern"] != "causal()"
            line += f"; vs flex {speedup:4.2f}x" + (
                f" {'ok' if speedup >= 1.2 else 'MISSED'}" if need else ""
            )
            ok &= speedup >= 1.2 or not need
        ok &= budget <= 1
        print(line)

    out = (
        args.out
        or RESULTS / f"sparse_attention_{common.slug(device)}{'_quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device,
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "heads": H,
        "tokens_per_batch": TOKENS,
        "targets_met": ok,
        "skipped": skipped,
        "versions": common.versions(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Transformer-XL attention: the fused kernels vs the original formulation, and the paper's
evaluation-speed table (issue 5, item 5).

(a) ``kernel``: effattn.xl_attention vs the original formulation (AC and BD materialized as
    [B, H, L, M + L] matrices, BD aligned with ``_rel_shift``, causal mask, softmax in
    PyTorch, autograd for the backward), at L = M = 512 .. 4096, D = 64, forward and
    forward + backward: median time and the peak memory the call adds to its inputs.
    Backends: on CPU the one "auto" picks ("cpu" with the C++ extension, else the blockwise
    "torch" path), on GPU "triton". CPU peaks come from a fresh subprocess per measurement
    (ru_maxrss over the resident size after the inputs exist); GPU peaks from
    torch.cuda.max_memory_allocated.

(b) ``eval``: the paper's Table (evaluation speed, Dai et al. 2019, section 4.3): a small
    Transformer-XL language model built from XLMultiheadAttention predicts one token at a time
    (i) with cached state (``decode``: each token is one projection per layer plus attention
    over the cache) and (ii) as the vanilla model does, recomputing a window of the same
    attention length for every token (``forward`` without memory on the last ``attn_len``
    tokens). Same model and weights on both sides; the XL side keeps mem_len = attn_len - 1
    keys, so both attend to attn_len positions. Speed-up = vanilla time / cached time per
    token, next to the paper's 363x, 773x, 1409x, 1874x at 800, 1800, 2800, 3800. Both sides
    evaluate --eval-batch streams at once (default 16, as evaluation runs batched): one token
    of a stream is a matrix-vector product per weight, and batching lets the cached side use
    matrix products too.

    python bench/xl_attention.py [--quick] [--only kernel|eval] [--device cpu|cuda]

Writes bench/results/xl_attention_<device>_<backend>[_quick][_<only>].json with the device
name, the backend and the load average at the start (timings on a shared machine are noisy;
ratios within one run are what the tables report).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import effattn  # noqa: E402
from effattn import functional  # noqa: E402
from effattn.nn import XLMultiheadAttention  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PAPER = {800: 363, 1800: 773, 2800: 1409, 3800: 1874}


# --------------------------------------------------------------------------- device
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- (a) kernel
def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """The original's _rel_shift on [B, H, L, N]: row i moves left by L - 1 - i."""
    b, h, n_q, n_k = x.shape
    padded = F.pad(x, (1, 0))
    return padded.view(b, h, n_k + 1, n_q)[:, :, 1:].view(b, h, n_q, n_k)


def original_xl(q, k, v, r_desc, u, vb, scale):
    """Transformer-XL's own formulation; r_desc [H, N, D] from distance N - 1 down to 0."""
    n_q, n_k = q.shape[2], k.shape[2]
    ac = (q + u[:, None]) @ k.transpose(-1, -2)
    bd = rel_shift((q + vb[:, None]) @ r_desc.transpose(-1, -2))
    causal = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1 + n_k - n_q)
    scores = ((ac + bd) * scale).masked_fill(causal, float("-inf"))
    return torch.softmax(scores.float(), -1).to(v.dtype) @ v


def kernel_inputs(b, h, n, d, device, dtype, grad):
    g = torch.Generator().manual_seed(0)
    shapes = [(b, h, n, d), (b, h, 2 * n, d), (b, h, 2 * n, d), (h, 2 * n, d), (h, d), (h, d)]
    return [
        (torch.randn(s, generator=g) * 0.5).to(device, dtype).requires_grad_(grad) for s in shapes
    ]


def kernel_call(impl, mode, inputs, backend):
    q, k, v, r, u, vb = inputs
    scale = q.shape[-1] ** -0.5
    if impl == "original":
        r_desc = r.flip(1)
        out = original_xl(q, k, v, r_desc, u, vb, scale)
    else:
        out = effattn.xl_attention(q, k, v, r, u, vb, scale=scale, backend=backend)
    if mode == "fwd+bwd":
        out.backward(torch.ones_like(out))
        for t in inputs:
            t.grad = None


def measure_kernel(impl, mode, n, args) -> dict:
    """One (implementation, mode, size) measurement: time and the peak memory it adds."""
    device, dtype = args.device, getattr(torch, args.dtype)
    inputs = kernel_inputs(args.batch, args.heads, n, 64, device, dtype, mode == "fwd+bwd")
    backend = args.backend

    def call():
        if mode == "fwd":
            with torch.no_grad():
                kernel_call(impl, mode, inputs, backend)
        else:
            kernel_call(impl, mode, inputs, backend)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        call()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = median_time(call, device, args.repeats, warmup=0)
    return {"impl": impl, "mode": mode, "L": n, "M": n, "seconds": seconds, "peak_bytes": peak}


def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def run_kernel_table(args) -> list[dict]:
    sizes = [512, 1024] if args.quick else [512, 1024, 2048, 4096]
    rows = []
    for n in sizes:
        for mode in ("fwd", "fwd+bwd"):
            pair = {}
            for impl in ("original", "effattn"):
                if args.device == "cpu":  # a fresh process: ru_maxrss is a lifetime maximum
                    cmd = [sys.executable, __file__, "--_one", impl, mode, str(n)]
                    cmd += [f"--{k}={v}" for k, v in _forwarded(args).items()]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode:
                        raise RuntimeError(f"{impl} {mode} L={n} failed:\n{res.stderr[-3000:]}")
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                else:
                    row = measure_kernel(impl, mode, n, args)
                    torch.cuda.empty_cache()
                pair[impl] = row
                rows.append(row)
            o, e = pair["original"], pair["effattn"]
            speed, mem = o["seconds"] / e["seconds"], o["peak_bytes"] / max(e["peak_bytes"], 1)
            print(
                f"L=M={n:5d} {mode:8s} original {o['seconds'] * 1e3:9.1f} ms "
                f"{o['peak_bytes'] / 2**20:8.1f} MiB | effattn {e['seconds'] * 1e3:9.1f} ms "
                f"{e['peak_bytes'] / 2**20:8.1f} MiB | {speed:5.2f}x faster, "
                f"{mem:6.1f}x less memory",
                flush=True,
            )
    return rows


def _forwarded(args) -> dict:
    return {
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "heads": args.heads,
        "repeats": args.repeats,
        "backend": args.backend,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- (b) eval
class XLBlock(nn.Module):
    """Post-LN Transformer-XL layer: attention with memory, then a position-wise FFN."""

    def __init__(self, d_model, n_head, d_inner, mem_len, backend, shared):
        super().__init__()
        self.attn = XLMultiheadAttention(
            d_model,
            n_head,
            mem_len=mem_len,
            backend=backend,
            r_w_bias=shared[0],
            r_r_bias=shared[1],
        )
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(), nn.Linear(d_inner, d_model))

    def _ffn(self, h):
        return self.ln2(h + self.ff(h))

    def forward(self, x, mems=None):
        out, new_mems = self.attn(x, mems)
        return self._ffn(self.ln1(x + out)), new_mems

    def decode(self, x, cache=None):
        out, cache = self.attn.decode(x, cache)
        return self._ffn(self.ln1(x + out)), cache


class TinyXLLM(nn.Module):
    """A small character-level Transformer-XL LM (embedding, XL blocks, output layer)."""

    def __init__(self, vocab, d_model, n_head, d_inner, n_layer, mem_len, backend):
        super().__init__()
        d_head = d_model // n_head
        # One pair of position biases shared by every layer, as the original.
        shared = tuple(nn.Parameter(torch.randn(n_head, d_head) * 0.02) for _ in range(2))
        self.emb = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(
            XLBlock(d_model, n_head, d_inner, mem_len, backend, shared) for _ in range(n_layer)
        )
        self.out = nn.Linear(d_model, vocab)

    def forward(self, tokens):
        """Logits of the last position, attending within ``tokens`` only (no memory)."""
        h = self.emb(tokens)
        for layer in self.layers:
            h, _ = layer(h)
        return self.out(h[:, -1])

    def decode(self, tokens, caches):
        h = self.emb(tokens)
        caches = caches or [None] * len(self.layers)
        new = []
        for layer, cache in zip(self.layers, caches, strict=True):
            h, cache = layer.decode(h, cache)
            new.append(cache)
        return self.out(h[:, -1]), new


def run_eval_table(args) -> list[dict]:
    lengths = [800, 1800, 2800, 3800]
    cfg = {"vocab": 256, "d_model": 256, "n_head": 4, "d_inner": 1024, "n_layer": 4}
    rows = []
    torch.manual_seed(0)
    for attn_len in lengths:
        model = TinyXLLM(**cfg, mem_len=attn_len - 1, backend=args.backend).to(args.device).eval()
        n_cached = 4 if args.quick else 32
        n_vanilla = 1 if args.quick else 2
        stream = torch.randint(
            0, cfg["vocab"], (args.eval_batch, attn_len + n_cached), device=args.device
        )
        with torch.inference_mode():
            # Cached state: attn_len - 1 tokens in one call, then one token at a time. The
            # first step sees exactly the vanilla window [0, attn_len), so their logits agree;
            # later the cached hidden states carry context from beyond the window (that is
            # what the memory is for) and the two models legitimately differ.
            _, caches = model.decode(stream[:, : attn_len - 1], None)
            first, caches = model.decode(stream[:, attn_len - 1 : attn_len], caches)
            agree = torch.allclose(first, model(stream[:, :attn_len]), atol=1e-3, rtol=1e-3)
            sync(args.device)
            t0 = time.perf_counter()
            for i in range(attn_len, attn_len + n_cached):
                _, caches = model.decode(stream[:, i : i + 1], caches)
            sync(args.device)
            cached = (time.perf_counter() - t0) / n_cached
            # Vanilla: the whole window again for every token.
            sync(args.device)
            t0 = time.perf_counter()
            for end in range(attn_len + n_cached - n_vanilla, attn_len + n_cached):
                model(stream[:, end - attn_len : end])
            sync(args.device)
            vanilla = (time.perf_counter() - t0) / n_vanilla
        row = {
            "attn_len": attn_len,
            "cached_ms_per_token": cached * 1e3,
            "vanilla_ms_per_token": vanilla * 1e3,
            "speedup": vanilla / cached,
            "paper_speedup": PAPER[attn_len],
            "first_step_logits_agree": bool(agree),
            "model": cfg,
            "batch": args.eval_batch,
            "threads": torch.get_num_threads(),
        }
        rows.append(row)
        print(
            f"attn_len {attn_len}: vanilla {vanilla * 1e3:9.1f} ms/token, cached "
            f"{cached * 1e3:7.2f} ms/token -> {vanilla / cached:7.0f}x (paper {PAPER[attn_len]}x)"
            f"{'' if agree else '  [cached and vanilla logits DISAGREE]'}",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="L = M = 512, 1024; few tokens")
    ap.add_argument("--only", choices=["kernel", "eval"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="kernel table dtype (fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--backend", default=None, help="effattn backend (default: auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--eval-batch", type=int, default=16, help="streams evaluated together (both sides)"
    )
    ap.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.batch = args.batch or (2 if gpu else 1)
    args.heads = args.heads or (8 if gpu else 4)
    args.repeats = args.repeats or (10 if gpu else 3)
    args.backend = args.backend or "auto"
    if args._one:
        impl, mode, n = args._one
        print(json.dumps(measure_kernel(impl, mode, int(n), args)))
        return 0

    name = device_name(args.device)
    resolved = functional._resolve_xl_backend(args.backend, torch.device(args.device))
    print(f"device: {name}; effattn backend: {resolved}; torch {torch.__version__}")
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    result = {
        "device": name,
        "device_type": args.device,
        "backend": resolved,
        "torch": torch.__version__,
        "quick": args.quick,
        "load_average_at_start": load,
        "kernel_setup": {
            "B": args.batch,
            "H": args.heads,
            "D": 64,
            "dtype": args.dtype,
            "memory": "peak bytes added to the inputs (CPU: ru_maxrss of a fresh process)",
        },
    }
    if args.only in (None, "kernel"):
        result["kernel"] = run_kernel_table(args)
    if args.only in (None, "eval"):
        result["eval"] = run_eval_table(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    suffix = ("_quick" if args.quick else "") + (f"_{args.only}" if args.only else "")
    path = RESULTS / f"xl_attention_{slug}_{resolved}{suffix}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

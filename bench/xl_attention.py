"""Transformer-XL attention: the fused kernels vs the original formulation, and the paper's
evaluation-speed table.

(a) ``kernel``: effattn.xl_attention vs the original formulation (AC and BD materialized as
    [B, H, L, M + L] matrices, BD aligned with ``_rel_shift``, causal mask, softmax in
    PyTorch, autograd for the backward), at L = M = 512 .. 4096, D = 64, forward and
    forward + backward: median time (with min, max and IQR) and the peak memory the call adds
    to its inputs (bench/common.py: CUDA max_memory_allocated, or on CPU the growth of the
    resident set over the call). Backends: on CPU "cpu" (the C++ kernels), on GPU "triton", or
    the one --backend names; the run refuses to start when it cannot run (bench/common.py).

(b) ``eval``: the paper's Table (evaluation speed, Dai et al. 2019, section 4.3): a small
    Transformer-XL language model built from XLMultiheadAttention, evaluated at attention
    lengths 800, 1800, 2800, 3800 against the vanilla model (Al-Rfou et al.), which recomputes
    a window of the attention length for every token it predicts (``forward`` without memory on
    the last ``attn_len`` tokens). The XL side is measured two ways, same model and weights:
    (i) ``segment``, as the paper's evaluation runs: segments of SEGMENT = 128 tokens (the
    original's evaluation tgt_len) with ``same_length`` (every query attends to exactly
    attn_len positions), the projected keys and values of earlier positions kept by ``decode``;
    time per token = time per segment / 128. (ii) ``cached``: one token at a time with
    ``decode`` (mem_len = attn_len - 1 keys, so it also attends to attn_len positions): the
    latency of generation, bound by reading the cache. Speed-up = vanilla time / XL time per
    token (medians), next to the paper's 363x, 773x, 1409x, 1874x. Both sides evaluate
    --eval-batch streams at once (default 16, as evaluation runs batched). Before timing, each
    XL side's logits are checked against the vanilla model's on a window both see whole.

    python bench/xl_attention.py [--quick] [--only kernel|eval] [--device cpu|cuda]

Writes bench/results/xl_attention_<device>[_<backend>][_<only>][_quick].json (the backend only
when --backend names one) with the standard header of bench/common.py; ratios within one run
are what the tables report, since timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import effattn  # noqa: E402
from effattn.nn import XLMultiheadAttention  # noqa: E402

FAMILY = "xl_attention"
PAPER = {800: 363, 1800: 773, 2800: 1409, 3800: 1874}
EVAL_MODEL = {"vocab": 256, "d_model": 256, "n_head": 4, "d_inner": 1024, "n_layer": 4}
SEGMENT = 128  # tokens per XL evaluation segment: the original's eval tgt_len (enwik8, text8)


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
    """q, k, v, r, u, vb for L = M = n (r covers every distance: no clamping)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(b, h, n, d), (b, h, 2 * n, d), (b, h, 2 * n, d), (h, 2 * n, d), (h, d), (h, d)]
    return [
        (torch.randn(s, generator=g) * 0.5).to(device, dtype).requires_grad_(grad) for s in shapes
    ]


def kernel_call(impl, mode, inputs, backend):
    """One forward (and backward, for "fwd+bwd") of the original formulation or effattn."""
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


def run_kernel_table(opts: dict, progress: common.Progress) -> list[dict]:
    """Rows of (a): one per implementation, pass and size; effattn's rows carry the ratios."""
    device, dtype = opts["device"], getattr(torch, opts["dtype"])
    rows = []
    for n in opts["sizes"]:
        for mode in ("fwd", "fwd+bwd"):
            pair = {}
            for impl in ("original", "effattn"):
                inputs = kernel_inputs(
                    opts["batch"], opts["heads"], n, 64, device, dtype, mode == "fwd+bwd"
                )

                def call(impl=impl, mode=mode, inputs=inputs):
                    # The forward runs without autograd, as in evaluation.
                    with torch.set_grad_enabled(mode == "fwd+bwd"):
                        kernel_call(impl, mode, inputs, opts["backend"])

                row = {"table": "kernel", "impl": impl, "mode": mode, "L": n, "M": n}
                row["backend"] = opts["backend"] if impl == "effattn" else "pytorch"
                row.update(common.measure(call, device, opts["repeats"]))
                del call, inputs  # free this case's tensors before the next case allocates
                if device == "cuda":
                    torch.cuda.empty_cache()
                pair[impl] = row
                rows.append(row)
            o, e = pair["original"], pair["effattn"]
            e["original_median_s"] = o["median_s"]
            e["speedup"] = o["median_s"] / e["median_s"]
            if o["extra_peak_mib"] is not None and e["extra_peak_mib"] is not None:
                e["memory_ratio"] = o["extra_peak_mib"] / max(e["extra_peak_mib"], 1 / 1024)
            progress(
                f"L=M={n:5d} {mode:8s} original {o['median_s'] * 1e3:9.1f} ms "
                f"{_mib(o)} MiB | effattn {e['median_s'] * 1e3:9.1f} ms {_mib(e)} MiB | "
                f"{e['speedup']:5.2f}x faster, {e.get('memory_ratio', float('nan')):6.1f}x "
                "less memory"
            )
    return rows


def _mib(row: dict) -> str:
    return "       -" if row["extra_peak_mib"] is None else f"{row['extra_peak_mib']:8.1f}"


# --------------------------------------------------------------------------- (b) eval
class XLBlock(nn.Module):
    """Post-LN Transformer-XL layer: attention with memory, then a position-wise FFN."""

    def __init__(self, d_model, n_head, d_inner, mem_len, backend, shared, same_length):
        super().__init__()
        self.attn = XLMultiheadAttention(
            d_model,
            n_head,
            mem_len=mem_len,
            same_length=same_length,
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

    def __init__(
        self, vocab, d_model, n_head, d_inner, n_layer, mem_len, backend, same_length=False
    ):
        super().__init__()
        d_head = d_model // n_head
        # One pair of position biases shared by every layer, as the original.
        shared = tuple(nn.Parameter(torch.randn(n_head, d_head) * 0.02) for _ in range(2))
        self.emb = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(
            XLBlock(d_model, n_head, d_inner, mem_len, backend, shared, same_length)
            for _ in range(n_layer)
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


def run_eval_table(opts: dict, progress: common.Progress) -> list[dict]:
    """Rows of (b): per attention length, time per token of the XL model (in segments and
    token by token) and of the vanilla model."""
    rows = []
    torch.manual_seed(0)
    for attn_len in opts["eval_lengths"]:
        row = eval_length(attn_len, opts)
        rows.append(row)
        agree = row["first_segment_logits_agree"] and row["first_step_logits_agree"]
        progress(
            f"attn_len {attn_len}: vanilla {row['vanilla_ms_per_token']:9.1f} ms/token; XL in "
            f"segments {row['segment_ms_per_token']:6.2f} ms/token -> "
            f"{row['segment_speedup']:5.0f}x (paper {PAPER[attn_len]}x); token by token "
            f"{row['cached_ms_per_token']:6.2f} ms/token -> {row['speedup']:5.0f}x"
            f"{'' if agree else '  [XL and vanilla logits DISAGREE]'}"
        )
    return rows


def eval_length(attn_len: int, opts: dict) -> dict:
    """One row of (b): the vanilla model, and the XL model in segments and token by token."""
    device, batch = opts["device"], opts["eval_batch"]
    n_cached, n_vanilla, n_segments = (
        opts["cached_tokens"],
        opts["vanilla_tokens"],
        opts["segments"],
    )
    # Token by token: mem_len = attn_len - 1 cached positions plus the token itself.
    model = TinyXLLM(**EVAL_MODEL, mem_len=attn_len - 1, backend=opts["backend"])
    model = model.to(device).eval()
    # In segments: the same weights; same_length keeps every query at attn_len positions.
    seg_model = TinyXLLM(
        **EVAL_MODEL, mem_len=attn_len, backend=opts["backend"], same_length=True
    ).to(device)
    seg_model.load_state_dict(model.state_dict())
    seg_model.eval()
    length = attn_len + max(n_cached, (n_segments + 1) * SEGMENT)
    stream = torch.randint(0, EVAL_MODEL["vocab"], (batch, length), device=device)
    state = {"pos": attn_len, "seg_pos": attn_len}
    with torch.inference_mode():
        # Both XL sides first consume the window [0, attn_len) (the segment side in segments),
        # so their last logits must equal the vanilla model's on that window: a check that
        # the cached state is right. Later the cached hidden states carry context from beyond
        # the window (that is what the memory is for) and the models legitimately differ. The
        # vanilla call of this check is also the vanilla side's warm-up.
        vanilla_first = model(stream[:, :attn_len])
        caches = None
        for i in range(0, attn_len, SEGMENT):
            seg_first, caches = seg_model.decode(stream[:, i : min(i + SEGMENT, attn_len)], caches)
        state["seg_caches"] = caches
        _, state["caches"] = model.decode(stream[:, : attn_len - 1], None)
        first, state["caches"] = model.decode(stream[:, attn_len - 1 : attn_len], state["caches"])
        agree = torch.allclose(first, vanilla_first, atol=1e-3, rtol=1e-3)
        seg_agree = torch.allclose(seg_first, vanilla_first, atol=1e-3, rtol=1e-3)

        def cached_step():
            i = state["pos"]
            _, state["caches"] = model.decode(stream[:, i : i + 1], state["caches"])
            state["pos"] = i + 1

        def segment_step():
            i = state["seg_pos"]
            _, state["seg_caches"] = seg_model.decode(
                stream[:, i : i + SEGMENT], state["seg_caches"]
            )
            state["seg_pos"] = i + SEGMENT

        def vanilla_step():  # the whole window again for one token
            model(stream[:, -attn_len:])

        segment_step()  # warm-up: the first full segment sizes the cache's storage
        segment = common.measure(segment_step, device, n_segments, warmup=0, memory=False)
        cached = common.measure(cached_step, device, n_cached, warmup=0, memory=False)
        vanilla = common.measure(vanilla_step, device, n_vanilla, warmup=0, memory=False)
    seg_token = segment["median_s"] / SEGMENT
    return {
        "table": "eval",
        "backend": opts["backend"],  # both models are built from XLMultiheadAttention
        "attn_len": attn_len,
        "segment_len": SEGMENT,
        "segment_ms_per_token": seg_token * 1e3,
        "cached_ms_per_token": cached["median_s"] * 1e3,
        "vanilla_ms_per_token": vanilla["median_s"] * 1e3,
        "segment_speedup": vanilla["median_s"] / seg_token,
        "speedup": vanilla["median_s"] / cached["median_s"],
        "paper_speedup": PAPER[attn_len],
        "first_segment_logits_agree": bool(seg_agree),
        "first_step_logits_agree": bool(agree),
        "segment": segment,
        "cached": cached,
        "vanilla": vanilla,
    }


# --------------------------------------------------------------------------- entry points
def run(
    device: str = "cpu",
    quick: bool = False,
    only: str | None = None,
    *,
    dtype: str | None = None,
    batch: int | None = None,
    heads: int | None = None,
    repeats: int | None = None,
    backend: str = "auto",
    eval_batch: int = 16,
    sizes: list[int] | None = None,
    eval_lengths: list[int] | None = None,
    progress: common.Progress | None = None,
) -> dict:
    """Run (a) and (b), or the one named by ``only``; returns the result document.

    Defaults: on GPU bf16, B = 2, H = 8, 10 repeats; on CPU fp32, B = 1, H = 4, 3 repeats.
    With quick, L = M = 512, 1024, attention lengths 800 and 1800, fewer tokens.
    """
    progress = progress or common.Progress(FAMILY)
    resolved = common.require_backend(FAMILY, device, backend)
    gpu = device == "cuda"
    opts = {
        "device": device,
        "dtype": dtype or ("bfloat16" if gpu else "float32"),
        "batch": batch or (2 if gpu else 1),
        "heads": heads or (8 if gpu else 4),
        "repeats": repeats or (10 if gpu else 3),
        "backend": resolved,
        "eval_batch": eval_batch,
        "sizes": sizes or ([512, 1024] if quick else [512, 1024, 2048, 4096]),
        # The vanilla side recomputes the whole window per token: about 100 s a token at 3800
        # on two CPU cores, too long for a quick run.
        "eval_lengths": eval_lengths or ([800, 1800] if quick else list(PAPER)),
        "cached_tokens": 4 if quick else 32,
        "segments": 2 if quick else 6,
        "vanilla_tokens": 1 if quick else 3,
        "only": only,
    }
    info = common.machine(device)
    progress(f"{info['name']}; effattn backend {resolved}; load {info['load_average']}")
    rows = []
    if only in (None, "kernel"):
        rows += run_kernel_table(opts, progress)
    if only in (None, "eval"):
        rows += run_eval_table(opts, progress)
    setup = {
        "kernel": {"B": opts["batch"], "H": opts["heads"], "D": 64, "dtype": opts["dtype"]},
        "eval": {**EVAL_MODEL, "batch": eval_batch},
    }
    return common.payload(
        FAMILY, device, info, opts, rows, backend=resolved, setup=setup, quick=quick
    )


def table(doc: dict) -> str:
    """Markdown tables of (a) and (b), for the rows the document has."""
    parts = []
    kernel = [r for r in doc["rows"] if r["table"] == "kernel" and r["impl"] == "effattn"]
    if kernel:
        orig = {
            (r["L"], r["mode"]): r
            for r in doc["rows"]
            if r["table"] == "kernel" and r["impl"] == "original"
        }
        rows = []
        for e in kernel:
            o = orig[(e["L"], e["mode"])]
            rows.append(
                [
                    e["L"],
                    e["mode"],
                    f"{o['median_s'] * 1e3:.1f} ({o['min_s'] * 1e3:.1f}-{o['max_s'] * 1e3:.1f})",
                    f"{e['median_s'] * 1e3:.1f} ({e['min_s'] * 1e3:.1f}-{e['max_s'] * 1e3:.1f})",
                    f"{e['speedup']:.2f}x",
                    _mib(o).strip(),
                    _mib(e).strip(),
                    f"{e['memory_ratio']:.1f}x" if "memory_ratio" in e else "-",
                ]
            )
        headers = ["L = M", "pass", "original ms (min-max)", "effattn ms (min-max)", "speed-up"]
        headers += ["original MiB", "effattn MiB", "less memory"]
        parts.append(common.markdown_table(headers, rows))
    evals = [r for r in doc["rows"] if r["table"] == "eval"]
    if evals:
        rows = [
            [
                r["attn_len"],
                f"{r['vanilla_ms_per_token']:.1f}",
                f"{r['segment_ms_per_token']:.2f}",
                f"**{r['segment_speedup']:.0f}x**",
                f"{r['paper_speedup']}x",
                f"{r['cached_ms_per_token']:.2f}",
                f"{r['speedup']:.0f}x",
            ]
            for r in evals
        ]
        headers = [
            "attention length",
            "vanilla ms/token",
            f"XL ms/token ({SEGMENT}-token segments)",
        ]
        headers += ["speed-up", "paper", "XL ms/token (token by token)", "speed-up"]
        parts.append(common.markdown_table(headers, rows))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="L = M = 512, 1024; few tokens")
    ap.add_argument("--only", choices=["kernel", "eval"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="kernel table dtype (fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--backend", default="auto", help="effattn backend (default: auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--eval-batch", type=int, default=16, help="streams evaluated together (both sides)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        doc = run(
            args.device,
            args.quick,
            args.only,
            dtype=args.dtype,
            batch=args.batch,
            heads=args.heads,
            repeats=args.repeats,
            backend=args.backend,
            eval_batch=args.eval_batch,
        )
    except common.BackendMissing as e:
        raise SystemExit(str(e)) from None
    print(table(doc))
    tag = "_".join(
        ([doc["backend"]] if args.backend != "auto" else []) + ([args.only] if args.only else [])
    )
    out = common.write_json(doc, common.result_path(FAMILY, args.device, args.quick, tag))
    print(f"wrote {out.relative_to(common.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

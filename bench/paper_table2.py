"""The Sparse Transformer paper's Table 2 on our kernels: time per training iteration.

Child et al. (2019), Table 2, report time per iteration of a Transformer on enwik8 at context
12,288: dense attention 1.31, fixed 0.55, strided 0.35 (relative units). This script trains the
same small Transformer stack (embedding, pre-norm blocks, causal attention, MLP) for a few
iterations with each attention and reports the time per iteration (forward, backward and Adam
step) and its ratio to dense, beside the paper's ratios:

    dense    nn.MultiheadAttention with a causal mask (PyTorch SDPA: flash kernels on GPU)
    fixed    effattn fixed(128, 32), as the paper's enwik8 model (stride 128, c = 32)
    strided  effattn strided(128)

Context 12,288 on GPU, 4,096 on CPU (`--context` to change). Medians over the timed
iterations, after a warm-up iteration; every variant runs in the same process, one after the
other, so that the ratios compare like with like.

Run: python bench/paper_table2.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effattn import patterns  # noqa: E402
from effattn.nn import replace_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = {"dense": 1.31, "fixed": 0.55, "strided": 0.35}
PATTERNS = {"fixed": lambda: patterns.fixed(128, 32), "strided": lambda: patterns.strided(128)}


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal_mask, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """A small byte-level Transformer language model."""

    def __init__(self, d_model: int, heads: int, layers: int, vocab: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=tokens.device).triu(1)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, causal)
        return self.head(self.norm(x))


def build(variant: str, args, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = Stack(args.d_model, args.heads, args.layers).to(device)
    if variant != "dense":
        replace_attention(model, PATTERNS[variant](), dropout=0.0)
    return model


def time_iterations(model: nn.Module, tokens: torch.Tensor, iters: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if tokens.is_cuda else (lambda: None)
    times = []
    for i in range(iters + 1):
        sync()
        t = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i > 0:  # the first iteration builds layouts and compiles kernels
            times.append(time.perf_counter() - t)
    return times


def run(device: str, quick: bool, context: int | None = None, **overrides) -> dict:
    """Time one training iteration per variant; returns the results as a dict."""
    dev = torch.device(device)
    args = argparse.Namespace(d_model=256, heads=4, layers=2, batch=1, iters=3 if quick else 5)
    vars(args).update(overrides)
    n = context or (12288 if dev.type == "cuda" else 4096)
    if quick:
        n = min(n, 2048)
    tokens = torch.randint(0, 256, (args.batch, n + 1), device=dev)
    rows = []
    for variant in ("dense", "fixed", "strided"):
        times = time_iterations(build(variant, args, dev), tokens, args.iters)
        rows.append(
            {
                "variant": variant,
                "seconds_per_iter": statistics.median(times),
                "min": min(times),
                "max": max(times),
                "iters": len(times),
            }
        )
        print(f"  {variant:8s} {statistics.median(times):8.3f} s/iter", flush=True)
    dense = rows[0]["seconds_per_iter"]
    for row in rows:
        row["ratio_to_dense"] = row["seconds_per_iter"] / dense
        row["paper_ratio_to_dense"] = PAPER[row["variant"]] / PAPER["dense"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {
        "family": "paper_table2",
        "device": name,
        "context": n,
        "model": {k: v for k, v in vars(args).items() if k != "iters"},
        "patterns": {"fixed": "fixed(128, 32)", "strided": "strided(128)"},
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"Sparse Transformer Table 2 on effattn ({result['device']}, context {result['context']})",
        "| attention | s/iter | ratio to dense | paper's ratio |",
        "| --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['seconds_per_iter']:.3f} | {r['ratio_to_dense']:.2f} | "
            f"{r['paper_ratio_to_dense']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="context <= 2048, 3 iterations")
    ap.add_argument("--context", type=int, default=None)
    args = ap.parse_args()
    result = run(args.device, args.quick, args.context)
    print(table(result))
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    out = RESULTS / f"paper_table2_{result['device'].replace(' ', '_')}{suffix}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

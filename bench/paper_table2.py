"""The Sparse Transformer paper's Table 2 on our kernels: time per training iteration.

Child et al. (2019), Table 2, report time per iteration of a Transformer on enwik8 at context
12,288: dense attention 1.31, fixed 0.55, strided 0.35 (relative units). This script trains the
same small Transformer stack (embedding, pre-norm blocks, causal attention, MLP) for a few
iterations with each attention and reports the time per iteration (forward, backward and Adam
step; median, min, max and IQR) and its ratio to dense, beside the paper's ratios:

    dense    nn.MultiheadAttention with a causal mask (PyTorch SDPA: flash kernels on GPU)
    fixed    effattn fixed(128, 32), as the paper's enwik8 model (stride 128, c = 32)
    strided  effattn strided(128)

effattn runs on the C++ kernels on CPU and Triton on GPU (or --backend); the run refuses to
start when that backend cannot run (bench/common.py), and every row names what served it.

Context 12,288 on GPU, 4,096 on CPU (`--context` to change). Medians over the timed
iterations, after a warm-up iteration; every variant runs in the same process, one after the
other, so that the ratios compare like with like.

Writes bench/results/paper_table2_<device>[_quick].json with the standard header of
bench/common.py.

Run: python bench/paper_table2.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from effattn import patterns  # noqa: E402
from effattn.nn import replace_attention  # noqa: E402

FAMILY = "paper_table2"
PAPER = {"dense": 1.31, "fixed": 0.55, "strided": 0.35}
PATTERNS = {"fixed": lambda: patterns.fixed(128, 32), "strided": lambda: patterns.strided(128)}
PATTERN_NAMES = {"dense": "causal()", "fixed": "fixed(128, 32)", "strided": "strided(128)"}


class Block(nn.Module):
    """Pre-norm Transformer block: causal self-attention, then a 4x MLP."""

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


def build(variant: str, args, device: torch.device, backend: str) -> nn.Module:
    """The stack with the same initial weights for every variant, its attention swapped."""
    torch.manual_seed(0)
    model = Stack(args.d_model, args.heads, args.layers).to(device)
    if variant != "dense":
        replace_attention(model, PATTERNS[variant](), dropout=0.0, backend=backend)
    return model


def training_step(model: nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    """One training iteration (forward, loss, backward, Adam step) as a closure."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(
    device: str,
    quick: bool,
    context: int | None = None,
    progress: common.Progress | None = None,
    backend: str = "auto",
    **overrides,
) -> dict:
    """Time one training iteration per variant; returns the result document.

    ``overrides`` replace the model's settings (d_model, heads, layers, batch) or iters.
    """
    progress = progress or common.Progress(FAMILY)
    dev = torch.device(device)
    backend = common.require_backend(FAMILY, dev.type, backend)
    args = argparse.Namespace(d_model=256, heads=4, layers=2, batch=1, iters=3 if quick else 5)
    vars(args).update(overrides)
    n = context or (12288 if dev.type == "cuda" else 4096)
    if quick:
        n = min(n, 2048)
    info = common.machine(dev.type)
    progress(f"{info['name']}, context {n}, load {info['load_average']}")
    tokens = torch.randint(0, 256, (args.batch, n + 1), device=dev)
    rows = []
    for variant in ("dense", "fixed", "strided"):
        step = training_step(build(variant, args, dev, backend), tokens)
        # The warm-up iteration builds layouts and compiles kernels.
        row = {"variant": variant, "pattern": PATTERN_NAMES[variant]}
        row["backend"] = "sdpa" if variant == "dense" else backend
        row.update(common.measure(step, dev.type, args.iters))
        # Density of the attention relative to causal (dense here is causal attention).
        pattern = PATTERNS[variant]() if variant != "dense" else patterns.causal()
        row["density_vs_causal"] = pattern.density(n) / patterns.causal().density(n)
        rows.append(row)
        progress(
            f"{variant:8s} {row['median_s']:8.3f} s/iter ({row['min_s']:.3f}-{row['max_s']:.3f})"
        )
    dense = rows[0]["median_s"]
    for row in rows:
        row["ratio_to_dense"] = row["median_s"] / dense
        row["paper_ratio_to_dense"] = PAPER[row["variant"]] / PAPER["dense"]
    return common.payload(
        FAMILY,
        dev.type,
        info,
        vars(args) | {"context": n, "quick": quick, "backend": backend},
        rows,
        backend=backend,
        context=n,
        paper_time_per_iter=PAPER,
    )


def table(result: dict) -> str:
    """Markdown table: time per iteration and ratio to dense, beside the paper's ratio."""
    rows = [
        [
            f"{r['variant']} (`{r['pattern']}`)",
            f"{r['median_s']:.3f}",
            f"{r['min_s']:.3f}-{r['max_s']:.3f}",
            f"{r['ratio_to_dense']:.2f}",
            f"{r['paper_ratio_to_dense']:.2f} ({PAPER[r['variant']]})",
        ]
        for r in result["rows"]
    ]
    headers = ["attention", "s/iter", "min-max", "ratio to dense"]
    return (
        f"Sparse Transformer Table 2 on effattn ({result['machine']['name']}, "
        f"context {result['context']})\n\n"
        + common.markdown_table(headers + ["paper's ratio (time/iter)"], rows)
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="context <= 2048, 3 iterations")
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--backend", default="auto", help="effattn backend (default: the device's)")
    args = ap.parse_args(argv)
    try:
        result = run(args.device, args.quick, args.context, backend=args.backend)
    except common.BackendMissing as e:
        raise SystemExit(str(e)) from None
    print(table(result))
    out = common.write_json(result, common.result_path(FAMILY, args.device, args.quick))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Walk-through: a character-level language model with Sparse Transformer attention.

The model is written with plain ``nn.MultiheadAttention``; one line turns it sparse:

    replace_attention(model, patterns.strided(16))

Run (CPU or GPU, unchanged; about a minute or two on a small CPU):

    python examples/char_lm.py                   # strided heads (the default)
    python examples/char_lm.py --attn fixed      # fixed heads (window + summary columns)
    python examples/char_lm.py --attn dense      # nn.MultiheadAttention, the baseline

It prints a progress bar with the loss and the time per step, then the held-out loss and a
short greedy sample. The text is generated here (no download): sentences about people that are
introduced once and referred back to later, so that far positions matter.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import torch
from torch import nn

from effattn import patterns
from effattn.nn import replace_attention

NAMES = ["ada", "alan", "grace", "edsger", "barbara", "donald", "frances", "ken", "radia"]
PLACES = ["paris", "lisbon", "oslo", "quito", "kyoto", "accra", "lima", "perth", "riga"]
THINGS = ["a compiler", "a proof", "a kernel", "a parser", "a network", "a theorem", "a chip"]
VERBS = ["wrote", "found", "built", "checked", "sketched", "fixed", "tested"]


def make_text(n_chars: int, seed: int = 0) -> str:
    """Paragraphs: each introduces a person, a place and a thing, then refers back to them."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        who, where, what = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS)
        verb = rng.choice(VERBS)
        para = [f"{who} lived in {where}.", f"one day {who} {verb} {what}."]
        for _ in range(rng.randint(1, 3)):
            other = rng.choice(NAMES)
            para.append(
                f"{other} {rng.choice(VERBS)} {rng.choice(THINGS)} in {rng.choice(PLACES)}."
            )
        para.append(f"so {what} from {where} was by {who}.\n")
        text = " ".join(para)
        parts.append(text)
        size += len(text)
    return "".join(parts)[:n_chars]


class Block(nn.Module):
    """Pre-norm Transformer block: causal self-attention, then an MLP."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] token ids -> logits [B, T, vocab]."""
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        # True = not allowed: the sparse modules recognise this exact mask as the causal
        # constraint and apply it analytically (no [T, T] pattern is built).
        causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).triu(1)
        for block in self.blocks:
            x = block(x, causal)
        return self.head(self.ln(x))


class Progress:
    """A one-line progress bar (carriage return updates)."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = total, enabled, width

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        done = self.width * step // self.total
        bar = "#" * done + "-" * (self.width - done)
        print(f"\r[{bar}] {step}/{self.total} {text}", end="", flush=True)

    def close(self) -> None:
        if self.enabled:
            print(flush=True)


def pick_pattern(args) -> patterns.Pattern | None:
    if args.attn == "strided":
        return patterns.strided(args.stride)
    if args.attn == "fixed":
        return patterns.fixed(args.stride, args.summary, num_patterns=args.num_patterns)
    return None


def batches(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    while True:
        start = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
        rows = torch.stack([data[s : s + seq_len + 1] for s in start.tolist()])
        yield rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def sample(model: CharLM, prompt: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    idx = prompt
    for _ in range(n):
        logits = model(idx[:, -seq_len:])[:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attn", choices=["strided", "fixed", "dense"], default="strided")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--stride", type=int, default=16, help="l: window and column spacing")
    p.add_argument("--summary", type=int, default=4, help="c: summary columns (fixed)")
    p.add_argument("--num-patterns", type=int, default=1, help="summary sets across heads")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default="auto", help="effattn backend (auto picks by device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sample", type=int, default=80, help="characters to generate at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="only print the summary")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    text = make_text(200_000, seed=args.seed)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * data.numel())
    train, held_out = data[:split], data[split:]

    model = CharLM(len(chars), args.seq_len, args.d_model, args.heads, args.layers)
    pattern = pick_pattern(args)
    if pattern is not None:
        replace_attention(model, pattern, backend=args.backend)  # the one-line swap
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    name = args.attn if pattern is None else pattern.name
    print(
        f"{name}: {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters, "
        f"seq_len {args.seq_len}, batch {args.batch}, on {device}"
    )

    gen = torch.Generator().manual_seed(args.seed)
    stream = batches(train, args.batch, args.seq_len, gen)
    loss_fn = nn.CrossEntropyLoss()
    bar = Progress(args.steps, enabled=not args.no_progress)
    losses, times = [], []
    for step in range(1, args.steps + 1):
        x, y = (t.to(device) for t in next(stream))
        start = time.perf_counter()
        loss = loss_fn(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        recent = times[-20:]
        bar.update(step, f"loss {losses[-1]:.3f} | {1e3 * sum(recent) / len(recent):.1f} ms/step")
    bar.close()

    model.eval()
    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        eval_stream = batches(held_out, args.batch, args.seq_len, eval_gen)
        eval_loss = (
            sum(
                loss_fn(model(x.to(device)).flatten(0, 1), y.to(device).flatten()).item()
                for x, y in (next(eval_stream) for _ in range(4))
            )
            / 4
        )
    ms = 1e3 * sum(times[1:] or times) / len(times[1:] or times)  # step 1 builds layouts
    print(
        f"{name}: train loss {losses[-1]:.3f}, held-out loss {eval_loss:.3f}, "
        f"{ms:.1f} ms/step over {args.steps} steps"
    )
    if args.sample > 0:
        prompt = held_out[: args.seq_len // 2].view(1, -1).to(device)
        out = sample(model, prompt, args.sample, args.seq_len)[0, prompt.shape[1] :]
        print("sample:", repr("".join(chars[i] for i in out.tolist())))
    return {
        "attn": args.attn,
        "steps": args.steps,
        "losses": losses,
        "ms_per_step": ms,
        "eval_loss": eval_loss,
    }


if __name__ == "__main__":
    main(sys.argv[1:])

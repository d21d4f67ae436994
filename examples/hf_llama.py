"""Walk-through: a Hugging Face Llama-style model trained with Sparse Transformer attention.

The model is transformers' own LlamaForCausalLM, built from a config (random weights, nothing
downloaded). Two lines make its attention effattn's strided pattern:

    effattn.integrations.transformers.register("effattn-strided", patterns.strided(16))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="effattn-strided")

Run (CPU or GPU, unchanged; needs `pip install 'effattn[transformers]'`; about a minute on a
small CPU):

    python examples/hf_llama.py                  # strided, then the dense baseline ("sdpa")
    python examples/hf_llama.py --attn strided   # only one of them (or --attn dense)

Each run prints a progress bar with the loss and the time per step; the end shows the held-out
loss of every run side by side, and a greedy sample from model.generate() (transformers' cache;
the new tokens go through effattn with one query row each). The text is the character-level
corpus of examples/char_lm.py: people introduced once and referred back to later.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import effattn.integrations.transformers
from effattn import patterns

sys.path.insert(0, str(Path(__file__).resolve().parent))
from char_lm import Progress, batches, make_text  # noqa: E402


def train(args, attn: str, data: dict) -> dict:
    """Train one model with ``attn`` ("strided" or "dense") and return its losses."""
    if attn == "strided":
        impl = effattn.integrations.transformers.register(
            "effattn-strided", patterns.strided(args.stride), backend=args.backend
        )
    else:
        impl = "sdpa"
    config = LlamaConfig(
        vocab_size=len(data["chars"]),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
        attention_dropout=0.0,  # effattn's kernels have no attention dropout yet
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(args.seed)  # the same initial weights for every attention
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    name = f"{attn} ({impl})"
    print(
        f"{name}: {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters, "
        f"seq_len {args.seq_len}, batch {args.batch}, on {device}"
    )
    stream = batches(data["train"], args.batch, args.seq_len, torch.Generator().manual_seed(1))
    bar = Progress(args.steps, enabled=not args.no_progress)
    model.train()
    losses, times = [], []
    for step in range(1, args.steps + 1):
        x, _ = next(stream)
        x = x.to(device)
        start = time.perf_counter()
        loss = model(x, labels=x, use_cache=False).loss  # transformers shifts the labels
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
    held = batches(data["held_out"], args.batch, args.seq_len, torch.Generator().manual_seed(2))
    with torch.no_grad():
        eval_loss = (
            sum(
                model(x.to(device), labels=x.to(device)).loss.item()
                for x, _ in (next(held) for _ in range(4))
            )
            / 4
        )
        sample = ""
        if args.sample > 0:
            prompt = data["held_out"][: args.seq_len // 2].view(1, -1).to(device)
            out = model.generate(prompt, max_new_tokens=args.sample, do_sample=False)
            sample = "".join(data["chars"][i] for i in out[0, prompt.shape[1] :].tolist())
    ms = 1e3 * sum(times[1:] or times) / len(times[1:] or times)  # step 1 builds layouts
    return {"name": name, "losses": losses, "eval_loss": eval_loss, "ms": ms, "sample": sample}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attn", choices=["both", "strided", "dense"], default="both")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="grouped-query attention")
    p.add_argument("--stride", type=int, default=16, help="l of strided(l)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default="auto", help="effattn backend (auto picks by device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sample", type=int, default=60, help="characters to generate at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="only print the summary")
    args = p.parse_args(argv)

    text = make_text(200_000, seed=args.seed)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * ids.numel())
    data = {"chars": chars, "train": ids[:split], "held_out": ids[split:]}

    attns = ["strided", "dense"] if args.attn == "both" else [args.attn]
    runs = [train(args, attn, data) for attn in attns]
    print(f"\n{'attention':<28} {'train loss':>10} {'held-out':>9} {'ms/step':>8}")
    for r in runs:
        print(f"{r['name']:<28} {r['losses'][-1]:>10.3f} {r['eval_loss']:>9.3f} {r['ms']:>8.1f}")
    for r in runs:
        if r["sample"]:
            print(f"sample, {r['name']}: {r['sample']!r}")
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])

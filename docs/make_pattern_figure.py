"""Draw docs/patterns.png: element masks of the built-in patterns (Sparse Transformer's, column
and axial, two DeepSpeed configs) with their blocks.

Run: python docs/make_pattern_figure.py  (needs matplotlib: pip install 'effattn[plot]')
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from effattn import patterns  # noqa: E402
from effattn.compat import deepspeed  # noqa: E402

PANELS = [
    (patterns.strided(16), 0, "strided(16)"),
    (patterns.fixed(16, 4), 0, "fixed(16, 4)"),
    (patterns.fixed(16, 4, num_patterns=2), 1, "fixed(16, 4, num_patterns=2), head 1"),
    (patterns.local(24, causal=False), 0, "local(24, causal=False)"),
    (patterns.column(16), 0, "column(16)"),
    (patterns.axial(16), 0, "axial(16): an image 16 wide"),
    (
        deepspeed.FixedSparsityConfig(1, num_local_blocks=2, attention="unidirectional").pattern(),
        0,
        "DeepSpeed Fixed, unidirectional\n(block 16, 2-block windows)",
    ),
    (deepspeed.BigBirdSparsityConfig(1).pattern(seed=0), 0, "DeepSpeed BigBird (block 16)"),
]


def main() -> None:
    cols = 4
    rows = -(-len(PANELS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.9 * rows), dpi=110)
    for ax, (pattern, head, title) in zip(axes.flat, PANELS, strict=True):
        density = pattern.density(128, 128, max(head + 1, pattern.head_divisor))
        pattern.plot(128, 16, head=head, ax=ax, title=f"{title}\ndensity {density:.2f}")
    fig.suptitle(
        "n = 128, blocks of 16: dark = allowed; shaded blocks are visited: blue full, orange partial",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out = Path(__file__).with_name("patterns.png")
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Draw docs/patterns.png: element masks of the Sparse Transformer patterns with their blocks.

Run: python docs/make_pattern_figure.py  (needs matplotlib: pip install 'effattn[plot]')
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from effattn import patterns  # noqa: E402

PANELS = [
    (patterns.strided(16), 0, "strided(16)"),
    (patterns.fixed(16, 4), 0, "fixed(16, 4)"),
    (patterns.fixed(16, 4, num_patterns=2), 1, "fixed(16, 4, num_patterns=2), head 1"),
    (patterns.local(24, causal=False), 0, "local(24, causal=False)"),
]


def main() -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 4.3), dpi=110)
    for ax, (pattern, head, title) in zip(axes, PANELS, strict=True):
        density = pattern.density(128, 128, max(head + 1, pattern.head_divisor))
        pattern.plot(128, 16, head=head, ax=ax, title=f"{title}\ndensity {density:.2f}")
    fig.suptitle(
        "n = 128, blocks of 16: dark = allowed; shaded blocks are visited: blue full, orange partial",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out = Path(__file__).with_name("patterns.png")
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

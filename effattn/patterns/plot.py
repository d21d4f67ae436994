"""Pictures of patterns: the element mask of one head with its block grid (needs matplotlib)."""

from __future__ import annotations

__all__ = ["plot"]


def plot(
    pattern,
    n: int = 256,
    block: int = 32,
    *,
    n_k: int | None = None,
    head: int = 0,
    path: str | None = None,
    ax=None,
    title: str | None = None,
):
    """Draw the element mask of one head of ``pattern`` with its block grid.

    Visited blocks are shaded (full blue, partial orange). n queries against ``n_k`` keys
    (default n), blocks of ``block`` x ``block``. Saves a PNG when ``path`` is given; returns
    the matplotlib Axes (drawn into ``ax`` when given).
    """
    try:
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ImportError("plotting patterns needs matplotlib: pip install 'effattn[plot]'") from e
    n_k = n if n_k is None else n_k
    heads = max(head + 1, pattern.head_divisor)
    heads += (-heads) % pattern.head_divisor
    m = pattern.mask(n, n_k, heads)[head if pattern.period > 1 else 0]
    lay = pattern.layout(n, n_k, block, block)
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(4, 4 * n / max(n_k, 1)), dpi=150)
    ax.imshow(m.numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1.6)
    c = head % lay.num_classes
    for num, idx, color in (
        (lay.kv_full_num, lay.kv_full_idx, "tab:blue"),
        (lay.kv_part_num, lay.kv_part_idx, "tab:orange"),
    ):
        for qb in range(lay.num_q_blocks):
            for kb in idx[c, qb, : int(num[c, qb])].tolist():
                xy = (kb * block - 0.5, qb * block - 0.5)
                ax.add_patch(
                    Rectangle(xy, block, block, facecolor=color, alpha=0.25, edgecolor="none")
                )
    for x in range(0, n_k + 1, block):
        ax.axvline(x - 0.5, color="0.7", lw=0.3)
    for y in range(0, n + 1, block):
        ax.axhline(y - 0.5, color="0.7", lw=0.3)
    ax.set_title(title or f"{pattern.name}: density {m.float().mean():.3f}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if own and path is not None:
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    return ax

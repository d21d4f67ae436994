"""CUDA C++ kernels (backend "cuda"): argument checks, layout packing, launch geometry, launches.

The kernels live in ``csrc/cuda`` and are compiled into ``effattn._C`` when the package is built
with ``EFFATTN_CUDA=1``. They implement the backend contracts of
:mod:`effattn.ops.torch_sparse` (block-sparse attention over one part of a plan) and
:mod:`effattn.ops.torch_xl` (Transformer-XL attention) with tensor-core ``mma.sync`` for sm_80
and later: fp16 and bf16 inputs, fp32 accumulation, head dims 64 and 128 (smaller head dims are
zero-padded to 64 or 128 here, larger ones refused).

The extension takes raw device addresses, element strides, dtype codes and the current stream's
handle (it never sees a tensor), so everything is validated here before a launch: device,
dtype, head dim, strides and 16-byte alignment (the kernels copy rows 16 bytes at a time), grid
limits. The host-side logic is made of pure functions (:func:`launch_geometry`,
:func:`pack_layout`, :func:`sparse_params`, ...) that the tests exercise without a GPU; the
tests also run the kernels themselves on the CPU through the emulator of ``csrc/cuda/emu``,
which is why the launch helpers take the module to call (``effattn._C`` or the emulator). Its
parameter classes (``CudaSparseParams``, ``CudaXlParams``, ``CudaLaunch``) take keyword
arguments only and refuse a missing required field or an unknown one (TypeError), so the
keywords that :func:`sparse_params` and :func:`xl_params` return are checked at every launch.

``backend="auto"`` never picks this backend (see :mod:`effattn.functional`): it is chosen only
by name until a GPU session has run tests/test_cuda.py green.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch

from effattn import _extension
from effattn.patterns import BlockLayout, Term

__all__ = [
    "BLOCK",
    "HEAD_DIMS",
    "check",
    "launch_geometry",
    "pack_layout",
    "padded_head_dim",
    "plan_blocks",
    "smem_bytes",
    "sparse_backward",
    "sparse_forward",
    "sparse_params",
    "xl_backward",
    "xl_check",
    "xl_diagonals",
    "xl_forward",
    "xl_params",
]

# Query and key block of every sparse kernel (the layouts must be built for BLOCK x BLOCK).
BLOCK = 64
# Head dims the kernels are compiled for; smaller ones are zero-padded to the next.
HEAD_DIMS = (64, 128)
_DTYPES = (torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535

# Threads per block of each kernel (the kThreads of its struct in csrc/cuda/*.cuh; the launchers
# reject any other value). The kernel named "x" has the entry point effattn_x<E, D>.
KERNELS = {
    "sparse_fwd": 128,
    "sparse_bwd_dq": 128,
    "sparse_bwd_dkdv": 128,
    "xl_fwd": 128,
    "xl_bwd_dkdv": 256,
    "xl_bwd_dq": 256,
    "xl_bwd_dr": 256,
}


# --------------------------------------------------------------------------- pure host logic
def padded_head_dim(head_dim: int) -> int:
    """The compiled head dim (64 or 128) that serves ``head_dim``; ValueError above 128."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    for d in HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(
        f"the cuda backend takes head dims up to {HEAD_DIMS[-1]} (padded to one of {HEAD_DIMS}), "
        f"got D={head_dim}; use backend='triton'"
    )


def _tile_bytes(head_dim: int) -> int:
    # A 64-row tile of 16-bit elements, rows padded by 8 elements (see csrc/cuda/warp_mma.cuh).
    return BLOCK * (head_dim + 8) * 2


def smem_bytes(kernel: str, head_dim: int) -> int:
    """Dynamic shared memory of ``kernel`` for a compiled head dim (64 or 128)."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    tile = _tile_bytes(head_dim)
    if kernel == "sparse_fwd":  # Q, 2 x K, 2 x V, 2 x 64 key flags
        return 5 * tile + 2 * BLOCK
    if kernel == "sparse_bwd_dq":  # Q, dO, 2 x K, 2 x V, 2 x 64 key flags
        return 6 * tile + 2 * BLOCK
    if kernel == "sparse_bwd_dkdv":
        # K, V, 2 x Q, 2 x dO; 2 x 64 lse and delta (fp32); 2 x 64 row and key flags; 2 x 4 int32
        return 6 * tile + 2 * 2 * BLOCK * 4 + 2 * 2 * BLOCK + 2 * 4 * 4
    band = 2 * _tile_bytes(head_dim)  # the 128 rows of r a 64 x 64 tile's distances span
    if kernel == "xl_fwd":  # q + u, q + vb, K, V; band; fp32 band scratch of 4 warps, 16 x 84
        return 4 * tile + band + 4 * 16 * 84 * 4
    # Backward: q + u, q + vb, dO, K, V; band; fp32 scratch of 8 warps (16 x 52); 64 lse and
    # delta (fp32), 64 row flags; dkdv also 4 x 64 fp32 column sums.
    base = 5 * tile + band + 8 * 16 * 52 * 4 + 2 * BLOCK * 4 + BLOCK
    if kernel in ("xl_bwd_dq", "xl_bwd_dr"):
        return base
    if kernel == "xl_bwd_dkdv":
        return base + 4 * BLOCK * 4
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {sorted(KERNELS)}")


def xl_diagonals(n_q: int, n_k: int, window: int | None) -> tuple[int, int]:
    """(first, count) of the block diagonals (query block - key block) the XL dr kernel visits.

    Tiles of diagonal e read the band of distances M + 64 e - 63 .. M + 64 e + 63
    (M = n_k - n_q); the diagonals are those whose band meets the allowed distances
    0 .. window - 1 and that hold at least one tile.
    """
    nqb, nkb = -(-n_q // BLOCK), -(-n_k // BLOCK)
    mem = n_k - n_q
    win = n_k if window is None else min(window, n_k)
    first = max(-(nkb - 1), -((mem + BLOCK - 1) // BLOCK))
    last = min(nqb - 1, (win - 1 - mem + BLOCK - 1) // BLOCK)
    return first, max(0, last - first + 1)


def fold_bands(parts: torch.Tensor, base: int, n_r: int) -> torch.Tensor:
    """Sum per-diagonal band rows into per-distance rows of r: [B, H, n_diag, 2 BLOCK, ...] ->
    [H, n_r, ...], the trailing dims (D for dr, none for the band sums of dS) summed alike.

    Band row t of diagonal p holds distance base + BLOCK p + t, so the bands of adjacent
    diagonals share BLOCK distances; a tile spans 2 BLOCK - 1 of them, so row 2 BLOCK - 1 is
    always zero. Rows at negative distances are dropped (they hold masked zeros); distances
    >= n_r - 1 all go to row n_r - 1, as they all read r[n_r - 1] (clamp_len).
    """
    parts = parts.sum(0)
    h, n_diag = parts.shape[:2]
    rest = parts.shape[3:]
    by_dist = parts.new_zeros(h, n_diag + 1, BLOCK, *rest)
    by_dist[:, :n_diag] += parts[:, :, :BLOCK]
    by_dist[:, 1:] += parts[:, :, BLOCK:]
    by_dist = by_dist.reshape(h, (n_diag + 1) * BLOCK, *rest)[:, max(0, -base) :]
    first = max(0, base)
    out = parts.new_zeros(h, n_r, *rest)
    exact = max(0, min(n_r - 1 - first, by_dist.shape[1]))
    out[:, first : first + exact] = by_dist[:, :exact]
    out[:, n_r - 1] += by_dist[:, exact:].sum(1)
    return out


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Launch of one kernel: grid (grid_x, grid_y), threads per block, dynamic shared memory."""

    grid_x: int
    grid_y: int
    threads: int
    smem_bytes: int


def launch_geometry(
    kernel: str,
    *,
    head_dim: int,
    batch: int,
    heads: int,
    kv_heads: int,
    n_q: int,
    n_k: int,
    window: int | None = None,
) -> Geometry:
    """Grid, threads and shared memory of a kernel launch.

    Args:
        kernel: one of KERNELS ("sparse_fwd", "sparse_bwd_dq", "sparse_bwd_dkdv", "xl_fwd",
            "xl_bwd_dkdv", "xl_bwd_dq", "xl_bwd_dr").
        head_dim: the compiled head dim (64 or 128).
        batch, heads, kv_heads: B, H and Hkv.
        n_q, n_k: query rows and keys (for XL: L and M + L).
        window: the XL window (None: unlimited); only xl_bwd_dr depends on it.

    Forward and dq kernels run one block per (query block, batch x head), dk / dv kernels one
    per (key block, batch x kv head), the XL dr kernel one per (block diagonal, batch x head);
    the second grid axis is limited to 65535.
    """
    for name, value in (
        ("batch", batch),
        ("heads", heads),
        ("kv_heads", kv_heads),
        ("n_q", n_q),
        ("n_k", n_k),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    if kernel in ("sparse_fwd", "sparse_bwd_dq", "xl_fwd", "xl_bwd_dq"):
        grid = (-(-n_q // BLOCK), batch * heads)
    elif kernel in ("sparse_bwd_dkdv", "xl_bwd_dkdv"):
        grid = (-(-n_k // BLOCK), batch * kv_heads)
    elif kernel == "xl_bwd_dr":
        grid = (xl_diagonals(n_q, n_k, window)[1], batch * heads)
    else:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {sorted(KERNELS)}")
    if grid[1] > _MAX_GRID_Y:
        raise ValueError(
            f"{kernel}: batch x heads = {grid[1]} exceeds the {_MAX_GRID_Y} blocks of a CUDA "
            "grid's second axis; split the batch"
        )
    return Geometry(grid[0], grid[1], KERNELS[kernel], smem_bytes(kernel, head_dim))


@dataclasses.dataclass(frozen=True, eq=False)
class PackedLayout:
    """A BlockLayout as the kernels read it: contiguous int32 (tiles uint8) on one device."""

    kv_full_num: torch.Tensor
    kv_full_idx: torch.Tensor
    kv_part_num: torch.Tensor
    kv_part_idx: torch.Tensor
    kv_part_tile: torch.Tensor | None
    q_full_num: torch.Tensor
    q_full_idx: torch.Tensor
    q_part_num: torch.Tensor
    q_part_idx: torch.Tensor
    q_part_tile: torch.Tensor | None
    terms: torch.Tensor | None  # int32 [P, T, Term.NUM_FIELDS]
    tiles: torch.Tensor | None  # uint8 [U, 64, 64]
    num_classes: int
    num_q_blocks: int
    num_k_blocks: int
    q_offset: int

    def tensors(self) -> list[torch.Tensor]:
        return [
            t
            for f in dataclasses.fields(self)
            if isinstance(t := getattr(self, f.name), torch.Tensor)
        ]


_PACKED: weakref.WeakKeyDictionary[BlockLayout, PackedLayout] = weakref.WeakKeyDictionary()


def pack_layout(layout: BlockLayout, device: torch.device | str | None = None) -> PackedLayout:
    """Check a layout against what the kernels read and bring it to ``device`` (cached).

    Raises ValueError unless the layout has 64 x 64 blocks, exactly one of terms / tiles, and
    index tensors of the shapes BlockLayout documents.
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(
            f"layout must be an effattn.patterns.BlockLayout, got {type(layout).__name__}"
        )
    device = torch.device(device) if device is not None else layout.kv_full_num.device
    cached = _PACKED.get(layout)
    if cached is not None and cached.kv_full_num.device == device:
        return cached
    if (layout.block_m, layout.block_n) != (BLOCK, BLOCK):
        raise ValueError(
            f"the cuda kernels read {BLOCK} x {BLOCK} blocks, got a layout with "
            f"{layout.block_m} x {layout.block_n}"
        )
    if (layout.terms is None) == (layout.tiles is None):
        raise ValueError("a layout needs exactly one of terms and tiles")
    p, nqb, nkb = layout.num_classes, layout.num_q_blocks, layout.num_k_blocks

    def int32(name: str, shape0: tuple[int, ...]) -> torch.Tensor:
        t = getattr(layout, name)
        if t.dim() != len(shape0) + (0 if name.endswith("_num") else 1):
            raise ValueError(f"layout.{name} has shape {tuple(t.shape)}")
        if tuple(t.shape[: len(shape0)]) != shape0:
            raise ValueError(f"layout.{name} has shape {tuple(t.shape)}, expected {shape0} + ...")
        if not name.endswith("_num") and t.shape[-1] < 1:
            raise ValueError(f"layout.{name} has no columns")
        return t.to(device=device, dtype=torch.int32).contiguous()

    packed = dict(
        kv_full_num=int32("kv_full_num", (p, nqb)),
        kv_full_idx=int32("kv_full_idx", (p, nqb)),
        kv_part_num=int32("kv_part_num", (p, nqb)),
        kv_part_idx=int32("kv_part_idx", (p, nqb)),
        q_full_num=int32("q_full_num", (p, nkb)),
        q_full_idx=int32("q_full_idx", (p, nkb)),
        q_part_num=int32("q_part_num", (p, nkb)),
        q_part_idx=int32("q_part_idx", (p, nkb)),
        kv_part_tile=None,
        q_part_tile=None,
        terms=None,
        tiles=None,
    )
    if layout.tiles is not None:
        if tuple(layout.tiles.shape[1:]) != (BLOCK, BLOCK) or layout.tiles.dtype != torch.bool:
            raise ValueError(f"layout.tiles must be bool [U, {BLOCK}, {BLOCK}]")
        packed["tiles"] = layout.tiles.to(device).contiguous().view(torch.uint8)
        packed["kv_part_tile"] = int32("kv_part_tile", (p, nqb))
        packed["q_part_tile"] = int32("q_part_tile", (p, nkb))
    else:
        terms = layout.terms
        width = Term.NUM_FIELDS
        if terms.dim() != 3 or terms.shape[0] != p or terms.shape[2] != width or terms.shape[1] < 1:
            raise ValueError(
                f"layout.terms must be [P={p}, T >= 1, {width}], got {tuple(terms.shape)}"
            )
        packed["terms"] = terms.to(device=device, dtype=torch.int32).contiguous()
    result = PackedLayout(
        **packed,
        num_classes=p,
        num_q_blocks=nqb,
        num_k_blocks=nkb,
        q_offset=layout.q_offset,
    )
    _PACKED[layout] = result
    return result


def key_mask_strides(key_mask: torch.Tensor | None, batch: int, heads: int, n_k: int):
    """(uint8 view of the key mask expanded to [B, H, n_k], its element strides) or (None, 0s).

    ``key_mask`` is bool, broadcastable to [B, H, n_k], True = key hidden; broadcast dims get
    stride 0, so the kernels read the caller's tensor without a copy.
    """
    if key_mask is None:
        return None, (0, 0, 0)
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        raise TypeError(
            f"key_mask must be a bool tensor, got {getattr(key_mask, 'dtype', key_mask)}"
        )
    try:
        km = key_mask.expand(batch, heads, n_k)
    except RuntimeError:
        raise ValueError(
            f"key_mask of shape {tuple(key_mask.shape)} does not broadcast to [B, H, n_k] = "
            f"{[batch, heads, n_k]}"
        ) from None
    strides = tuple(0 if km.shape[i] == 1 else km.stride(i) for i in range(3))
    return km.view(torch.uint8), strides


def _rows_aligned(t: torch.Tensor) -> bool:
    """Rows of 16-bit elements the kernels can copy 16 bytes at a time."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return False
    if t.data_ptr() % 16:
        return False
    return all(t.stride(i) % 8 == 0 for i in range(t.dim() - 1) if t.shape[i] > 1)


def prepare_rows(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``t`` [..., D] as the kernels read it: zero-padded to ``head_dim`` and 16-byte aligned.

    Returns ``t`` itself when it already qualifies, else a contiguous copy.
    """
    if t.shape[-1] != head_dim:
        return torch.nn.functional.pad(t, (0, head_dim - t.shape[-1])).contiguous()
    if _rows_aligned(t):
        return t
    t = t.contiguous()
    return t if _rows_aligned(t) else t.clone()


@functools.cache
def _dtype_code(dtype: torch.dtype) -> int:
    """The extension's code (csrc/constants.h) of fp16 or bf16."""
    return _extension.require().DTYPE_CODES[str(dtype).removeprefix("torch.")]


def sparse_params(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PackedLayout,
    scale: float,
    key_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    dout: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
) -> dict:
    """The keyword arguments of ``CudaSparseParams`` (csrc/cuda/params.h) for these tensors;
    the buffers a direction does not use are left out.

    Args:
        q: [B, H, n_q, Dp]; k, v: [B, Hkv, n_k, Dp] (fp16 / bf16, rows as prepare_rows leaves
            them); out, dout: [B, H, n_q, Dp] like q.
        layout: the part's packed 64 x 64 layout.
        scale: score scale.
        key_mask: None or bool broadcastable to [B, H, n_k] (True = hidden).
        lse, delta: fp32 contiguous [B, H, n_q]; dq fp32 contiguous [B, H, n_q, Dp];
            dk, dv fp32 contiguous [B, Hkv, n_k, Dp].
    """
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    fields = dict(
        batch=b,
        heads=h,
        kv_heads=h_kv,
        n_q=n_q,
        n_k=n_k,
        q_offset=layout.q_offset,
        head_dim=d,
        num_classes=layout.num_classes,
        num_q_blocks=layout.num_q_blocks,
        num_k_blocks=layout.num_k_blocks,
        dtype=_dtype_code(q.dtype),
        scale=float(scale),
        scale_log2=float(scale) * _LOG2E,
        max_kv_full=layout.kv_full_idx.shape[-1],
        max_kv_part=layout.kv_part_idx.shape[-1],
        max_q_full=layout.q_full_idx.shape[-1],
        max_q_part=layout.q_part_idx.shape[-1],
    )
    km, km_strides = key_mask_strides(key_mask, b, h, n_k)
    if km is not None:
        fields.update(
            key_mask=km.data_ptr(), km_sb=km_strides[0], km_sh=km_strides[1], km_sn=km_strides[2]
        )
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out), ("do", dout)):
        if t is not None:
            fields.update(
                {f"{name}_sb": t.stride(0), f"{name}_sh": t.stride(1), f"{name}_sn": t.stride(2)}
            )
    buffers = dict(q=q, k=k, v=v, out=out, dout=dout, lse=lse, delta=delta, dq=dq, dk=dk, dv=dv)
    for name in ("kv_full_num", "kv_full_idx", "kv_part_num", "kv_part_idx"):
        buffers[name] = getattr(layout, name)
    for name in ("q_full_num", "q_full_idx", "q_part_num", "q_part_idx"):
        buffers[name] = getattr(layout, name)
    if layout.tiles is not None:
        buffers.update(
            tiles=layout.tiles, kv_part_tile=layout.kv_part_tile, q_part_tile=layout.q_part_tile
        )
    else:
        buffers["terms"] = layout.terms
        fields["num_terms"] = layout.terms.shape[1]
    fields.update({name: t.data_ptr() for name, t in buffers.items() if t is not None})
    return fields


# --------------------------------------------------------------------------- launching
def _span(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the memory a view can reach."""
    if t.numel() == 0:
        return t.data_ptr(), 0
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 1)
    return t.data_ptr(), (last + 1) * t.element_size()


def _launch(lib, name: str, fields: dict, geometry: Geometry, stream: int, tensors) -> None:
    """Build the parameter block from ``fields`` and call ``lib.<name>(params, launch)``.

    ``lib`` is effattn._C, or the host emulator of the tests, which also wants the buffers the
    launch may touch (``emulator_ranges``) to bounds-check every access.
    """
    params = (lib.CudaXlParams if name.startswith("cuda_xl") else lib.CudaSparseParams)(**fields)
    launch = lib.CudaLaunch(
        grid_x=geometry.grid_x,
        grid_y=geometry.grid_y,
        threads=geometry.threads,
        smem_bytes=geometry.smem_bytes,
        stream=stream,
    )
    if hasattr(lib, "emulator_ranges"):
        lib.emulator_ranges([_span(t) for t in tensors if t is not None])
    getattr(lib, name)(params, launch)


def _check_layout_size(layout: BlockLayout, q: torch.Tensor, k: torch.Tensor) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if (layout.n_q, layout.n_k) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"the layout is for n_q={layout.n_q}, n_k={layout.n_k}; the tensors have "
            f"n_q={q.shape[2]}, n_k={k.shape[2]}"
        )


def _check_like_q(q: torch.Tensor, **tensors: torch.Tensor) -> None:
    """The kernels read every 16-bit input with q's element type, on q's device."""
    for name, t in tensors.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def _sizes(q, k) -> dict:
    b, h, n_q, _ = q.shape
    return dict(batch=b, heads=h, kv_heads=k.shape[1], n_q=n_q, n_k=k.shape[2])


def run_sparse_forward(lib, stream: int, q, k, v, layout: BlockLayout, *, scale, key_mask=None):
    """Forward of one part through ``lib`` (effattn._C or the emulator). Arguments as
    :func:`sparse_forward`, with the 64 x 64 layout itself instead of ``layout_fn``."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    dp = padded_head_dim(d)
    if q.numel() == 0 or n_k == 0:
        out = torch.zeros(b, h, n_q, d, dtype=q.dtype, device=q.device)
        return out, torch.full((b, h, n_q), float("-inf"), device=q.device)
    out = torch.empty(b, h, n_q, dp, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    _check_layout_size(layout, q, k)
    _check_like_q(q, k=k, v=v)
    qp, kp, vp = (prepare_rows(t, dp) for t in (q, k, v))
    packed = pack_layout(layout, q.device)
    fields = sparse_params(
        q=qp, k=kp, v=vp, layout=packed, scale=scale, key_mask=key_mask, out=out, lse=lse
    )
    geometry = launch_geometry("sparse_fwd", head_dim=dp, **_sizes(q, k))
    tensors = [qp, kp, vp, out, lse, *packed.tensors()]
    if key_mask is not None:
        tensors.append(key_mask)
    _launch(lib, "cuda_sparse_forward", fields, geometry, stream, tensors)
    return (out if dp == d else out[..., :d].contiguous()), lse


def run_sparse_backward(
    lib, stream: int, q, k, v, dout, lse, delta, layout: BlockLayout, *, scale, key_mask=None
):
    """Backward of one part through ``lib``. Arguments as :func:`sparse_backward`, with the
    64 x 64 layout itself instead of ``layout_fn``."""
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    dp = padded_head_dim(d)
    if q.numel() == 0 or k.numel() == 0:
        zeros = lambda *shape: torch.zeros(*shape, d, dtype=torch.float32, device=q.device)
        return zeros(b, h, n_q), zeros(b, h_kv, n_k), zeros(b, h_kv, n_k)
    dq = torch.empty(b, h, n_q, dp, dtype=torch.float32, device=q.device)
    dk = torch.empty(b, h_kv, n_k, dp, dtype=torch.float32, device=q.device)
    dv = torch.empty(b, h_kv, n_k, dp, dtype=torch.float32, device=q.device)
    _check_layout_size(layout, q, k)
    _check_like_q(q, k=k, v=v, dout=dout)
    qp, kp, vp, dop = (prepare_rows(t, dp) for t in (q, k, v, dout))
    lse = lse.to(torch.float32).contiguous()
    delta = delta.to(torch.float32).contiguous()
    packed = pack_layout(layout, q.device)
    fields = sparse_params(
        q=qp, k=kp, v=vp, layout=packed, scale=scale, key_mask=key_mask, lse=lse, dout=dop,
        delta=delta, dq=dq, dk=dk, dv=dv,
    )  # fmt: skip
    tensors = [qp, kp, vp, dop, lse, delta, dq, dk, dv, *packed.tensors()]
    if key_mask is not None:
        tensors.append(key_mask)
    sizes = _sizes(q, k)
    for kernel, name in (("sparse_bwd_dq", "cuda_sparse_backward_dq"),
                         ("sparse_bwd_dkdv", "cuda_sparse_backward_dkdv")):  # fmt: skip
        geometry = launch_geometry(kernel, head_dim=dp, **sizes)
        _launch(lib, name, fields, geometry, stream, tensors)
    if dp != d:
        dq, dk, dv = (t[..., :d].contiguous() for t in (dq, dk, dv))
    return dq, dk, dv


def contiguous_rows(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``t`` [..., D] contiguous, zero-padded to ``head_dim`` and 16-byte aligned (XL kernels)."""
    if t.shape[-1] != head_dim:
        t = torch.nn.functional.pad(t, (0, head_dim - t.shape[-1]))
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def xl_params(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    r: torch.Tensor,
    scale: float,
    window: int | None,
    first_diag: int = 0,
    **tensors: torch.Tensor,
) -> dict:
    """The keyword arguments of ``CudaXlParams`` (csrc/cuda/params.h).

    Args:
        q: [B, H, L, Dp]; k: [B, Hkv, N, Dp]; r: [H, R, Dp]; all contiguous (contiguous_rows).
        scale: score scale; window: None or an int >= 1.
        first_diag: block diagonal of the first program of the dr kernel (xl_diagonals).
        tensors: the other buffers by field name (v, u, vb, out, dout, lse, delta, dq, dk, dv,
            colsum, dr_part, w_part), contiguous.
    """
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    fields = dict(
        q=q.data_ptr(),
        k=k.data_ptr(),
        r=r.data_ptr(),
        batch=b,
        heads=h,
        kv_heads=k.shape[1],
        n_q=n_q,
        n_k=n_k,
        n_r=r.shape[1],
        head_dim=d,
        window=n_k if window is None else min(int(window), n_k),
        first_diag=first_diag,
        dtype=_dtype_code(q.dtype),
        scale=float(scale),
        scale_log2=float(scale) * _LOG2E,
    )
    for name, t in tensors.items():
        fields[name] = t.data_ptr()
    return fields


def run_xl_forward(lib, stream: int, q, k, v, r, u, vb, *, scale, window):
    """XL forward through ``lib`` (effattn._C or the emulator); arguments as xl_forward."""
    b, h, n_q, d = q.shape
    if q.numel() == 0:
        return torch.zeros_like(q), torch.full((b, h, n_q), float("-inf"), device=q.device)
    dp = padded_head_dim(d)
    _check_like_q(q, k=k, v=v, r=r, u=u, vb=vb)
    qp, kp, vp, rp, up, vbp = (contiguous_rows(t, dp) for t in (q, k, v, r, u, vb))
    out = torch.empty(b, h, n_q, dp, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    fields = xl_params(
        q=qp, k=kp, r=rp, scale=scale, window=window, v=vp, u=up, vb=vbp, out=out, lse=lse
    )
    geometry = launch_geometry("xl_fwd", head_dim=dp, **_sizes(q, k))
    _launch(lib, "cuda_xl_forward", fields, geometry, stream, [qp, kp, vp, rp, up, vbp, out, lse])
    return (out if dp == d else out[..., :d].contiguous()), lse


def run_xl_backward(lib, stream: int, q, k, v, r, u, vb, out, dout, lse, delta, *, scale, window):
    """XL backward through ``lib``; arguments as xl_backward."""
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    n_r = r.shape[1]
    if q.numel() == 0:
        return tuple(torch.zeros(t.shape, device=t.device) for t in (q, k, v, r, u, vb))
    dp = padded_head_dim(d)
    _check_like_q(q, k=k, v=v, r=r, u=u, vb=vb, dout=dout)
    qp, kp, vp, rp, up, vbp, dop = (contiguous_rows(t, dp) for t in (q, k, v, r, u, vb, dout))
    f32 = dict(dtype=torch.float32, device=q.device)
    lse = lse.to(torch.float32).contiguous()
    delta = delta.to(torch.float32).contiguous()
    dq = torch.empty(b, h, n_q, dp, **f32)
    dk = torch.empty(b, h_kv, n_k, dp, **f32)
    dv = torch.empty(b, h_kv, n_k, dp, **f32)
    colsum = torch.empty(b, h, n_k, **f32)
    first, n_diag = xl_diagonals(n_q, n_k, window)
    dr_part = torch.empty(b * h, n_diag, 2 * BLOCK, dp, **f32)
    w_part = torch.empty(b * h, n_diag, 2 * BLOCK, **f32)
    buffers = dict(v=vp, u=up, vb=vbp, dout=dop, lse=lse, delta=delta, dq=dq, dk=dk, dv=dv)
    buffers.update(colsum=colsum, dr_part=dr_part, w_part=w_part)
    fields = xl_params(q=qp, k=kp, r=rp, scale=scale, window=window, first_diag=first, **buffers)
    tensors = [qp, kp, rp, *buffers.values()]
    sizes = _sizes(q, k)
    for kernel in ("xl_bwd_dkdv", "xl_bwd_dq", "xl_bwd_dr"):
        if kernel == "xl_bwd_dr" and n_diag == 0:
            continue
        geometry = launch_geometry(kernel, head_dim=dp, window=window, **sizes)
        _launch(lib, f"cuda_{kernel.replace('bwd', 'backward')}", fields, geometry, stream, tensors)
    base = (n_k - n_q) - (BLOCK - 1) + BLOCK * first
    dr = fold_bands(dr_part.view(b, h, n_diag, 2 * BLOCK, dp), base, n_r)
    w = fold_bands(w_part.view(b, h, n_diag, 2 * BLOCK), base, n_r)
    # dvb = sum over distances of (sum of dS there) r[clamp(distance)]; du = sum over keys of
    # (sum of dS over queries) k: the position and content halves of dq, summed over rows.
    dvb = torch.einsum("hr,hrd->hd", w, rp.float())
    group = h // h_kv
    du = torch.einsum("bkgn,bknd->kgd", colsum.view(b, h_kv, group, n_k), kp.float())
    grads = (dq, dk, dv, dr, du.reshape(h, dp), dvb)
    return tuple(g if dp == d else g[..., :d].contiguous() for g in grads)


# --------------------------------------------------------------------------- backend contract
def _lib():
    mod = _extension.load()
    if mod is None:
        raise ValueError(f"the cuda backend needs effattn._C: {_extension.load_error}")
    if not getattr(mod, "with_cuda", False):
        raise ValueError(
            "effattn._C was built without its CUDA part: reinstall with EFFATTN_CUDA=1 "
            "(nvcc must be found at build time)"
        )
    return mod


def _check_tensor(q: torch.Tensor) -> None:
    if q.dtype not in _DTYPES:
        raise TypeError(
            f"the cuda backend takes fp16 or bf16 tensors, got {q.dtype}; use backend='triton' "
            "for fp32"
        )
    if q.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors, got tensors on {q.device}")
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 8:
        raise ValueError(
            f"the cuda backend needs compute capability 8.0 or later (mma.sync bf16), "
            f"{torch.cuda.get_device_name(q.device)} has {major}.{minor}"
        )
    padded_head_dim(q.shape[-1])


def _check_smem(q: torch.Tensor, kernels: tuple[str, ...]) -> None:
    """Refuse clearly when the device cannot give a kernel its shared memory (e.g. the 99 KiB
    per block of sm_86 / sm_89 against the 100+ KiB of the D = 128 kernels)."""
    limit = _lib().cuda_max_shared_memory_optin(q.device.index)
    dp = padded_head_dim(q.shape[-1])
    for kernel in kernels:
        need = smem_bytes(kernel, dp)
        if need > limit:
            raise ValueError(
                f"the cuda backend's {kernel} kernel needs {need} bytes of shared memory per "
                f"block for head dim {dp}; {torch.cuda.get_device_name(q.device)} allows "
                f"{limit}; use backend='triton'"
            )


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise for what the CUDA kernels cannot serve (q, k, v already validated together)."""
    _lib()
    _check_tensor(q)
    b, h = q.shape[:2]
    if b * h > _MAX_GRID_Y:
        raise ValueError(
            f"batch x heads = {b * h} exceeds the {_MAX_GRID_Y} blocks of a CUDA grid's second axis"
        )


def plan_blocks(q: torch.Tensor) -> tuple[int, int]:
    """(block_m, block_n) of the forward kernel: 64 x 64 for every head dim."""
    return BLOCK, BLOCK


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def sparse_forward(q, k, v, layout_fn, *, scale: float, key_mask=None):
    """Block-sparse attention forward over one part.

    Args:
        q: [B, H, n_q, D]; k, v: [B, Hkv, n_k, D], H % Hkv == 0; CUDA, fp16 or bf16, D <= 128.
        layout_fn: (block_m, block_n) -> the part's BlockLayout on q's device.
        scale: score scale.
        key_mask: None or bool broadcastable to [B, H, n_k], True = key hidden.

    Returns:
        out [B, H, n_q, D] in q's dtype and lse [B, H, n_q] fp32, -inf and a zero row where a
        query sees no key.
    """
    check(q, k, v)
    _check_smem(q, ("sparse_fwd",))
    with torch.cuda.device(q.device):
        return run_sparse_forward(
            _lib(), _stream(q), q, k, v, layout_fn(BLOCK, BLOCK), scale=scale, key_mask=key_mask
        )


def sparse_backward(q, k, v, dout, lse, delta, layout_fn, *, scale: float, key_mask=None):
    """Gradients of one part from the merged lse and delta of the whole plan.

    Args:
        q: [B, H, n_q, D]; k, v: [B, Hkv, n_k, D]; dout: [B, H, n_q, D].
        lse: [B, H, n_q] merged log-sum-exp; rows at +-inf contribute nothing.
        delta: [B, H, n_q] rowsum(dout * out) - dlse of the whole plan.
        layout_fn, scale, key_mask: as in :func:`sparse_forward`.

    Returns:
        dq [B, H, n_q, D], dk and dv [B, Hkv, n_k, D], fp32 (the parts of a plan add up without
        rounding to the input dtype in between).
    """
    check(q, k, v)
    _check_smem(q, ("sparse_bwd_dq", "sparse_bwd_dkdv"))
    with torch.cuda.device(q.device):
        return run_sparse_backward(
            _lib(), _stream(q), q, k, v, dout, lse, delta, layout_fn(BLOCK, BLOCK),
            scale=scale, key_mask=key_mask,
        )  # fmt: skip


def xl_check(q: torch.Tensor) -> None:
    """Raise ValueError / TypeError for XL inputs the CUDA kernels cannot serve."""
    _lib()
    _check_tensor(q)
    b, h = q.shape[:2]
    if b * h > _MAX_GRID_Y:
        raise ValueError(
            f"batch x heads = {b * h} exceeds the {_MAX_GRID_Y} blocks of a CUDA grid's second axis"
        )


def xl_forward(q, k, v, r, u, vb, *, scale: float, window: int | None):
    """Transformer-XL forward. q [B, H, L, D]; k, v [B, Hkv, M + L, D]; r [H, R, D];
    u, vb [H, D]; CUDA, fp16 or bf16, D <= 128; window None or an int >= 1.

    Returns out [B, H, L, D] (q.dtype) and lse [B, H, L] (fp32).
    """
    xl_check(q)
    _check_smem(q, ("xl_fwd",))
    with torch.cuda.device(q.device):
        return run_xl_forward(_lib(), _stream(q), q, k, v, r, u, vb, scale=scale, window=window)


def xl_backward(q, k, v, r, u, vb, out, dout, lse, delta, *, scale: float, window: int | None):
    """Gradients (dq, dk, dv, dr, du, dvb), shaped like q, k, v, r, u, vb, fp32.

    dout [B, H, L, D]; lse [B, H, L] from the forward; delta = rowsum(dout * out) - dlse. dr is
    reduced over the block diagonals deterministically (no atomics), du and dvb from the kernels'
    column and band sums of dS.
    """
    xl_check(q)
    _check_smem(q, ("xl_bwd_dkdv", "xl_bwd_dq", "xl_bwd_dr"))
    with torch.cuda.device(q.device):
        return run_xl_backward(
            _lib(), _stream(q), q, k, v, r, u, vb, out, dout, lse, delta,
            scale=scale, window=window,
        )  # fmt: skip

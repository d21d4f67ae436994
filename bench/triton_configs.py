"""Every Triton kernel configuration the launchers of effattn.ops can pick, for the AOT check.

``bench/compile_report.py`` compiles each of them for sm_80 and sm_90 (``aot.py``) and fails on
register spills or shared memory over the limits. ``CONFIGS`` maps each Triton kernel module to
the generator of its configurations; compile_report refuses an ``effattn.ops.triton_*`` module
without an entry here, so a new kernel module cannot go unchecked. The runtime modules keep
only the tables their launchers read (``triton_sparse._CONFIGS``, ``triton_xl.block_config``);
the signatures, constexpr values and variants compiled from them live here, outside the
installed package.
"""

from __future__ import annotations

import torch
import triton.language as tl
from aot import KernelConfig

from effattn.ops import triton_sparse, triton_xl

__all__ = ["CONFIGS", "sparse_configs", "xl_configs"]


# --------------------------------------------------------------------------- sparse
_SPARSE_POINTERS = {
    "KeyMask": "*u8",
    "Lse": "*fp32",
    "Delta": "*fp32",
    "DQ": "*fp32",
    "DK": "*fp32",
    "DV": "*fp32",
}
_SPARSE_IO = ("Q", "K", "V", "Out", "DO")  # in the input dtype
_SPARSE_LAYOUT = triton_sparse._Blocks(
    full_num="*i32",
    full_idx="*i32",
    part_num="*i32",
    part_idx="*i32",
    part_tile="*i32",
    terms="*i32",
    tiles="*u8",
    num_rows="i32",
    max_full="i32",
    max_part="i32",
    num_classes="i32",
    q_offset="i32",
)
_TL_DTYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}


def _sparse_signature(kernel, dtype: str, constexprs) -> dict:
    """The types of the kernel's run-time parameters, by name, for inputs of ``dtype``."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        if name in _SPARSE_IO:
            sig[name] = f"*{dtype}"
        elif name in _SPARSE_POINTERS:
            sig[name] = _SPARSE_POINTERS[name]
        elif name.startswith("stride_"):
            sig[name] = triton_sparse._Strides("i32", "i32", "i32")
        elif name == "layout":
            sig[name] = _SPARSE_LAYOUT
        elif name.endswith("_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _sparse_divisible_by_16(sig) -> tuple[str, ...]:
    """Torch allocations, and strides of [..., D] rows with D % 16 == 0."""
    pointers = [n for n, t in sig.items() if isinstance(t, str) and t.startswith("*")]
    strides = [n for n in sig if n.startswith("stride_")]
    layout = [f"layout.{f}" for f, t in _SPARSE_LAYOUT._asdict().items() if t.startswith("*")]
    return (*pointers, *strides, *layout)


def sparse_configs():
    """Per kernel, dtype and BLOCK_D of the shipped table: the heaviest term predicate (two
    terms with every constraint kind, plus a key mask) and, for fp16, the stored-tile predicate
    of custom patterns; other predicates only drop code from these. HEAD_DIM is BLOCK_D:
    smaller head dims of a bucket add masks to the loads of the same tiles."""
    ts = triton_sparse
    kernels = {"fwd": ts._fwd_kernel, "dq": ts._bwd_dq_kernel, "dkdv": ts._bwd_dkdv_kernel}
    terms = {"NUM_TERMS": 2, "USE_MOD": True, "USE_GROUP": True, "USE_COLS": True}
    tiles = {"NUM_TERMS": 1, "USE_MOD": False, "USE_GROUP": False, "USE_COLS": False}
    for (kname, wide, block_d), per_arch in ts._CONFIGS.items():
        kernel = kernels[kname]
        for dtype in ("fp32",) if wide else ("fp16", "bf16"):
            variants = [("terms", {**terms, "USE_TILES": False})]
            if dtype == "fp16":
                variants.append(("tiles", {**tiles, "USE_TILES": True}))
            for vname, flags in variants:
                for arch, cfg in per_arch.items():
                    constexprs = {
                        **flags,
                        "HAS_KEY_MASK": True,
                        "ACC_DTYPE": tl.float32,
                        "EXP2": not wide,
                        "DOT_DTYPE": _TL_DTYPES[dtype],
                        "DOT_PRECISION": "ieee" if wide else "tf32",
                        "RNE_BF16": False,
                        "BLOCK_M": cfg.block_m,
                        "BLOCK_N": cfg.block_n,
                        "BLOCK_D": block_d,
                        "HEAD_DIM": block_d,
                    }
                    sig = _sparse_signature(kernel, dtype, constexprs)
                    yield KernelConfig(
                        name=f"sparse_{kname}[D={block_d},{dtype},{vname},{cfg.block_m}x"
                        f"{cfg.block_n},w{cfg.num_warps}s{cfg.num_stages},sm{arch}]",
                        fn=kernel,
                        signature=sig,
                        constexprs=constexprs,
                        num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages,
                        divisible_by_16=_sparse_divisible_by_16(sig),
                        archs=(arch,),
                    )


# --------------------------------------------------------------------------- XL
_XL_KERNELS = {
    "fwd": (triton_xl._xl_fwd_kernel, ("Out", "Lse")),
    "bwd_dkdv": (triton_xl._xl_bwd_dkdv_kernel, ("DO", "Lse", "Delta", "DK", "DV")),
    "bwd_dq": (triton_xl._xl_bwd_dq_kernel, ("DO", "Lse", "Delta", "DQ", "DU_part", "DVB_part")),
    "bwd_dr": (triton_xl._xl_bwd_dr_kernel, ("DO", "Lse", "Delta", "DR_part")),
}
_XL_FP32_PTRS = {"Scale", "Lse", "Delta", "DU_part", "DVB_part", "DR_part"}
_XL_INTS = ("L", "N", "R_LEN", "WINDOW", "H", "GROUP", "D", "DIAG0")
_XL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def xl_configs():
    """Every (kernel, dtype, head-dim bucket) the GPU dispatcher launches. Head dims are padded
    to a multiple of 16 in memory (so D % 16 == 0 is the only specialization that runs) and to
    the next power of two in registers (BLOCK_D): 41 runs as 48 in the bucket 64, 80 and 96 in
    the bucket 128."""
    for block_d in (16, 32, 64, 128, 256):
        for dtype, ty in _XL_DTYPES.items():
            if dtype == torch.float32 and block_d > triton_xl.FP32_MAX_HEAD_DIM:
                continue
            for label, (fn, outs) in _XL_KERNELS.items():
                block, warps, stages = triton_xl.block_config(block_d, dtype, kernel=label)
                ptrs = ("Q", "K", "V", "R", "U", "VB", "Scale", *outs)
                sig = {n: "*fp32" if n in _XL_FP32_PTRS else f"*{ty}" for n in ptrs}
                sig.update({n: "i32" for n in _XL_INTS if n in fn.arg_names})
                yield KernelConfig(
                    name=f"xl_{label}[D<={block_d},{ty}]",
                    fn=fn,
                    signature=sig,
                    constexprs={"BLOCK": block, "BLOCK_D": block_d, "ACC": tl.float32},
                    num_warps=warps,
                    num_stages=stages,
                    divisible_by_16=(*ptrs, "D"),
                )


CONFIGS = {
    "effattn.ops.triton_sparse": sparse_configs,
    "effattn.ops.triton_xl": xl_configs,
}
"""Kernel module -> generator of its KernelConfigs (every module effattn.ops.triton_* needs one)."""

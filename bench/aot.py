"""Ahead-of-time (AOT) compilation of Triton kernels for a GPU architecture, without a GPU.

Development tooling, not part of the installed package: ``bench/compile_report.py`` and the
tests use it to check every shipped kernel configuration (listed in ``bench/triton_configs.py``)
for register spills and shared memory on sm_80 (A100) and sm_90 (H100) on machines with no GPU.
Scripts in bench/ import it as ``aot`` (bench/ is their ``sys.path[0]``; tests add it).

    from aot import aot_compile
    info = aot_compile(kernel, {"X": "*fp16", "N": "i32"}, {"BLOCK": 128}, arch=80,
                       num_warps=4, num_stages=3)
    info["regs"], info["spills"], info["smem"]

    rows = aot_compile_configs([KernelConfig("name", kernel, sig, cst, 4, 3), ...], (80, 90))

Here ``signature`` may leave out the constexpr parameters (those in ``constexprs``, or with a
default value in the kernel's definition, as the JIT does); every other parameter needs a type,
a NamedTuple of type strings for a NamedTuple parameter (as the JIT derives from the argument).
Pointers are assumed 16-byte aligned (``tt.divisibility``) unless ``divisible_by_16`` says
otherwise.

Under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it without a GPU) Triton's own library
functions are interpreter objects and nothing can be compiled in that process; the compilation
then runs in a child ``python bench/aot.py`` without the variable, which re-imports the
kernel as ``module.qualname`` (so kernels must be defined at module level).  Batch calls with
``aot_compile_configs`` (one child for the batch); each child costs an import of torch/triton.

Triton's API used here (identical in Triton 3.6 and 3.9; checked against both wheels):

* ``triton.compiler.ASTSource(fn=jit_fn, signature=..., constexprs=..., attrs=...)``

  - ``signature``: ``dict`` keyed by **parameter name (str)** -- non-string keys raise
    ``TypeError`` -- with one entry per parameter of the kernel, constexpr parameters included.
    Type strings: ``"*fp16"``, ``"*bf16"``, ``"*fp32"``, ``"*fp64"``, ``"*i32"``, ``"*i64"``,
    ``"*u8"``, ``"*i1"`` (pointers; ``"*k..."`` is a const pointer), scalars ``"i1"``, ``"i8"``,
    ``"i16"``, ``"i32"``, ``"i64"``, ``"u8"`` ... ``"u64"``, ``"fp16"``, ``"bf16"``, ``"fp32"``,
    ``"fp64"``, fp8 types ``"fp8e4nv"``, ``"fp8e5"``, ..., and ``"constexpr"`` for every
    ``tl.constexpr`` parameter (``triton.language.str_to_ty``).  A tuple parameter takes a tuple
    of them, of the argument's own type for a NamedTuple (whose fields the kernel reads by name).
  - ``constexprs``: ``dict`` keyed by parameter name (or by a path: a tuple of parameter and
    element indices) with the constexpr values.  Every parameter typed ``"constexpr"`` in
    ``signature`` needs a value.
  - ``attrs``: ``dict`` keyed by path, ``{(2,): [["tt.divisibility", 16]]}`` (element j of a tuple
    parameter i: ``(i, j)``) -- what the JIT infers for 16-byte aligned pointers and integers
    divisible by 16.
  - ``@triton.jit`` functions must be defined in a source file (``inspect.getsource``).

* ``triton.compile(src, target=GPUTarget("cuda", 80, 32), options={"num_warps": 4,
  "num_stages": 3})`` returns a ``CompiledKernel``: ``metadata.shared`` is the dynamic shared
  memory the launcher requests, ``asm`` holds ``"ttir" "ttgir" "llir" "ptx" "cubin"``.  Arch 90
  compiles for ``sm_90a`` (wgmma / TMA), with Triton's bundled ``ptxas-blackwell`` (CUDA 13.x).

* Register and spill counts are NOT in the metadata: ``CompiledKernel.n_regs`` / ``n_spills``
  are only set when the cubin is loaded onto a device.  They are taken here from ptxas' own
  ``-v`` log of the very compilation (``knobs.nvidia.dump_ptxas_log``, present in 3.6 and 3.9),
  and cached next to Triton's cache entry (``effattn_ptxas.json``) so cache hits need no
  recompilation (a cache hit without that file, e.g. an entry the JIT wrote, is compiled again
  with ``knobs.compilation.always_compile``, also present in 3.6 and 3.9).

Limits: the shared memory a block may use is the device's opt-in per-block maximum
(``cudaDevAttrMaxSharedMemoryPerBlockOptin``, which Triton's launcher also checks): 163 KiB on
sm_80 and 227 KiB on sm_90, i.e. the 164 / 228 KiB per SM less the 1 KiB the system reserves for
each block.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "ARCHS",
    "SMEM_LIMIT",
    "REGS_PER_SM",
    "KernelConfig",
    "AOTError",
    "aot_compile",
    "aot_compile_configs",
    "check",
    "parse_ptxas_log",
]

ARCHS = (80, 90)
"""Architectures every shipped kernel is compiled for."""

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
"""Opt-in shared memory per block, bytes (dynamic + static)."""

REGS_PER_SM = 64 * 1024
"""32-bit registers per SM (sm_80 and sm_90): one block of num_warps * 32 threads must fit."""


class KernelConfig(NamedTuple):
    """One shipped Triton kernel configuration, as listed in ``bench/triton_configs.py``.

    ``signature`` may leave out the constexpr parameters (every key of ``constexprs`` is typed
    ``"constexpr"`` automatically).  ``divisible_by_16`` names the pointer/integer parameters the
    JIT would see as 16-divisible (``None``: every pointer parameter, the usual case for torch
    allocations); ``"name.field"`` selects one field of a NamedTuple parameter.  ``archs``
    restricts the architectures (``None``: all of ``ARCHS``).
    """

    name: str
    fn: Any
    signature: Mapping[str, Any]
    constexprs: Mapping[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] | None = None
    archs: tuple[int, ...] | None = None


# --------------------------------------------------------------------------------------------
# ptxas -v log parsing (shared with the nvcc part of bench/compile_report.py)
# --------------------------------------------------------------------------------------------

_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_STACK = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[tuple[str, str], dict[str, int]]:
    """Parse ``ptxas -v`` output into ``{(function, "sm_XX"): {...}}``.

    Entry functions (kernels) get ``regs``, ``static_smem``, ``stack``, ``spill_stores``,
    ``spill_loads``, ``spills`` (stores + loads, bytes) and ``entry=1``; non-inlined device
    functions appear with their stack/spill numbers and ``entry=0``.
    """
    out: dict[tuple[str, str], dict[str, int]] = {}
    arch = "?"
    entry: str | None = None
    props: str | None = None
    for line in log.splitlines():
        if m := _RE_ENTRY.search(line):
            entry, arch = m.group(1), m.group(2)
            props = None
            out[(entry, arch)] = {
                "entry": 1,
                "regs": 0,
                "static_smem": 0,
                "stack": 0,
                "spill_stores": 0,
                "spill_loads": 0,
                "spills": 0,
            }
        elif m := _RE_PROPS.search(line):
            props = m.group(1)
        elif m := _RE_STACK.search(line):
            stack, st, ld = (int(g) for g in m.groups())
            name = props or entry
            if name is None:
                continue
            rec = out.setdefault((name, arch), {"entry": 0, "regs": 0, "static_smem": 0})
            rec.update(stack=stack, spill_stores=st, spill_loads=ld, spills=st + ld)
        elif (m := _RE_USED.search(line)) and entry is not None:
            rec = out[(entry, arch)]
            rec["regs"] = int(m.group(1))
            if s := _RE_SMEM.search(line):
                rec["static_smem"] = int(s.group(1))
    return out


# --------------------------------------------------------------------------------------------
# Triton AOT
# --------------------------------------------------------------------------------------------

_SIDECAR = "effattn_ptxas.json"


def _kernel(fn):
    """The ``JITFunction`` (or, under ``TRITON_INTERPRET=1``, ``InterpretedFunction``) behind
    ``fn``, unwrapping ``triton.autotune`` / ``triton.heuristics`` wrappers."""
    from triton.runtime.jit import JITFunction

    kinds: tuple[type, ...] = (JITFunction,)
    try:
        from triton.runtime.interpreter import InterpretedFunction

        kinds += (InterpretedFunction,)
    except ImportError:  # pragma: no cover
        pass
    obj = fn
    for _ in range(8):
        if isinstance(obj, kinds):
            return obj
        obj = getattr(obj, "fn", None)
    raise TypeError(f"{fn!r} is not a @triton.jit function")


def _interpreting() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1: its own library functions
    (tl.max, tl.cdiv, ...) are then interpreter objects and ``triton.compile`` cannot run in
    this process."""
    import triton.language.standard as std
    from triton.runtime.jit import JITFunction

    return not isinstance(std.cdiv, JITFunction)


def _arg_names(fn) -> list[str]:
    return list(_kernel(fn).arg_names)


def _full_signature(fn, signature: Mapping[str, str], constexprs: Mapping[str, Any]):
    """Complete ``signature``/``constexprs`` for every parameter, as Triton >= 3.3 expects."""
    names = _arg_names(fn)
    sig = dict(signature)
    cst = dict(constexprs)
    unknown = sorted((set(sig) | set(cst)) - set(names))
    if unknown:
        raise ValueError(f"{_kernel(fn).fn.__name__}: unknown parameters {unknown}")
    params = inspect.signature(_kernel(fn).fn).parameters
    for name in names:
        if name in cst:
            sig[name] = "constexpr"
        elif sig.get(name) == "constexpr" or name not in sig:
            default = params[name].default
            if default is inspect.Parameter.empty:
                raise ValueError(
                    f"{_kernel(fn).fn.__name__}: parameter {name!r} needs a type in `signature` "
                    "(e.g. '*fp16', 'i32') or a value in `constexprs`"
                )
            sig[name], cst[name] = "constexpr", default  # JIT default of a constexpr parameter
    return {n: sig[n] for n in names}, cst


def _leaves(ty, path: tuple[int, ...]):
    """(path, type string) of each element of a signature type: a string, or a (named) tuple of
    them for a tuple parameter, whose element j of parameter i has the path (i, j)."""
    if isinstance(ty, tuple):
        for j, t in enumerate(ty):
            yield from _leaves(t, (*path, j))
    else:
        yield path, ty


def _divisibility_attrs(names: list[str], sig: Mapping[str, Any], div16: Iterable[str] | None):
    """``tt.divisibility`` 16 for the elements the JIT would find 16-divisible, keyed by path.

    ``div16`` names parameters (each of their elements) or ``name.field`` (one field of a
    NamedTuple parameter); ``None`` selects every pointer. Constexpr elements carry no attribute.
    """
    if div16 is None:
        selected = [
            leaf
            for i, n in enumerate(names)
            for leaf in _leaves(sig[n], (i,))
            if leaf[1].startswith("*")
        ]
    else:
        selected = []
        for entry in div16:
            name, _, field = entry.partition(".")
            if name not in sig:
                raise ValueError(f"divisible_by_16: unknown parameter {name!r}")
            ty, path = sig[name], (names.index(name),)
            if field:
                fields = getattr(type(ty), "_fields", ())
                if field not in fields:
                    raise ValueError(f"divisible_by_16: {name!r} has no field {field!r}")
                ty, path = getattr(ty, field), (*path, fields.index(field))
            selected += _leaves(ty, path)
    return {path: [["tt.divisibility", 16]] for path, ty in selected if ty != "constexpr"}


def _cache_dir(kernel) -> Path | None:
    paths = [p for p in getattr(kernel, "metadata_group", {}).values() if p]
    return Path(paths[0]).parent if paths else None


def aot_compile(
    fn,
    signature: Mapping[str, str],
    constexprs: Mapping[str, Any] | None = None,
    arch: int = 80,
    num_warps: int = 4,
    num_stages: int = 3,
    *,
    divisible_by_16: Iterable[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compile ``fn`` (a ``@triton.jit`` kernel) for ``sm_<arch>`` without a GPU.

    Returns a dict with ``regs`` (per thread), ``spills`` (spill stores + loads, bytes),
    ``spill_stores``, ``spill_loads``, ``stack`` (bytes), ``smem`` (dynamic + static shared memory
    per block, bytes), ``smem_dynamic``, ``smem_static``, ``smem_limit``, ``threads``, ``name``,
    ``arch``.  ``options`` are extra ``triton.compile`` options (e.g. ``{"maxnreg": 128}``).
    Raises ``ValueError`` for an incomplete signature, else whatever Triton raises when the
    kernel does not compile (``AOTError`` carrying its message under TRITON_INTERPRET=1).

    Under ``TRITON_INTERPRET=1`` (as in the CPU test session) Triton cannot compile in this
    process, so the kernel is compiled in a child Python without it: ``fn`` must then be
    reachable as ``module.qualname`` (defined at module level).
    """
    call = _prepare(
        fn, signature, constexprs, arch, num_warps, num_stages, divisible_by_16, options
    )
    if _interpreting():
        status, value = _compile_in_subprocess([call])[0]
        if status != "ok":
            raise AOTError(value)
        return value
    return _compile_local(**call)


def aot_compile_configs(
    configs: Iterable[KernelConfig], archs: Iterable[int] = ARCHS
) -> list[dict[str, Any]]:
    """Compile each config for each of ``archs`` (restricted by ``config.archs``).

    Returns one row per (config, arch): ``{"kernel": config.name, "arch": a, **info,
    "problems": check(info)}``, or ``{"kernel", "arch", "error": message, "problems": [...]}``
    when it does not compile.  Under ``TRITON_INTERPRET=1`` all of them compile in one child
    process.
    """
    rows, calls = [], []
    for cfg in configs:
        cfg = KernelConfig(*cfg)
        for arch in archs:
            if cfg.archs is not None and arch not in cfg.archs:
                continue
            row = {"kernel": cfg.name, "arch": int(arch)}
            try:
                call = _prepare(
                    cfg.fn,
                    cfg.signature,
                    cfg.constexprs,
                    arch,
                    cfg.num_warps,
                    cfg.num_stages,
                    cfg.divisible_by_16,
                    None,
                )
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                call = None
            rows.append(row)
            calls.append(call)
    todo = [i for i, c in enumerate(calls) if c is not None]
    if _interpreting():
        results = _compile_in_subprocess([calls[i] for i in todo])
    else:
        results = [_run_call(calls[i]) for i in todo]
    for i, (status, value) in zip(todo, results):
        if status == "ok":
            rows[i].update(value, kernel=rows[i]["kernel"])
        else:
            rows[i]["error"] = value
    for row in rows:
        row["problems"] = (
            [f"compile error: {row['error'].splitlines()[0][:120]}"]
            if "error" in row
            else check(row)
        )
    return rows


class AOTError(RuntimeError):
    """A kernel failed to compile in the child process (TRITON_INTERPRET=1 sessions)."""


def _prepare(fn, signature, constexprs, arch, num_warps, num_stages, divisible_by_16, options):
    kernel = _kernel(fn)
    names = _arg_names(kernel)
    sig, cst = _full_signature(kernel, signature, constexprs or {})
    return {
        "kernel": kernel,
        "signature": sig,
        "constexprs": cst,
        "attrs": _divisibility_attrs(names, sig, divisible_by_16),
        "arch": int(arch),
        "options": {"num_warps": int(num_warps), "num_stages": int(num_stages), **(options or {})},
    }


def _run_call(call) -> tuple[str, Any]:
    try:
        return "ok", _compile_local(**call)
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}".strip()


def _compile_local(kernel, signature, constexprs, attrs, arch, options) -> dict[str, Any]:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)

    def compile_capturing_ptxas_log(always: bool):
        log = io.StringIO()
        with (
            warnings.catch_warnings(),
            knobs.nvidia.scope(),
            knobs.compilation.scope(),
            contextlib.redirect_stdout(log),
        ):
            # Triton 3.9 warns once about its FP-fusion default; the kernels get the same
            # default as at run time, which is what this report is about.
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            knobs.nvidia.dump_ptxas_log = True
            if always:
                knobs.compilation.always_compile = True
            compiled = triton.compile(src, target=target, options=dict(options))
        return compiled, parse_ptxas_log(log.getvalue())

    compiled, records = compile_capturing_ptxas_log(always=False)
    cache = _cache_dir(compiled)
    sidecar = cache / _SIDECAR if cache else None
    if not records and sidecar is not None and sidecar.exists():  # cache hit
        records = {tuple(k.split("@")): v for k, v in json.loads(sidecar.read_text()).items()}
    if not records:  # cache hit of an entry compiled elsewhere: compile again, for the log
        compiled, records = compile_capturing_ptxas_log(always=True)
    if records and sidecar is not None:
        with contextlib.suppress(OSError):
            sidecar.write_text(json.dumps({f"{k[0]}@{k[1]}": v for k, v in records.items()}))
    entries = {k: v for k, v in records.items() if v.get("entry")}
    if len(entries) != 1:
        raise RuntimeError(f"could not read ptxas' report for {compiled.name}: {records}")
    (_, sm), rec = next(iter(entries.items()))
    # Non-inlined device functions spill into the kernel's stack too.
    spill_stores = sum(v.get("spill_stores", 0) for v in records.values())
    spill_loads = sum(v.get("spill_loads", 0) for v in records.values())

    md = compiled.metadata
    dynamic = int(md.shared or 0)
    static = int(rec.get("static_smem", 0))
    return {
        "name": compiled.name,
        "arch": arch,
        "sm": sm,
        "regs": int(rec["regs"]),
        "spills": spill_stores + spill_loads,
        "spill_stores": spill_stores,
        "spill_loads": spill_loads,
        "stack": int(rec.get("stack", 0)),
        "smem": dynamic + static,
        "smem_dynamic": dynamic,
        "smem_static": static,
        "smem_limit": SMEM_LIMIT.get(arch, 48 * 1024),
        "threads": int(md.num_warps) * 32,
        "num_warps": int(md.num_warps),
        "num_stages": int(md.num_stages),
    }


# --------------------------------------------------------------------------------------------
# Child process for TRITON_INTERPRET=1 sessions: `python bench/aot.py IN.pkl OUT.pkl`
# --------------------------------------------------------------------------------------------


def _compile_in_subprocess(calls: list[dict]) -> list[tuple[str, Any]]:
    if not calls:
        return []
    wire = []
    for c in calls:
        py = c["kernel"].fn
        if "<locals>" in py.__qualname__:
            raise ValueError(
                f"{py.__qualname__}: under TRITON_INTERPRET=1 a kernel must be defined at module "
                "level to be compiled ahead of time"
            )
        where = {"module": py.__module__, "file": inspect.getfile(py), "qualname": py.__qualname__}
        wire.append({**{k: v for k, v in c.items() if k != "kernel"}, "kernel": where})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # same imports as here
    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d, "in.pkl"), Path(d, "out.pkl")
        inp.write_bytes(pickle.dumps(wire))
        res = subprocess.run(
            [sys.executable, __file__, str(inp), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,  # a whole config sweep takes ~1 min on 2 cores; a hung compiler fails
        )
        if res.returncode != 0 or not out.exists():
            raise AOTError(
                f"AOT child process failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        return pickle.loads(out.read_bytes())


def _load_kernel(where: Mapping[str, str]):
    import importlib
    import importlib.util

    mod = None
    try:
        mod = importlib.import_module(where["module"])
        if os.path.realpath(inspect.getfile(mod)) != os.path.realpath(where["file"]):
            mod = None
    except Exception:
        mod = None
    if mod is None:  # e.g. a test module imported by pytest under a rootdir-relative name
        spec = importlib.util.spec_from_file_location(where["module"], where["file"])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[where["module"]] = mod
        spec.loader.exec_module(mod)
    obj = mod
    for part in where["qualname"].split("."):
        obj = getattr(obj, part)
    return _kernel(obj)


def _child_main(inp: str, out: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    results = []
    for call in pickle.loads(Path(inp).read_bytes()):
        try:
            call["kernel"] = _load_kernel(call["kernel"])
        except Exception as e:
            results.append(("error", f"loading the kernel: {type(e).__name__}: {e}"))
            continue
        results.append(_run_call(call))
    Path(out).write_bytes(pickle.dumps(results))


def check(info: Mapping[str, Any]) -> list[str]:
    """Problems in an ``aot_compile``-style result: spills, shared memory, registers per block."""
    problems = []
    if info.get("spills", 0):
        problems.append(f"spills {info['spill_stores']} B stores / {info['spill_loads']} B loads")
    if info.get("smem", 0) > info.get("smem_limit", float("inf")):
        problems.append(f"shared memory {info['smem']} B > limit {info['smem_limit']} B")
    threads = info.get("threads")
    if threads and info.get("regs", 0) * threads > REGS_PER_SM:
        problems.append(f"{info['regs']} regs x {threads} threads > {REGS_PER_SM} registers")
    return problems


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])

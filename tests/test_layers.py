"""The package's layers import only downwards (docs/design.md, "Layers"), with no cycle.

Each module's effattn imports (at any depth: lazy imports count too) must point to a layer
below its own; modules of one layer may import each other only as listed.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "effattn"

# Lower number = lower layer. A module may import modules of strictly lower layers, and the
# same-layer modules listed in SAME_LAYER.
LAYERS = {
    "effattn._extension": 0,
    "effattn.patterns.terms": 0,
    "effattn.patterns.layout": 1,
    "effattn.patterns.count": 2,
    "effattn.patterns.core": 3,
    "effattn.patterns.plot": 0,
    "effattn.patterns": 5,
    "effattn._validation": 0,
    "effattn.reference": 6,
    "effattn.ops.backend": 6,
    "effattn.ops.torch_sparse": 6,
    "effattn.ops.torch_xl": 6,
    "effattn.ops.cpu": 6,
    "effattn.ops.cuda": 6,
    "effattn.ops.triton_sparse": 6,
    "effattn.ops.triton_xl": 6,
    "effattn.ops": 6,
    "effattn.ops.dispatch": 7,
    "effattn.decompose": 7,
    "effattn.execute": 8,
    "effattn.functional": 9,
    "effattn": 10,
    "effattn.nn.decoding": 10,
    "effattn.nn.sparse": 11,
    "effattn.nn.xl": 11,
    "effattn.nn": 12,
    "effattn.integrations": 12,
    "effattn.compat.deepspeed": 12,
    "effattn.compat": 13,
    "effattn.integrations.transformers": 12,
}
# Same-layer imports that are part of the design (a package's __init__ re-exporting, ...).
SAME_LAYER: set[tuple[str, str]] = set()
TOP = "effattn"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == TOP or node.module.startswith(TOP + "."):
                # from pkg import x: x is a submodule of pkg, or a name pkg defines.
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    out.add(sub if sub in LAYERS else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(TOP)}
    return out


def _layer(name: str) -> tuple[str, int]:
    """The layer of ``name`` (a module or a name re-exported by a package)."""
    while name not in LAYERS:
        name = name.rsplit(".", 1)[0]
    return name, LAYERS[name]


def test_every_module_has_a_layer():
    names = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    assert not names - set(LAYERS), f"modules without a layer: {sorted(names - set(LAYERS))}"


def test_imports_point_down():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        me = _module_name(path)
        mine = LAYERS[me]
        for target in _imports(path):
            name, theirs = _layer(target)
            if name == me or (me, name) in SAME_LAYER:
                continue
            if theirs >= mine:
                wrong.append(f"{me} (layer {mine}) imports {target} (layer {theirs})")
    assert not wrong, "\n".join(wrong)

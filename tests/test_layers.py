"""The package's layers (README, "Layers"): every import in `cosmos3/` points down, never up, never sideways.

Function-level (lazy) imports count too: they are still a dependency, only a later one.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "cosmos3"

# Bottom to top. A part may import any part of a lower layer, and nothing of its own layer but itself.
LAYERS = [
    {"io", "flow", "assets"},
    {"models", "tokenizers"},
    {"kernels", "optimize", "parallel", "step_cache"},
    {"conditioning"},
    {"pipelines"},
    {"robotics"},
    {"training"},
    {"demo", "testing", "serving"},
    {"cli"},
    {"__init__", "__main__"},
]
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """`cosmos3.training.trainer` -> `training`; `cosmos3` -> `__init__`."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(module: str, path: pathlib.Path) -> set[str]:
    """The `cosmos3` modules (or names in them) `module` imports, resolved to absolute dotted names."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cosmos3"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cosmos3":
                continue
            # `from . import flow` names a module; `from .x import y` names something in x
            found |= {f"{target}.{a.name}" for a in node.names} if node.module is None else {target}
    return found


def edges() -> list[tuple[str, str, str, str]]:
    """(importer, imported, importer's part, imported part) for every import that leaves its part."""
    out = []
    for module, path in modules().items():
        for target in imports(module, path):
            src, dst = part_of(module), part_of(target)
            if src != dst:
                out.append((module, target, src, dst))
    return out


def test_every_part_is_in_a_layer():
    parts = {part_of(m) for m in modules()}
    assert parts - set(LAYER_OF) == set(), "add the new part of cosmos3/ to LAYERS (and to the README's Layers)"


def test_imports_point_down():
    wrong = [f"{module} imports {target} ({src}: layer {LAYER_OF[src]}, {dst}: layer {LAYER_OF[dst]})"
             for module, target, src, dst in edges() if LAYER_OF[dst] >= LAYER_OF[src]]
    assert wrong == [], "upward or sideways imports:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for _, _, src, dst in edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    assert [p for p in graph if reaches(p, p, {p})] == []


@pytest.mark.parametrize("source,expected", [
    ("from ..training.datasets import X", {"cosmos3.training.datasets"}),
    ("from .. import flow", {"cosmos3.flow"}),
    ("def f():\n    from ..robotics import envs", {"cosmos3.robotics"}),
    ("import cosmos3.io as media", {"cosmos3.io"}),
    ("import numpy", set()),
])
def test_the_walk_sees_every_kind_of_import(tmp_path, source, expected):
    """The checker itself: relative, package-relative, lazy and absolute imports are all found."""
    path = tmp_path / "policy.py"
    path.write_text(source)
    assert imports("cosmos3.pipelines.policy", path) == expected

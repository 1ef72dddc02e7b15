"""The tree is the architecture (docs/architecture.md): imports inside service/ point down the
layers, and the leaves (config, errors, metrics, generated code) import only leaves.

Read from the source with `ast`, so a new module is checked the day it is added; a violation
names the importing module, what it imports and both layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"

# Higher imports lower (or its own layer), never the reverse.
LAYERS: tuple[tuple[str, int], ...] = (
    ("service.__main__", 7), ("service.server", 7), ("service.supervisor", 7),
    ("service.fatal", 7), ("service.healthcheck", 7),
    ("service.frontends", 6),
    ("service.api", 5),
    ("service.dataplane", 4),
    ("service.batching", 3),
    # A pure parser of --version-policy/--version-labels that config validates with: a leaf.
    ("service.registry.version_policy", 0),
    ("service.promotion", 2), ("service.registry", 2),  # the domain: gate/canary beside versions
    ("service.storage", 1), ("service.model", 1),
    ("service.config", 0), ("service.errors", 0), ("service.metrics", 0), ("service.pb", 0),
)


def layer_of(module: str) -> tuple[str, int]:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    """Every `service.*` module `path` imports at run time (TYPE_CHECKING blocks excluded:
    annotations do not make a dependency at run time, and may name an upper layer's type)."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("service.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "service":
                found += [f"service.{a.name}" for a in node.names]
            elif node.module.startswith("service."):
                found.append(node.module)
    return found


MODULES = sorted(p for p in SERVICE.rglob("*.py") if "pb" not in p.relative_to(SERVICE).parts)


def test_every_module_is_in_a_layer() -> None:
    for path in MODULES:
        if module_name(path) != "service":
            layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVICE)))
def test_imports_point_down(path: Path) -> None:
    me = module_name(path)
    if me == "service":
        return
    mine, rank = layer_of(me)
    for target in imports(path):
        theirs, their_rank = layer_of(target)
        assert their_rank <= rank, (
            f"{me} ({mine}, layer {rank}) imports {target} ({theirs}, layer {their_rank}): "
            "imports point down (docs/architecture.md)")


def test_no_test_module_imports_another() -> None:
    """Helpers live in tests/support/; a test module (or conftest) is never imported."""
    tests = Path(__file__).resolve().parent
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("test_", "conftest")), (
                    f"{path.name} imports {name}: move what it needs to tests/support/")

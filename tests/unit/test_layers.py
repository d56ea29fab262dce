"""Imports run one way: from the top (cli) down to the shared pieces, schemas and errors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ocrbooth"

# Top to bottom; a module may import its own layer or any layer below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("dev",),
    ("client", "testing"),
    ("daemon",),
    ("handlers",),
    ("models",),
    ("config", "storage", "metrics", "retry", "messages", "logs", "localfs"),
    ("schemas",),
    ("errors", "constants", "__init__"),
]


def layer_of(module: str) -> int:
    """The layer index of a dotted `ocrbooth.…` module name (its first component below the package)."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(LAYERS):
        if head in names:
            return index
    raise AssertionError(f"{module}: no layer is declared for ocrbooth.{head}; add it to LAYERS")


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def upward_imports(root: Path) -> list[str]:
    """Every import (module level or inside a function) in `root` that reaches a higher layer."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = module_name(path, root)
        here = layer_of(source)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
                if node.module == root.name:  # `from ocrbooth import schemas` (a module) or `__version__` (a name)
                    targets = [
                        f"{root.name}.{a.name}"
                        if (root / a.name).is_dir() or (root / f"{a.name}.py").exists()
                        else root.name
                        for a in node.names
                    ]
            else:
                continue
            for target in targets:
                if (target == root.name or target.startswith(root.name + ".")) and layer_of(target) < here:
                    found.append(f"{source} (line {node.lineno}) imports {target}")
    return found


def test_no_module_imports_a_higher_layer() -> None:
    """No module of the package imports one from a layer above its own."""
    assert upward_imports(PACKAGE) == []


def test_a_planted_upward_import_is_caught(tmp_path: Path) -> None:
    """The check fails on a copy of the package with one upward import planted in a shared piece."""
    import shutil

    copy = tmp_path / "ocrbooth"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "json"))
    target = copy / "storage.py"
    target.write_text(target.read_text() + "\n\ndef _planted() -> None:\n    from ocrbooth.daemon import app  # noqa\n")
    assert upward_imports(copy) == [
        f"ocrbooth.storage (line {len(target.read_text().splitlines())}) imports ocrbooth.daemon"
    ]


@pytest.mark.parametrize("module", ["ocrbooth.daemon.app", "ocrbooth.config", "ocrbooth.errors"])
def test_every_top_level_name_has_a_layer(module: str) -> None:
    """Layer lookup knows the package's parts (an unknown part fails loudly instead of passing)."""
    assert 0 <= layer_of(module) < len(LAYERS)
    with pytest.raises(AssertionError):
        layer_of("ocrbooth.nowhere")

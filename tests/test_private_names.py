"""No convbn module reads another convbn module's underscored name.

An underscore marks a name as its module's own business: another module that reads it depends on
an implementation detail nobody promised to keep. Modules whose own name starts with an underscore
(``convbn.formats._io``, ``convbn.backends._common``) are internal to convbn, and their public names
are for convbn's own use; importing such a module is fine, reaching into a name it hides is not.

The check is static: every underscored name a module defines (functions, classes, assignments,
attributes it sets) belongs to it; a module that imports, or reads as an attribute, an underscored
name it does not define itself while another convbn module does, is reading that module's. Names
no convbn module defines (a framework's own internals) are outside this rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "convbn"

#: Frameworks' own underscored attributes that a convbn module also happens to define a name for,
#: read on the framework's objects: not another convbn module's business.
FRAMEWORK_ATTRIBUTES = {
    "_version": "torch.Tensor's in-place version counter (a cached tensor is stale once it moves)",
    "_modules": "torch.nn.Module's registry of children",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.add(node.value)  # object.__setattr__(self, "_x", ...), __slots__ = ("_x",)
    return {n for n in names if _private(n)}


def _is_module(package: str, name: str) -> bool:
    base = ROOT.parent.joinpath(*package.split("."), name)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(ROOT.rglob("*.py"))}


def violations(modules: dict[Path, ast.Module]) -> list[str]:
    """``file:line: name`` for every read of another module's underscored name."""
    defined = {path: _defined(tree) for path, tree in modules.items()}
    everywhere = set().union(*defined.values())
    found: list[str] = []
    for path, tree in modules.items():
        own = defined[path]
        where = path.relative_to(ROOT.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "convbn":
                for alias in node.names:
                    if _private(alias.name) and not _is_module(node.module or "", alias.name):
                        found.append(f"{where}:{node.lineno}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                if node.attr not in own and node.attr in everywhere and node.attr not in FRAMEWORK_ATTRIBUTES:
                    found.append(f"{where}:{node.lineno}: .{node.attr}")
    return found


def test_no_module_reads_another_modules_underscored_name() -> None:
    found = violations(_modules())
    assert not found, "underscored names read across modules:\n" + "\n".join(found)


def test_the_check_finds_a_read_across_modules(tmp_path: Path) -> None:
    """The check is not vacuous: a module reading another's ``_cache`` and importing its helper is caught."""
    owner = ast.parse("class P:\n    def __init__(self):\n        self._cache = {}\n\ndef _helper():\n    pass\n")
    reader = ast.parse("from convbn.params import _helper\n\ndef f(p):\n    return p._cache\n")
    found = violations({ROOT / "owner.py": owner, ROOT / "reader.py": reader})
    assert found == ["convbn/reader.py:1: from convbn.params import _helper", "convbn/reader.py:4: ._cache"]


@pytest.mark.parametrize("source", ["from convbn.formats import _io\n", "import convbn.backends._common\n"])
def test_importing_an_internal_module_is_allowed(source: str) -> None:
    assert violations({ROOT / "reader.py": ast.parse(source)}) == []

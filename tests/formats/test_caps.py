"""Each format module's declared ``CAPS`` describes the module as it is, and nothing above the
format modules probes a module or compares format names instead of reading the record."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
from pathlib import Path
from typing import Any

import pytest

import convbn
from convbn.convert import format_for_path
from convbn.formats import FORMATS, caps, load_format
from convbn.formats._caps import FormatCaps

ROOT = Path(convbn.__file__).resolve().parent
FRAMEWORKS = ("torch", "tensorflow", "jax", "flax", "keras", "tf_keras")


def _imports(module: types.ModuleType) -> set[str]:
    """Top-level package names the module's source imports anywhere (in functions too)."""
    tree = ast.parse(inspect.getsource(module))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.partition(".")[0])
    return names


def _feature_orders(module: types.ModuleType) -> set[str]:
    """The literal orders the module's source asks ``Checkpoint.in_feature_order`` for."""
    tree = ast.parse(inspect.getsource(module))
    return {
        node.args[0].value for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "in_feature_order" and node.args and isinstance(node.args[0], ast.Constant)
    }


def drift(module: Any) -> list[str]:
    """Where ``module.CAPS`` and the module disagree (empty when they agree)."""
    declared: FormatCaps = module.CAPS
    problems = []
    params = list(inspect.signature(module.write).parameters.values())
    if [p.kind for p in params[:2]] != [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2:
        problems.append("write() must take (ckpt, path) first")
    options = {p.name for p in params[2:]}
    if any(p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty for p in params[2:]):
        problems.append("write()'s options must be keyword-only, with defaults")
    if options != declared.write_options:
        problems.append(f"write() takes {sorted(options)}, CAPS.write_options says {sorted(declared.write_options)}")
    promised = {
        "check_destination": declared.checks_destination,
        "resolve": declared.prefix,
        "write_prefix": declared.prefix,
        "target_var_update": declared.var_update == "by_path",
        "writes_directory": declared.directories,
    }
    for function, flag in promised.items():
        if callable(vars(module).get(function)) != flag:
            problems.append(f"{function}() is {'absent' if flag else 'defined'} but CAPS says {flag}")
    imported = _imports(module)
    if declared.framework is not None and declared.framework not in imported:
        problems.append(f"CAPS.framework is {declared.framework!r}, which the module never imports")
    if declared.framework is None and imported & set(FRAMEWORKS):
        problems.append(f"the module imports {sorted(imported & set(FRAMEWORKS))} but CAPS.framework is None")
    if declared.package is not None and declared.package[0] not in imported:
        problems.append(f"CAPS.package names {declared.package[0]!r}, which the module never imports")
    orders = _feature_orders(module)
    if orders != ({declared.flatten_order} - {None}):
        problems.append(f"write() orders features {sorted(orders)}, CAPS.flatten_order says {declared.flatten_order!r}")
    for suffix in declared.suffixes:
        if format_for_path(f"model{suffix}") != module.NAME:
            problems.append(f"a path ending in {suffix} is not read as {module.NAME}")
    return problems


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_declares_what_its_module_does(name):
    module = load_format(name)
    assert module.NAME == name
    assert drift(module) == []


def _broken_copy(name: str, **changes: Any) -> types.ModuleType:
    """A copy of format ``name``'s module namespace with some names replaced."""
    copy = types.ModuleType(f"broken_{name}")
    vars(copy).update(vars(load_format(name)))
    vars(copy).update(changes)
    return copy


def test_a_drifted_declaration_is_caught():
    torch_format = load_format("torch")

    def write(ckpt, path, *, progress=None):  # max_shard_size dropped
        return None

    assert drift(_broken_copy("torch", write=write)) == [
        "write() takes ['progress'], CAPS.write_options says ['max_shard_size', 'progress']"
    ]
    declared = dataclasses.replace(torch_format.CAPS, checks_destination=True, framework=None, flatten_order="hwc")
    assert drift(_broken_copy("torch", CAPS=declared)) == [
        "check_destination() is absent but CAPS says True",
        "the module imports ['torch'] but CAPS.framework is None",
        "write() orders features ['chw'], CAPS.flatten_order says 'hwc'",
    ]
    slim_format = load_format("slim")
    no_prefix = dataclasses.replace(slim_format.CAPS, prefix=False)
    assert drift(_broken_copy("slim", CAPS=no_prefix)) == [
        "resolve() is defined but CAPS says False", "write_prefix() is defined but CAPS says False"
    ]


def test_a_declaration_that_contradicts_itself_is_refused():
    with pytest.raises(ValueError, match="write_options must be among"):
        FormatCaps(write_options=frozenset({"overwrite"}))
    with pytest.raises(ValueError, match="writes shards .* exactly when write.. takes max_shard_size"):
        FormatCaps(shards="index_json")
    with pytest.raises(ValueError, match="name the convention"):
        FormatCaps(settings_note="TF checkpoints")


def test_a_format_module_without_caps_is_refused(monkeypatch):
    monkeypatch.delattr(load_format("safetensors"), "CAPS")
    with pytest.raises(convbn.ConvBNError, match="must declare CAPS"):
        caps("safetensors")


# -- no probing, no format names ------------------------------------------------------------------

#: What reading the record replaced: probing a format module for what it can do.
PROBES = re.compile(r"inspect\.signature|(?:get|has)attr\((load_format|_format_module)\(")
#: The same, where a format module was held in a variable (a torch module's ``getattr(module,
#: "bias")`` elsewhere is no format probe).
MODULE_PROBES = re.compile(r"(?:get|has)attr\(module\b")
SLIM_BY_NAME = re.compile(r"""[!=]=\s*["']slim["']|["']slim["']\s*[!=]=|in\s*\(\s*["']slim["']""")
ANY_BY_NAME = re.compile(r"""[!=]=\s*["'](torch|slim|keras|flax|safetensors)["']|in\s*\(\s*["'](torch|slim|keras|flax|safetensors)["']""")
#: The per-format tables and module flags the record replaced.
REPLACED = re.compile(r"\b(_FLAT_ORDER|_TARGET_VAR_UPDATE|_NEEDS|_SUFFIXES|WRITES_OTHERS|WRITES_FUSED|FRAMEWORK)\b")
#: Where capabilities are read: no format name may decide anything there.
READERS = ("convert.py", "commands/_checkpoints.py", "commands/fuse.py", "formats/__init__.py")


def _offending(pattern: re.Pattern[str], files: list[Path]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line.partition("#")[0])
    ]


def test_nothing_probes_a_format_module_or_asks_for_slim_by_name():
    every = sorted(ROOT.rglob("*.py"))
    assert _offending(PROBES, every) == []
    assert _offending(REPLACED, every) == []
    assert _offending(SLIM_BY_NAME, [p for p in every if p != ROOT / "formats" / "slim.py"]) == []
    assert _offending(ANY_BY_NAME, [ROOT / f for f in READERS]) == []
    assert _offending(MODULE_PROBES, [ROOT / f for f in READERS]) == []


def test_the_greps_find_what_they_guard_against():
    samples = {
        PROBES: ['accepted = inspect.signature(module.write).parameters',
                 'check = getattr(load_format(to), "check_destination", None)', 'hasattr(_format_module(n), "X")'],
        MODULE_PROBES: ['getattr(module, "WRITES_OTHERS", False)'],
        SLIM_BY_NAME: ['if name != "slim":', "if to == 'slim' and x:", 'if format in ("slim", "torch"):'],
        ANY_BY_NAME: ['expected = f(p) if name == "keras" else g', 'if format not in ("safetensors", "torch"):'],
        REPLACED: ['_FLAT_ORDER = {"torch": "chw"}', 'needed = {m.FRAMEWORK}'],
    }
    for pattern, lines in samples.items():
        assert all(pattern.search(line) for line in lines), pattern.pattern
    assert not PROBES.search('bias = getattr(module, "bias", None)')
    assert not SLIM_BY_NAME.search('if style == "slim_like":')

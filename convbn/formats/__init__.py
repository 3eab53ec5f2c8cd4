"""Checkpoint formats, one module each: ``torch``, ``slim``, ``keras``, ``flax``, ``safetensors``.

Every format module defines:

- ``NAME``: the format's name, as ``--from``/``--to`` spell it.
- ``sniff(path: pathlib.Path) -> bool``: whether ``path`` holds this format, judged from its
  content (magic bytes, zip members, companion files), not only its suffix. Must not import a
  framework when the answer is no, and must not raise on unreadable files.
- ``read(path, *, pairs, eps, momentum, use_ema) -> convbn.convert.Checkpoint``: the layers in
  source order, every other tensor in ``tensors``, and what was deliberately left out in
  ``dropped``. ``pairs`` maps conv names to BatchNorm names and wins over every other rule.
- ``write(ckpt, path, **options) -> None``: write ``ckpt`` (already folded by ``save_checkpoint``
  where the target has no conv bias) through :func:`convbn.formats._io.atomic_output`, taking the
  keyword options its ``CAPS.write_options`` names (``progress``, ``max_shard_size``). A writer may
  append report lines to ``ckpt.notes`` (it gets a copy).
- ``CAPS``: a :class:`convbn.formats._caps.FormatCaps`, what the format can do (the framework it
  imports, whether its layers hold a conv bias, which ``write`` options it takes, its flatten
  order, ...). Everything above the format modules reads this record (:func:`caps`) and never
  probes a module or compares format names; the functions a flag promises (``check_destination``
  for ``checks_destination``, ``resolve``/``write_prefix`` for ``prefix``, ``target_var_update``
  for ``var_update="by_path"``) are defined by the modules that set it.

Shared helpers: :mod:`convbn.formats._pairing` (explicit pairs, graph/naming/order pairing,
natural sort, mapping files) and :mod:`convbn.formats._common` (sniffing, conventions' defaults,
layer construction with errors that name the file).

Framework imports happen inside ``read``/``write``, so listing or sniffing formats imports none.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from convbn.formats._caps import FormatCaps

FORMATS = ("torch", "slim", "keras", "flax", "safetensors")


def load_format(name: str) -> ModuleType:
    """The module for format ``name`` (raises ConvBNError for an unknown name)."""
    from convbn.errors import ConvBNError

    key = str(name).lower()
    if key not in FORMATS:
        raise ConvBNError(f"format must be one of {list(FORMATS)}. Received: format={name!r}")
    module = importlib.import_module(f"convbn.formats.{key}")
    if not isinstance(vars(module).get("CAPS"), FormatCaps):
        raise ConvBNError(f"format module {module.__name__} must declare CAPS = FormatCaps(...). Received: none")
    return module


def caps(name: str) -> FormatCaps:
    """What format ``name`` can do (its module's ``CAPS``; raises ConvBNError for an unknown name).

    Example:
        >>> caps("slim").conv_bias
        False
    """
    declared: FormatCaps = load_format(name).CAPS
    return declared


#: The order frameworks are imported in where several load: importing TensorFlow before torch can
#: crash the process; torch first is the order known to work.
_IMPORT_ORDER = ("torch", "tensorflow")


def import_frameworks(*formats: str) -> None:
    """Import the frameworks that reading or writing ``formats`` needs, torch before TensorFlow.

    A conversion between ``slim`` and ``torch`` loads both; calling this with both formats before
    either is read imports them in the safe order. Frameworks that are not installed, or already
    imported, are skipped (the format raises its own error when it is used).

    Example:
        >>> import_frameworks("slim", "torch")  # doctest: +SKIP
    """
    needed = {caps(name).framework for name in formats}
    for module in _IMPORT_ORDER:
        if module in needed and module not in sys.modules and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)

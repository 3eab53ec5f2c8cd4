"""Checkpoint formats, one module each: ``torch``, ``slim``, ``keras``, ``flax``, ``safetensors``.

Every format module defines:

- ``NAME``: the format's name, as ``--from``/``--to`` spell it.
- ``sniff(path: pathlib.Path) -> bool``: whether ``path`` holds this format, judged from its
  content (magic bytes, zip members, companion files), not only its suffix. Must not import a
  framework when the answer is no, and must not raise on unreadable files.
- ``read(path, *, pairs, eps, momentum, use_ema) -> convbn.convert.Checkpoint``: the layers in
  source order, every other tensor in ``tensors``, and what was deliberately left out in
  ``dropped``. ``pairs`` maps conv names to BatchNorm names and wins over every other rule.
- ``write(ckpt, path) -> None``: write ``ckpt`` (already folded by ``save_checkpoint`` where the
  target has no conv bias) through :func:`convbn.formats._io.atomic_output`. A writer may append
  report lines to ``ckpt.notes`` (it gets a copy).

Optional, added later and backward compatible (a module without them keeps working):

- ``write(ckpt, path, *, progress=None)``: when ``write`` accepts ``progress``,
  ``save_checkpoint`` passes a callable to call with each layer's name once it is written.
- ``WRITES_FUSED = True``: ``write`` honours ``ckpt.fused`` (write each layer's conv weight and
  bias, no BatchNorm), so ``convbn fuse`` may target the format.
- ``FRAMEWORK``: the framework module ``read``/``write`` import (``"torch"``, ``"tensorflow"``), so
  :func:`import_frameworks` can load them in a safe order first.
- ``check_destination(ckpt, path) -> None``: raise ``ConvBNError`` when writing ``ckpt`` at
  ``path`` would leave it next to files that contradict it (a TF ``.meta`` graph). ``write`` checks
  its own target; the CLI, which writes to a staging directory, calls it for the final path.

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

FORMATS = ("torch", "slim", "keras", "flax", "safetensors")


def load_format(name: str) -> ModuleType:
    """The module for format ``name`` (raises ConvBNError for an unknown name)."""
    from convbn.errors import ConvBNError

    key = str(name).lower()
    if key not in FORMATS:
        raise ConvBNError(f"format must be one of {list(FORMATS)}. Received: format={name!r}")
    return importlib.import_module(f"convbn.formats.{key}")


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
    needed = {getattr(load_format(name), "FRAMEWORK", None) for name in formats}
    for module in _IMPORT_ORDER:
        if module in needed and module not in sys.modules and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)

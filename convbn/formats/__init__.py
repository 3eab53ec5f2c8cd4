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

Shared helpers: :mod:`convbn.formats._pairing` (explicit pairs, graph/naming/order pairing,
natural sort, mapping files) and :mod:`convbn.formats._common` (sniffing, conventions' defaults,
layer construction with errors that name the file).

Framework imports happen inside ``read``/``write``, so listing or sniffing formats imports none.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FORMATS = ("torch", "slim", "keras", "flax", "safetensors")


def load_format(name: str) -> ModuleType:
    """The module for format ``name`` (raises ConvBNError for an unknown name)."""
    from convbn.errors import ConvBNError

    key = str(name).lower()
    if key not in FORMATS:
        raise ConvBNError(f"format must be one of {list(FORMATS)}. Received: format={name!r}")
    return importlib.import_module(f"convbn.formats.{key}")

"""What a checkpoint format can do, declared as data by its module (``CAPS = FormatCaps(...)``).

Everything :mod:`convbn.convert` and the CLI need to know about a format beyond calling its
``sniff``/``read``/``write`` is here, so they read a record instead of probing the module
(``getattr``, signatures) or comparing format names. ``tests/formats/test_caps.py`` checks each
record against the module it describes (``write``'s keyword options, the functions a flag
promises), so a record cannot drift from its format.

Imports nothing of convbn's: every format module and everything above them may use it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["OPTIONS", "FormatCaps"]

#: The keyword options a ``write`` may accept besides ``(ckpt, path)``, each with what
#: :func:`convbn.convert.save_checkpoint` passes: ``progress``, a callable taking each layer's name
#: once it is written; ``max_shard_size``, the most bytes per file (already parsed to an int).
OPTIONS = frozenset({"progress", "max_shard_size"})


@dataclasses.dataclass(frozen=True)
class FormatCaps:
    """A format's capabilities and conventions.

    Attributes:
        suffixes: the file suffixes that name the format when no format is given (a destination
            ``model.pt`` is torch's); a prefix format's data files (``.data-*``) name it too.
        framework: the framework module ``read``/``write`` import (``"torch"``), so
            :func:`convbn.formats.import_frameworks` loads it in a safe order first; None when they
            import none.
        package: ``(module, extra)``: the package reading or writing needs, looked up before any
            reading, and the convbn extra that installs it; None when NumPy suffices.
        conv_bias: whether the format's conv+BatchNorm layers hold a conv bias; when not
            (tf-slim's ``conv2d`` with a normalizer), :func:`convbn.convert.save_checkpoint` folds
            every conv bias before writing.
        writes_others: ``write`` stores :attr:`Checkpoint.others` as layers; otherwise they are
            written as loose tensors.
        writes_fused: ``write`` honours :attr:`Checkpoint.fused` (each layer's conv weight and
            bias, no BatchNorm), so ``convbn fuse`` may target the format.
        write_options: the keyword options ``write`` accepts, a subset of :data:`OPTIONS`.
        prefix: a checkpoint is named by a prefix that is no file (``<prefix>.index`` and
            ``<prefix>.data-*``); the module then defines ``resolve(path)`` (a prefix or
            directory read from) and ``write_prefix(path)`` (the prefix a write at ``path`` writes).
        shards: how a write with ``max_shard_size`` lays out its files: ``"index_json"`` (shards
            and ``<path>.index.json`` beside ``path``, as transformers' ``save_pretrained``),
            ``"data_files"`` (``<prefix>.data-0000K-of-0000N``), or None (written whole).
        flatten_order: the order the format's frameworks flatten a feature map in before a dense
            layer (``"chw"`` for NCHW torch, ``"hwc"`` for NHWC); None when the format keeps the
            source's order (safetensors).
        var_update: the moving-variance update of the BatchNorms the format's files are loaded
            into; ``"by_path"`` when the file's name decides, through the module's
            ``target_var_update(path)`` (Keras 2's ``*.h5`` against Keras 3's); None when each
            layer's own is stored.
        directories: a checkpoint may be a directory (an Orbax checkpoint): read when the source
            is one, written where the module's ``writes_directory(path)`` says; either needs
            orbax-checkpoint (:func:`convbn.formats._orbax.require`).
        like_files: a file of the format can be ``convert --like``'s state file: its writer keeps
            the names of a checkpoint read from the same format, so the user's model loads the
            result with its framework's own strict loader.
        checks_destination: the module defines ``check_destination(ckpt, path)``, raising
            ConvBNError when writing ``ckpt`` at ``path`` would leave it next to files that
            contradict it (a TF ``.meta`` graph); ``write`` checks its own target, the CLI, which
            writes to a staging path, calls it for the final one.
        convention: the :mod:`convbn.conventions` preset the format's files follow where they
            store no setting (its eps, its momentum and how it spells momentum); None when each
            layer's own is stored (safetensors).
        records_kinds: the files say which layer is a conv and which a transposed conv (a Keras
            class name, convbn's Flax record and flipped ConvTranspose kernels, convbn's safetensors
            metadata), so writing a layer the source could not decide (:attr:`Checkpoint.kind_undecided`)
            would state a kind nobody knows: :func:`convbn.convert.check_kinds` refuses it. torch
            and TF files store the same array for either kind and record none.
        settings_note: the files store no BatchNorm eps/momentum and the writer leaves saying so
            to ``save_checkpoint``, which names them so (``"TF checkpoints"``) and compares the
            layers with the defaults of ``convention``.
    """

    suffixes: tuple[str, ...] = ()
    framework: str | None = None
    package: tuple[str, str] | None = None
    conv_bias: bool = True
    writes_others: bool = False
    writes_fused: bool = False
    write_options: frozenset[str] = frozenset()
    prefix: bool = False
    shards: Literal["index_json", "data_files"] | None = None
    flatten_order: Literal["chw", "hwc"] | None = None
    var_update: Literal["biased", "unbiased", "by_path"] | None = None
    directories: bool = False
    like_files: bool = False
    checks_destination: bool = False
    convention: str | None = None
    settings_note: str | None = None
    records_kinds: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.write_options) - OPTIONS
        if unknown:
            raise ValueError(f"write_options must be among {sorted(OPTIONS)}. Received: {sorted(unknown)}")
        if self.settings_note is not None and self.convention is None:
            raise ValueError("settings_note compares the layers with a convention's defaults: name the convention")
        if (self.shards is not None) != ("max_shard_size" in self.write_options):
            raise ValueError(
                "a format writes shards (shards=...) exactly when write() takes max_shard_size. "
                f"Received: shards={self.shards!r}, write_options={sorted(self.write_options)}"
            )

"""convbn: Conv2D + BatchNorm with one meaning in PyTorch, TensorFlow, JAX and NumPy.

Importing convbn imports no framework; a backend is loaded when a call needs it.
"""

from __future__ import annotations

from convbn import conventions
from convbn.adapters import from_flax, from_keras, from_torch, to_flax, to_keras, to_torch
from convbn.api import conv_bn, fuse, to_backend, to_numpy
from convbn.convert import Checkpoint, load_checkpoint, save_checkpoint
from convbn.dispatch import AUTO_ORDER, available_backends
from convbn.errors import ConvBNError
from convbn.loading import LoadError, LoadReport, load_into
from convbn.params import ConvBNParams
from convbn.spec import ConvBNSpec

__version__ = "0.1.0"

__all__ = [
    "AUTO_ORDER",
    "Checkpoint",
    "ConvBNError",
    "ConvBNParams",
    "ConvBNSpec",
    "LoadError",
    "LoadReport",
    "__version__",
    "available_backends",
    "conv_bn",
    "conventions",
    "from_flax",
    "from_keras",
    "from_torch",
    "fuse",
    "load_checkpoint",
    "load_into",
    "save_checkpoint",
    "to_backend",
    "to_flax",
    "to_keras",
    "to_numpy",
    "to_torch",
]

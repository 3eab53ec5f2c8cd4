"""Which backend runs a call: by the type of ``x``, cached per type, importing no framework.

A framework can only have produced ``x`` if it is already in ``sys.modules``, so dispatch looks
there before any ``issubclass`` check and never imports a framework itself. NumPy input goes to
``backend=``, else ``$CONVBN_BACKEND``, else the first installed framework in :data:`AUTO_ORDER`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from convbn.errors import ConvBNError

if TYPE_CHECKING:
    from convbn.backends import BackendModule

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "auto_backend",
    "available_backends",
    "backend_name_of",
    "load_backend",
]

#: Every backend name.
BACKENDS = ("numpy", "torch", "tensorflow", "jax")
#: The order in which NumPy input picks an installed framework when none is named: torch and JAX
#: first (fastest to import, GPU-ready), TensorFlow next, the pure-NumPy reference last.
AUTO_ORDER = ("torch", "jax", "tensorflow", "numpy")
ENV_VAR = "CONVBN_BACKEND"

_FRAMEWORK_MODULE = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax", "numpy": "numpy"}
_EXTRA = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}
_ALIASES = {"tf": "tensorflow", "pytorch": "torch", "np": "numpy"}

_type_cache: dict[type, str] = {}
#: Loaded backend modules, typed by the protocol they satisfy (checked by mypy in
#: convbn/backends/__init__.py): the hot path returns them without a cast call.
_modules: dict[str, BackendModule] = {}
_load_lock = threading.Lock()


def _classify(cls: type) -> str | None:
    if issubclass(cls, np.ndarray):
        return "numpy"
    modules = sys.modules
    torch = modules.get("torch")
    if torch is not None and issubclass(cls, torch.Tensor):
        return "torch"
    tf = modules.get("tensorflow")
    if tf is not None and hasattr(tf, "Tensor") and issubclass(cls, (tf.Tensor, tf.Variable)):
        return "tensorflow"
    jax = modules.get("jax")
    if jax is not None and hasattr(jax, "Array") and issubclass(cls, (jax.Array, jax.core.Tracer)):
        return "jax"
    return None


def backend_name_of(x: Any) -> str:
    """The backend that owns ``x``'s type: ``"numpy"``, ``"torch"``, ``"tensorflow"`` or ``"jax"``.

    Raises:
        TypeError: when ``x`` is none of a NumPy array, torch tensor, TF tensor/variable or JAX
            array/tracer.
    """
    cls = type(x)
    name = _type_cache.get(cls)
    if name is None:
        name = _classify(cls)
        if name is None:
            raise TypeError(
                "x must be a NumPy array, a torch.Tensor, a tf.Tensor/tf.Variable or a jax.Array. "
                f"Received: x of type {cls.__module__}.{cls.__qualname__}"
            )
        # A type's backend never changes, and dict assignment is atomic: no lock needed.
        _type_cache[cls] = name
    return name


def normalize_name(name: str, what: str = "backend") -> str:
    """A backend name or alias as its canonical name."""
    canonical = _ALIASES.get(str(name).lower(), str(name).lower())
    if canonical not in BACKENDS:
        raise ConvBNError(f"{what} must be one of {list(BACKENDS)}. Received: {what}={name!r}")
    return canonical


def is_installed(name: str) -> bool:
    """Whether the framework behind backend ``name`` can be imported (without importing it)."""
    module = _FRAMEWORK_MODULE[normalize_name(name)]
    return module in sys.modules or importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    """Installed backends, in :data:`AUTO_ORDER`."""
    return [name for name in AUTO_ORDER if is_installed(name)]


def auto_backend(requested: str | None = None) -> str:
    """The backend for NumPy input: ``requested``, else ``$CONVBN_BACKEND``, else the first installed."""
    if requested is not None:
        return normalize_name(requested)
    env = os.environ.get(ENV_VAR)
    if env:
        return normalize_name(env, what=ENV_VAR)
    for name in AUTO_ORDER:
        if is_installed(name):
            return name
    return "numpy"  # pragma: no cover - numpy is a dependency


def load_backend(name: str) -> BackendModule:
    """The backend module for ``name``, imported on first use; it satisfies the protocol.

    Raises:
        ImportError: naming the extra to install when the framework is missing.
    """
    module = _modules.get(name)
    if module is not None:
        return module
    name = normalize_name(name)
    with _load_lock:
        module = _modules.get(name)
        if module is None:
            if not is_installed(name):
                raise ImportError(
                    f"the {name!r} backend needs {_FRAMEWORK_MODULE[name]}, which is not installed: "
                    f"pip install 'convbn[{_EXTRA[name]}]'"
                )
            module = _modules[name] = cast("BackendModule", importlib.import_module(f"convbn.backends.{name}"))
    return module

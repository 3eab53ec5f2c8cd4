"""Backend selection for the test suite.

``CONVBN_TEST_BACKENDS`` (comma list) names the backends to test. A requested backend that is not
installed fails the run; unrequested ones are skipped; an unknown name is an error. Unset, every
installed backend is tested.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import settings

from convbn.dispatch import BACKENDS

_FRAMEWORK = {"numpy": "numpy", "torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}


def _requested() -> list[str] | None:
    raw = os.environ.get("CONVBN_TEST_BACKENDS", "").strip()
    if not raw:
        return None
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise pytest.UsageError(
            f"CONVBN_TEST_BACKENDS names unknown backends {unknown}; known: {list(BACKENDS)}"
        )
    return names


def _installed(name: str) -> bool:
    return importlib.util.find_spec(_FRAMEWORK[name]) is not None


REQUESTED = _requested()

# torch must be imported before tensorflow where both load.
if _installed("torch") and (REQUESTED is None or "torch" in REQUESTED):
    import torch  # noqa: F401

if _installed("jax"):
    import jax

    # Tests compare float64 results; library code never flips this flag on its own.
    jax.config.update("jax_enable_x64", True)


# Property-based tests: a bounded number of examples and no per-example deadline (JAX compiles
# on first use of each shape). The default profile is derandomized, so a run's verdict depends on
# the code and not on the draw; `HYPOTHESIS_PROFILE=thorough` explores 300 fresh examples per test.
settings.register_profile("ci", max_examples=12, deadline=None, print_blob=True, derandomize=True)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    if REQUESTED is not None:
        missing = [n for n in REQUESTED if not _installed(n)]
        if missing:
            raise pytest.UsageError(
                f"CONVBN_TEST_BACKENDS requests {missing}, which are not installed: "
                f"pip install 'convbn[{','.join(missing)}]'"
            )


def backend_enabled(name: str) -> bool:
    """Whether ``name`` is to be tested in this run."""
    if REQUESTED is not None:
        return name in REQUESTED
    return _installed(name)


def require_backend(name: str) -> None:
    """Skip the calling test unless ``name`` is to be tested."""
    if not backend_enabled(name):
        reason = "not requested in CONVBN_TEST_BACKENDS" if REQUESTED is not None else "not installed"
        pytest.skip(f"backend {name!r} {reason}")


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend under test in turn."""
    require_backend(request.param)
    return str(request.param)


@pytest.fixture(params=["torch", "tensorflow", "jax"])
def framework(request: pytest.FixtureRequest) -> str:
    """Each framework backend (not the NumPy reference) under test in turn."""
    require_backend(request.param)
    return str(request.param)

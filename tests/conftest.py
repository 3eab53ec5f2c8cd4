"""What a test needs, and whether its absence skips the test or fails it.

A test says what it needs in one way: ``@pytest.mark.needs("torch", "keras")`` on the test (or as a
module's ``pytestmark``), or ``need(...)`` / ``need_module(...)`` in its body, in a helper or, for a
module that imports a framework at the top, at module level before that import. Each name is a
backend (numpy, torch, tensorflow, jax) or one of the optional packages in ``PACKAGES``. No test
uses ``pytest.importorskip``: it would turn a missing package into a skip where the run must fail.

Backends. ``CONVBN_TEST_BACKENDS`` (comma list) names the backends to test; unset, every installed
backend is tested. A requested backend that is not installed fails the run at startup; an unknown
name is an error. A test that needs an unrequested backend is skipped before its body runs, so its
framework is never imported in a run that did not ask for it (tests/test_backend_selection.py
checks this with ``CONVBN_TEST_BACKENDS=numpy``).

Packages. A package that imports a framework needs that backend too: flax needs jax; keras, tf_slim
and tf_keras need tensorflow (the in-process Keras tests run on Keras's TensorFlow backend, and a
test that needs keras is skipped when ``KERAS_BACKEND`` names another). A missing package skips the
test, naming it, except in a run that is supposed to have it, where it fails the test instead:

- one that comes with a backend's install (``PACKAGES[name]`` names the backends) is expected
  whenever one of those backends is requested: flax, msgpack and orbax with jax (``convbn[jax]``
  brings orbax with flax; tox's jax env also names ``convbn[orbax]``), keras
  and h5py with tensorflow (``convbn[tensorflow]``; TensorFlow brings Keras 3), ml_dtypes with
  tensorflow or jax;
- the cross-framework oracles (tf_slim, tf_keras, safetensors, transformers) are installed only by tox's cross
  env, and expected when ``CONVBN_TEST_BACKENDS`` names all four backends, as that env does.

With ``CONVBN_TEST_BACKENDS`` unset nothing is expected: whatever is missing is skipped.
pytest and hypothesis come with the ``test`` extra and are imported here unconditionally.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import pytest
from hypothesis import settings

from convbn import dispatch
from convbn.dispatch import BACKENDS

#: Optional packages tests may need: the backends whose install brings each (an empty tuple: only
#: the cross env, which requests every backend, installs it).
PACKAGES: dict[str, tuple[str, ...]] = {
    "flax": ("jax",),
    "msgpack": ("jax",),
    "orbax": ("jax",),
    "keras": ("tensorflow",),
    "h5py": ("tensorflow",),
    "ml_dtypes": ("tensorflow", "jax"),
    "tf_slim": (),
    "tf_keras": (),
    "safetensors": (),
    "transformers": (),
}

#: The backend whose framework a package imports when it is imported.
_IMPORTS = {"flax": "jax", "orbax": "jax", "keras": "tensorflow", "tf_slim": "tensorflow", "tf_keras": "tensorflow"}


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


REQUESTED = _requested()

# torch must be imported before tensorflow where both load; neither is imported unless tested.
if dispatch.is_installed("torch") and (REQUESTED is None or "torch" in REQUESTED):
    import torch  # noqa: F401

if dispatch.is_installed("jax") and (REQUESTED is None or "jax" in REQUESTED):
    # Compiling is most of what the JAX tests spend; a persistent cache lets every later process
    # (the other xdist worker, the next tox env, the next run) load a compiled program instead.
    # Only programs that took a while to compile are worth the disk round trip. Set through the
    # environment, which JAX reads at import, so that the interpreters tests start (multi-device
    # runs, Keras on JAX, the CLI) share the cache too.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(
        os.environ.get("CONVBN_TEST_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "jax"))
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    import jax

    # Tests compare float64 results; library code never flips this flag on its own.
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
    )


# Property-based tests: a bounded number of examples and no per-example deadline (JAX compiles
# on first use of each shape). The default profile is derandomized, so a run's verdict depends on
# the code and not on the draw; `HYPOTHESIS_PROFILE=thorough` explores 300 fresh examples per test.
settings.register_profile("ci", max_examples=12, deadline=None, print_blob=True, derandomize=True)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs(*names): backends and optional packages the test needs (tests/conftest.py says when "
        "a missing one skips and when it fails)",
    )
    if REQUESTED is not None:
        missing = [n for n in REQUESTED if not dispatch.is_installed(n)]
        if missing:
            raise pytest.UsageError(
                f"CONVBN_TEST_BACKENDS requests {missing}, which are not installed: "
                f"pip install 'convbn[{','.join(missing)}]'"
            )


def _marked(item: pytest.Item) -> list[str]:
    return [name for marker in item.iter_markers("needs") for name in marker.args]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A skip found here is reported at the test's own line (one raised in setup would be reported
    # inside pytest); a missing package that was expected fails in setup, on the test itself.
    for item in items:
        if names := _marked(item):
            try:
                need(*names)
            except pytest.skip.Exception as skip:
                item.add_marker(pytest.mark.skip(reason=skip.msg))
            except pytest.fail.Exception:
                pass


def pytest_runtest_setup(item: pytest.Item) -> None:
    need(*_marked(item))


def backend_enabled(name: str) -> bool:
    """Whether backend ``name`` is to be tested in this run."""
    if REQUESTED is not None:
        return name in REQUESTED
    return dispatch.is_installed(name)


def _expected(package: str) -> bool:
    """Whether this run is supposed to have ``package`` installed (see the module docstring)."""
    if REQUESTED is None:
        return False
    homes = PACKAGES[package]
    if not homes:
        return set(BACKENDS) <= set(REQUESTED)
    return any(home in REQUESTED for home in homes)


def _not_run(name: str) -> str | None:
    """Why a test that needs ``name`` is not to run here for the backends' sake (None: it is)."""
    __tracebackhide__ = True
    if name not in BACKENDS and name not in PACKAGES:
        pytest.fail(f"need({name!r}): not a backend {list(BACKENDS)} or a package in PACKAGES", pytrace=False)
    backend = name if name in BACKENDS else _IMPORTS.get(name)
    if backend is not None and not backend_enabled(backend):
        why = "not requested in CONVBN_TEST_BACKENDS" if REQUESTED is not None else "not installed"
        return f"backend {backend!r} {why}"
    if name == "keras" and os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return "the in-process Keras tests use Keras's TensorFlow backend"
    return None


def _not_installed(name: str) -> str | None:
    """Why package ``name`` cannot be used (None: it can); fails the test where it was expected."""
    __tracebackhide__ = True
    if name in PACKAGES and importlib.util.find_spec(name) is None:
        if _expected(name):
            pytest.fail(f"{name} is not installed, but CONVBN_TEST_BACKENDS={os.environ['CONVBN_TEST_BACKENDS']} "
                        "expects it (tests/conftest.py)", pytrace=False)
        return f"{name} not installed"
    return None


def available(name: str) -> bool:
    """Whether backend or package ``name`` can be used in this run, for a test that leaves out what
    it cannot use; a missing package that was expected fails the test all the same."""
    return _not_run(name) is None and _not_installed(name) is None


def need(*names: str) -> None:
    """Skip the calling test (or module, at module level) unless every name can be used, or fail it
    where a missing package was expected; the rule is in this module's docstring."""
    __tracebackhide__ = True  # skips and failures are reported at the caller's line
    # Backends first: a test that is not to run here is skipped, whatever else it lacks.
    for check in (_not_run, _not_installed):
        for name in names:
            reason = check(name)
            if reason is not None:
                pytest.skip(reason, allow_module_level=True)


def need_module(dotted: str) -> ModuleType:
    """``need`` the package of a dotted module name, then import and return the module."""
    __tracebackhide__ = True
    need(dotted.partition(".")[0])
    return importlib.import_module(dotted)


def require_backend(name: str) -> None:
    """``need(name)`` for one backend: the spelling that predates ``need``, kept for its callers."""
    __tracebackhide__ = True
    assert name in BACKENDS, name
    need(name)


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend under test in turn."""
    __tracebackhide__ = True
    need(request.param)
    return str(request.param)


@pytest.fixture(params=["torch", "tensorflow", "jax"])
def framework(request: pytest.FixtureRequest) -> str:
    """Each framework backend (not the NumPy reference) under test in turn."""
    __tracebackhide__ = True
    need(request.param)
    return str(request.param)

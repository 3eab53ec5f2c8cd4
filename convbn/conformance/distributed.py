"""The ``distributed`` group: training across replicas against one process on the whole batch.

For ``world`` replicas, each holding a slice of one batch (even slices, uneven ones, and one
replica with no images at all), every replica runs ``conv_bn(x_slice, params, training=True,
sync=...)`` on its framework's own engine and reports what it got as a :class:`Piece`. The checks,
against the float64 reference on the whole batch:

- ``y`` of every slice;
- the new moving statistics, right and bit-identical on every replica;
- the gradient of the summed loss (each replica differentiates its own ``sum(y_slice * dy_slice)``)
  w.r.t. each replica's ``x`` slice, and the parameter gradients summed over replicas.

This module is framework-free: the cases, the inputs, the checks. Each framework's driver
(``_distributed_torch``, ``_distributed_jax``, ``_distributed_tensorflow``) runs the replicas and
calls :func:`check`; :func:`run` runs the drivers and builds the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from convbn.conformance import reference
from convbn.conformance.cases import Case, param_dtype, round_to
from convbn.conformance.results import Result
from convbn.conformance.tolerances import tolerance
from convbn.params import ConvBNParams, with_arrays

__all__ = [
    "CASES", "GROUP", "DistTask", "Piece", "check", "from_layout", "inputs", "print_results", "run",
    "run_in_subprocess", "shard", "skipped", "splits", "subprocess_arguments", "tasks", "to_layout",
]

GROUP = "distributed"
#: Images in the whole batch: 6 splits evenly over 2 and 3 replicas.
BATCH = 6

CASES = (
    Case("dist_same_s2", (BATCH, 8, 8, 3), (3, 3), 4, stride=2, note="TF SAME split (0, 1) at stride 2"),
    Case("dist_depthwise_mult", (BATCH, 7, 7, 3), (3, 3), 6, groups=3),
    Case("dist_slim_style", (BATCH, 6, 6, 3), (3, 3), 4, bias=False, gamma=False, note="beta only"),
    Case("dist_one_value", (BATCH, 1, 1, 3), (1, 1), 4, padding="VALID",
         note="one value per channel on a replica: only the global batch has statistics"),
    Case("dist_large_mean", (BATCH, 8, 8, 3), (3, 3), 4, padding="VALID", x_loc=100.0, x_scale=0.01,
         eps=1e-5, dtypes=("float64", "float32"),
         note="std / |mean| ~ 1e-4: replicas' moments must be combined as (count, mean, M2)"),
)
_EXTREME = frozenset({"dist_large_mean"})
_LAYOUTS = {"dist_same_s2": ("NHWC", "NCHW")}


def splits(world: int, quick: bool = False) -> tuple[tuple[int, ...], ...]:
    """How :data:`BATCH` images split over ``world`` replicas: evenly where it divides, unevenly
    (descending), and with one replica holding none (``world >= 2``)."""
    if world < 1:
        raise ValueError(f"world must be at least 1. Received: world={world}")
    out: list[tuple[int, ...]] = []
    if BATCH % world == 0:
        out.append((BATCH // world,) * world)
    if world >= 2:
        # 1, 2, ..., world - 1 images, the rest on the first replica.
        rest = tuple(range(world - 1, 0, -1))
        out.append((BATCH - sum(rest), *rest))
        empty = (BATCH - sum(rest[1:]), 0, *rest[1:]) if world >= 3 else (BATCH, 0)
        out.append(empty)
    unique = tuple(dict.fromkeys(out))
    return unique[:1] + unique[-1:] if quick and len(unique) > 2 else unique


@dataclasses.dataclass(frozen=True)
class DistTask:
    """One case on ``len(splits)`` replicas, in one dtype, mode and layout."""

    case: Case
    dtype: str
    mode: str  # "train_unbiased" or "train_biased"
    layout: str  # "NHWC" or "NCHW"
    splits: tuple[int, ...]

    @property
    def var_update(self) -> str:
        return "biased" if self.mode == "train_biased" else "unbiased"

    @property
    def uneven(self) -> bool:
        return len(set(self.splits)) > 1

    @property
    def label(self) -> str:
        return f"{self.case.name}[{self.mode},{self.layout},{'+'.join(map(str, self.splits))}]"


def tasks(world: int, quick: bool = False) -> list[DistTask]:
    """Every task for ``world`` replicas (``quick``: float32, one mode per case, fewer splits)."""
    dtypes = ("float32",) if quick else ("float32", "float64")
    modes = ("train_unbiased", "train_biased")
    out = []
    for i, case in enumerate(CASES):
        for dtype in dtypes:
            if not case.supports(dtype):
                continue
            for mode in (modes[i % 2],) if quick else modes:
                for layout in _LAYOUTS.get(case.name, ("NHWC",)):
                    out += [DistTask(case, dtype, mode, layout, s) for s in splits(world, quick)]
    return out


def inputs(task: DistTask) -> tuple[np.ndarray, ConvBNParams, np.ndarray]:
    """``(x, params, dy)`` for the whole batch: ``x`` and ``dy`` NHWC in the task's dtype, params
    NumPy (float32 for float32, float64 for float64)."""
    return _inputs(task.case, task.dtype, task.var_update)


@functools.lru_cache(maxsize=64)
def _inputs(case: Case, dtype: str, var_update: str) -> tuple[np.ndarray, ConvBNParams, np.ndarray]:
    x64, params = case.params(seed=0, var_update=var_update)
    pd = param_dtype(dtype)
    params = with_arrays(params, **{k: np.asarray(v, pd) for k, v in params.arrays().items()})
    x = round_to(x64, dtype)
    dy = round_to(np.random.default_rng(1).standard_normal(reference.forward(x, params, False).y.shape), dtype)
    return x, params, dy


def shard(task: DistTask, a: np.ndarray, rank: int) -> np.ndarray:
    """Replica ``rank``'s slice of the batch axis of ``a``."""
    start = sum(task.splits[:rank])
    return a[start : start + task.splits[rank]]


def to_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """An NHWC array in ``layout``."""
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if layout == "NCHW" else a


def from_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """An array in ``layout`` as NHWC."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if layout == "NCHW" else a


@dataclasses.dataclass
class Piece:
    """What replica ``rank`` produced, as NumPy: ``y`` and ``grads["x"]`` NHWC (its slice), the new
    moving statistics, and its gradients of its own ``sum(y_slice * dy_slice)`` w.r.t. ``x`` and
    each params array present (``kernel`` HWIO, ``bias``, ``gamma``, ``beta``)."""

    rank: int
    y: np.ndarray
    moving_mean: np.ndarray
    moving_var: np.ndarray
    grads: dict[str, np.ndarray]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly (nested lists), for drivers that return pieces from a subprocess."""
        return {
            "rank": self.rank, "y": _listed(self.y), "moving_mean": _listed(self.moving_mean),
            "moving_var": _listed(self.moving_var), "grads": {k: _listed(v) for k, v in self.grads.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Piece:
        return cls(d["rank"], _unlisted(d["y"]), _unlisted(d["moving_mean"]), _unlisted(d["moving_var"]),
                   {k: _unlisted(v) for k, v in d["grads"].items()})


def _listed(a: np.ndarray) -> dict[str, Any]:
    a = np.asarray(a)
    return {"shape": list(a.shape), "dtype": a.dtype.str, "data": a.astype(np.float64).ravel().tolist()}


def _unlisted(d: dict[str, Any]) -> np.ndarray:
    return np.asarray(d["data"], np.float64).astype(np.dtype(d["dtype"])).reshape(d["shape"])


@dataclasses.dataclass(frozen=True)
class _Expected:
    forward: reference.Forward
    grads: dict[str, np.ndarray]
    bias_scale: float
    kernel_scale: float | None  # extreme cases only (see reference.kernel_grad_scale)


@functools.lru_cache(maxsize=64)
def _expected(case: Case, dtype: str, var_update: str) -> _Expected:
    x, params, dy = _inputs(case, dtype, var_update)
    return _Expected(
        reference.forward(x, params, True),
        reference.gradients(x, params, dy, True),
        reference.bias_grad_scale(x, params, dy),
        reference.kernel_grad_scale(x, params, dy) if case.name in _EXTREME else None,
    )


def skipped(backend: str, device: str, task: DistTask, why: str) -> Result:
    """A task this engine cannot run (e.g. uneven shards where the framework shards evenly)."""
    return Result(backend, device, GROUP, task.dtype, task.label, "skip", detail=why)


def _result(backend: str, device: str, task: DistTask, quantity: str, error: float, tol: float,
            detail: str = "") -> Result:
    ok = bool(np.isfinite(error)) and error <= tol
    return Result(backend, device, GROUP, task.dtype, task.label, "pass" if ok else "fail",
                  float(error), tol, quantity, detail)


def check(backend: str, device: str, task: DistTask, pieces: Sequence[Piece]) -> list[Result]:
    """Compare ``world`` replicas' pieces with the float64 reference on the whole batch.

    ``device`` names where the replicas ran and how many there were, e.g. ``"cpu x3"``: the report
    has a row per backend and device.

    Tolerances are the single-process ones of the same quantity (``train``/``extreme`` for ``y``,
    ``stats`` for the moving statistics, ``grad`` for gradients): combining replicas' moments adds
    a few roundings, far below them. The moving statistics must be bit-identical across replicas
    (tolerance 0): replicas that drift apart are the failure synchronized BatchNorm exists to stop.
    """
    ranks = sorted(p.rank for p in pieces)
    if ranks != list(range(len(task.splits))):
        return [Result(backend, device, GROUP, task.dtype, task.label, "fail",
                       detail=f"pieces from ranks {ranks}, expected 0..{len(task.splits) - 1}")]
    pieces = sorted(pieces, key=lambda p: p.rank)
    exp = _expected(task.case, task.dtype, task.var_update)
    ref = exp.forward
    assert ref.moving_mean is not None and ref.moving_var is not None
    y_group = "extreme" if task.case.name in _EXTREME else "train"
    results = []

    y = np.concatenate([np.asarray(p.y, np.float64) for p in pieces])
    err, where = reference.output_error(y, ref.y, ref.y, -1, ref.floor)
    results.append(_result(backend, device, task, "y", err, tolerance(y_group, task.dtype), where))

    worst = (-1.0, "", "")
    for p in pieces:
        m_err, m_where = reference.mean_error(p.moving_mean, ref.moving_mean, ref.moving_mean, ref.moving_var)
        v_err, v_where = reference.var_error(p.moving_var, ref.moving_var, ref.moving_var)
        for name, e, w in (("moving_mean", m_err, m_where), ("moving_var", v_err, v_where)):
            if e > worst[0]:
                worst = (e, name, f"rank {p.rank}, {w}")
    results.append(_result(backend, device, task, worst[1], worst[0], tolerance("stats", task.dtype), worst[2]))

    first = pieces[0]
    # NaN compares false, so the spread is an array maximum with NaN counted as infinite.
    diffs = [np.abs(np.asarray(getattr(p, k), np.float64) - np.asarray(getattr(first, k), np.float64))
             for p in pieces for k in ("moving_mean", "moving_var")]
    spread = float(np.max(np.nan_to_num(np.concatenate([a.ravel() for a in diffs]), nan=np.inf), initial=0.0))
    results.append(_result(backend, device, task, "moving stats equal on every replica", spread, 0.0,
                           "largest difference between replicas"))

    expected_names = set(exp.grads)
    for p in pieces:
        if set(p.grads) != expected_names:
            results.append(Result(backend, device, GROUP, task.dtype, task.label, "fail",
                                  detail=f"rank {p.rank} gave gradients for {sorted(p.grads)}, "
                                         f"expected {sorted(expected_names)}"))
            return results
    got = {"x": np.concatenate([np.asarray(p.grads["x"], np.float64) for p in pieces])}
    for name in expected_names - {"x"}:
        got[name] = np.sum([np.asarray(p.grads[name], np.float64) for p in pieces], axis=0)
    # An extreme case's inputs are known to a few digits of their spread only (z near 100, std
    # 0.01): its gradients have the extreme group's tolerance, and the kernel gradient, a sum that
    # cancels, is measured against sum |x| |dz| as the dot-product error bound says.
    g_group = "extreme" if task.case.name in _EXTREME else "grad"
    g_worst = ("", -1.0)
    for name in sorted(expected_names):
        scale = {"bias": exp.bias_scale, "kernel": exp.kernel_scale}.get(name)
        e = reference.grad_error(got[name], exp.grads[name], exp.grads[name], scale)
        if e > g_worst[1]:
            g_worst = (name, e)
    results.append(_result(backend, device, task, f"d{g_worst[0]}", g_worst[1], tolerance(g_group, task.dtype),
                           "x per slice, parameters summed over replicas"))
    return results


def run_in_subprocess(module: str, backend: str, world: int, quick: bool, env: dict[str, str], what: str) -> list[Result]:
    """``python -m module --world N [--quick]`` in a fresh interpreter, its Results back as JSON.

    For replicas a process makes only when it starts (JAX's host devices, TF's logical CPUs).
    ``env`` is added to this process's environment; ``what`` names the replicas in the failure
    reported when the subprocess gives no results (its last stderr line says why).
    """
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), **env}
    command = [sys.executable, "-m", module, "--world", str(world), *(["--quick"] if quick else [])]
    proc = subprocess.run(command, env=full, capture_output=True, text=True, check=False)
    try:
        return [Result(**r) for r in json.loads(proc.stdout)]
    except (ValueError, TypeError):
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}, no output"]
        why = f"the {backend} subprocess with {what} did not report: {lines[-1]}"
        return [Result(backend, f"cpu x{world}", GROUP, "float32", "subprocess", "fail", detail=why, exception=why)]


def subprocess_arguments(module: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The ``--world`` and ``--quick`` of a driver's subprocess (see :func:`run_in_subprocess`)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--quick", action="store_true")
    return parser.parse_args(argv)


def print_results(results: Sequence[Result]) -> None:
    """A driver subprocess's Results as JSON on stdout, for :func:`run_in_subprocess`."""
    json.dump([dataclasses.asdict(r) for r in results], sys.stdout)


#: Backends with a distributed driver, in report order.
BACKENDS = ("torch", "jax", "tensorflow")


def run(
    backends: Sequence[str] | None = None,
    *,
    worlds: Sequence[int] = (2, 3),
    quick: bool = False,
) -> Any:
    """Run the ``distributed`` group on each backend's own engine, for each world size.

    On CPU each driver makes its replicas itself (torch: processes with gloo; JAX: host devices in a
    subprocess; TF: logical CPU devices under MirroredStrategy in a subprocess). Under ``torchrun``
    the torch driver runs on the launched processes instead.

    Returns:
        A :class:`convbn.conformance.report.Report` of the ``distributed`` results.
    """
    from convbn.conformance.report import Report, environment
    from convbn.conformance.runner import select

    names = [n for n in select(backends) if n in BACKENDS]
    results: list[Result] = []
    for name in names:
        driver = importlib.import_module(f"convbn.conformance._distributed_{name}")
        for world in worlds:
            results += driver.run(world, quick=quick)
    meta = environment(names, {n: ["cpu"] for n in names}, quick=quick, allow_tf32=False, precision={})
    meta["distributed"] = {"worlds": list(worlds)}
    return Report(results, meta)

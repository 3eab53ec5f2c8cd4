"""The JAX driver of the ``distributed`` group: replicas are devices under ``jax.shard_map``.

Each task runs as one jitted ``shard_map`` over a 1-D mesh of ``world`` devices: every device
gets its slice of the batch, calls ``conv_bn(x, params, training=True, sync=AXIS)`` and
differentiates its own loss ``sum(y_slice * dy_slice)``. The params enter replicated and are cast
to varying inside: differentiated as replicated values, JAX returns their gradient already summed
over the devices (the transpose of the implicit broadcast is a ``psum``), the same total on each;
a :class:`~convbn.conformance.distributed.Piece` holds one replica's own share, so the shares
summed over replicas are the total, as the checks expect and as torch's DDP sees them before it
averages.

``shard_map`` and ``pmap`` give every device the same number of images, so uneven splits
(including a replica with none) are reported as skipped. Where the process sees fewer than
``world`` devices (a CPU, one GPU), :func:`run` reruns this module in a subprocess with ``world``
host CPU devices (``--xla_force_host_platform_device_count``, which must be set before JAX starts)
and float64 on: that subprocess is a program of its own, so it may turn on ``jax_enable_x64``.

Example (a subprocess with 2 CPU devices; float32 only, one mode per case):
    >>> from convbn.conformance import _distributed_jax
    >>> results = _distributed_jax.run(2, quick=True)  # doctest: +SKIP
    >>> sorted({r.status for r in results})  # doctest: +SKIP
    ['pass', 'skip']
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from convbn.conformance.distributed import (
    DistTask,
    Piece,
    check,
    from_layout,
    inputs,
    print_results,
    run_in_subprocess,
    skipped,
    subprocess_arguments,
    tasks,
    to_layout,
)
from convbn.conformance.results import Result

__all__ = ["AXIS", "run", "run_here"]

BACKEND = "jax"
#: The mesh axis the replicas share statistics over (``sync=AXIS``).
AXIS = "replicas"
#: Parameter gradients a Piece carries, when the params have them.
_PARAM_GRADS = ("kernel", "bias", "gamma", "beta")
_UNEVEN = ("shard_map and pmap give every device the same number of images, so JAX cannot hold "
           "these uneven shards")


def run(world: int, quick: bool = False) -> list[Result]:
    """The ``distributed`` group on ``world`` JAX devices: this process's when it has that many,
    otherwise ``world`` host CPU devices in a subprocess.

    Returns:
        One :class:`~convbn.conformance.runner.Result` per check and task (uneven splits skipped);
        a subprocess that fails to report is one failed Result naming its last stderr line.
    """
    import jax

    if len(jax.devices()) >= world:
        return run_here(world, quick)
    return _run_subprocess(world, quick)


def run_here(world: int, quick: bool = False) -> list[Result]:
    """The ``distributed`` group on the first ``world`` of this process's devices.

    Float64 tasks need ``jax_enable_x64`` (``convbn conformance`` turns it on); without it they
    are skipped. Raises ``ValueError`` when the process has fewer than ``world`` devices.
    """
    import jax

    devices = jax.devices()
    if len(devices) < world:
        raise ValueError(f"world={world} needs {world} JAX devices; this process has {len(devices)}")
    mesh = jax.sharding.Mesh(np.array(devices[:world]), (AXIS,))
    device = f"{devices[0].platform} x{world}"
    x64 = bool(jax.config.read("jax_enable_x64"))
    results: list[Result] = []
    for task in tasks(world, quick):
        if task.uneven:
            results.append(skipped(BACKEND, device, task, _UNEVEN))
        elif task.dtype == "float64" and not x64:
            results.append(skipped(BACKEND, device, task, "float64 on JAX needs jax_enable_x64"))
        else:
            try:
                pieces = _pieces(mesh, task)
            except Exception as exc:  # a crash is this task's failure, not the run's
                crash = f"{type(exc).__name__}: {exc}"
                results.append(Result(BACKEND, device, "distributed", task.dtype, task.label, "fail",
                                      detail=f"raised {crash}", exception=crash))
                continue
            results += check(BACKEND, device, task, pieces)
    return results


@functools.lru_cache(maxsize=8)
def _step(mesh: Any, layout: str) -> Callable[..., Any]:
    """The jitted shard_map of one replica's training step and its gradients, per mesh and layout."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    from convbn.api import conv_bn

    def replica(x: Any, dy: Any, params: Any) -> Any:
        # Varying params: each device's gradient is its own share, not the total (module docstring).
        params = jax.tree.map(lambda a: jax.lax.pcast(a, AXIS, to="varying"), params)

        def loss(x: Any, params: Any) -> Any:
            y, new = conv_bn(x, params, training=True, data_format=layout, sync=AXIS)
            return jnp.sum(y * dy), (y, new.moving_mean, new.moving_var)

        (dx, dparams), (y, mean, var) = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)
        # A leading replica axis, so each device's statistics and shares come back separately.
        stacked = jax.tree.map(lambda a: a[None], (mean, var, dparams))
        return (y, dx, *stacked)

    shard = PartitionSpec(AXIS)
    return jax.jit(jax.shard_map(replica, mesh=mesh, in_specs=(shard, shard, PartitionSpec()), out_specs=shard))


def _pieces(mesh: Any, task: DistTask) -> list[Piece]:
    """Every replica's :class:`Piece` for ``task`` (even splits only)."""
    import jax
    import jax.numpy as jnp

    x, params, dy = inputs(task)
    native = jax.tree.map(jnp.asarray, params)
    out = _step(mesh, task.layout)(to_layout(x, task.layout), to_layout(dy, task.layout), native)
    y, dx, mean, var, dparams = jax.tree.map(np.asarray, out)
    pieces, start = [], 0
    for rank, n in enumerate(task.splits):
        rows = slice(start, start + n)
        start += n
        grads = {"x": from_layout(dx[rows], task.layout)}
        grads.update({k: getattr(dparams, k)[rank] for k in _PARAM_GRADS if getattr(params, k) is not None})
        pieces.append(Piece(rank, from_layout(y[rows], task.layout), mean[rank], var[rank], grads))
    return pieces


def _run_subprocess(world: int, quick: bool) -> list[Result]:
    """:func:`run_here` in a fresh interpreter with ``world`` host CPU devices."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={world}".strip()
    return run_in_subprocess(__name__, BACKEND, world, quick, {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
                             f"{world} CPU devices")


def main(argv: list[str] | None = None) -> None:
    """The subprocess: float64 on, run on this process's devices, Results as JSON on stdout."""
    args = subprocess_arguments(__name__, argv)
    import jax

    jax.config.update("jax_enable_x64", True)
    print_results(run_here(args.world, args.quick))


if __name__ == "__main__":
    main()

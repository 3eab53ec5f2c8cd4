"""The TensorFlow driver of the ``distributed`` group: replicas of a ``tf.distribute`` strategy.

Each task runs one ``tf.function`` that calls ``strategy.run`` (the usual training step): every
replica gets its slice of the batch from ``experimental_distribute_values_from_function``, so
uneven slices and an empty one are held as they are, calls ``conv_bn(x, params, training=True,
sync=True)`` and differentiates its own loss ``sum(y_slice * dy_slice)`` with a ``GradientTape``.
The params enter each replica as its own tensors, so each replica's parameter gradient is its own
share, as a ``MirroredStrategy`` optimizer sees it before summing.

On CPU the replicas are logical CPU devices under ``MirroredStrategy``. TF fixes its devices when it
first uses them, so unless this process already has ``world`` logical CPUs, :func:`run` reruns this
module in a subprocess that configures them first and reports its Results as JSON. On GPUs, or
under any single-worker strategy of your own, call :func:`run_here` with it:

    >>> import tensorflow as tf  # doctest: +SKIP
    >>> from convbn.conformance import _distributed_tensorflow
    >>> results = _distributed_tensorflow.run_here(tf.distribute.MirroredStrategy())  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from convbn.conformance.distributed import (
    GROUP,
    DistTask,
    Piece,
    check,
    from_layout,
    inputs,
    print_results,
    run_in_subprocess,
    shard,
    subprocess_arguments,
    tasks,
    to_layout,
)
from convbn.conformance.results import Result

__all__ = ["run", "run_here"]

BACKEND = "tensorflow"
#: Parameter gradients a Piece carries, when the params have them.
_PARAM_GRADS = ("kernel", "bias", "gamma", "beta")


def run(world: int, quick: bool = False) -> list[Result]:
    """The ``distributed`` group on ``world`` logical CPU devices under ``MirroredStrategy``: in
    this process when it already has that many, otherwise in a subprocess that makes them.

    Returns:
        One :class:`~convbn.conformance.runner.Result` per check and task; a subprocess that fails
        to report is one failed Result naming its last stderr line.
    """
    if "tensorflow" in sys.modules:  # never import TF here: a fresh process may configure it
        import tensorflow as tf

        cpus = tf.config.list_logical_devices("CPU")
        if len(cpus) >= world:
            return run_here(tf.distribute.MirroredStrategy([d.name for d in cpus[:world]]), quick)
    return _run_subprocess(world, quick)


def run_here(strategy: Any, quick: bool = False) -> list[Result]:
    """The ``distributed`` group on the replicas of ``strategy`` (single-worker: MirroredStrategy,
    OneDeviceStrategy, TPUStrategy), one task at a time.

    Returns:
        One :class:`~convbn.conformance.runner.Result` per check and task, the device named
        ``"<kind> x<replicas>"``; a task that raises is one failed Result.
    """
    world = strategy.num_replicas_in_sync
    kind = strategy.extended.worker_devices[0].rsplit("/device:", 1)[-1].split(":")[0].lower()
    device = f"{kind} x{world}"
    results: list[Result] = []
    for task in tasks(world, quick):
        try:
            pieces = _pieces(strategy, task)
        except Exception as exc:  # a crash is this task's failure, not the run's
            crash = f"{type(exc).__name__}: {exc}"
            results.append(Result(BACKEND, device, GROUP, task.dtype, task.label, "fail",
                                  detail=f"raised {crash}", exception=crash))
            continue
        results += check(BACKEND, device, task, pieces)
    return results


def _pieces(strategy: Any, task: DistTask) -> list[Piece]:
    """Every replica's :class:`Piece` for ``task``, from one traced ``strategy.run``."""
    import tensorflow as tf

    from convbn.api import conv_bn
    from convbn.params import with_arrays

    x, params, dy = inputs(task)
    names = [k for k in _PARAM_GRADS if getattr(params, k) is not None]

    def per_replica(a: np.ndarray) -> Any:
        a = to_layout(a, task.layout)
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(shard(task, a, ctx.replica_id_in_sync_group))
        )

    def replica(x: Any, dy: Any) -> Any:
        own = {k: tf.constant(v) for k, v in params.arrays().items()}
        watched = [x, *(own[k] for k in names)]
        with tf.GradientTape() as tape:
            tape.watch(watched)
            y, new = conv_bn(x, with_arrays(params, **own), training=True, data_format=task.layout, sync=True)
            loss = tf.reduce_sum(y * dy)
        grads = tape.gradient(loss, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return y, new.moving_mean, new.moving_var, grads

    step = tf.function(lambda x, dy: strategy.run(replica, args=(x, dy)), autograph=False)
    y, mean, var, grads = step(per_replica(x), per_replica(dy))
    local = strategy.experimental_local_results
    pieces = []
    for rank, (y_r, mean_r, var_r, *grads_r) in enumerate(
        zip(local(y), local(mean), local(var), *(local(g) for g in grads), strict=True)
    ):
        got = {"x": from_layout(grads_r[0].numpy(), task.layout)}
        got.update({k: g.numpy() for k, g in zip(names, grads_r[1:], strict=True)})
        pieces.append(Piece(rank, from_layout(y_r.numpy(), task.layout), mean_r.numpy(), var_r.numpy(), got))
    return pieces


def _run_subprocess(world: int, quick: bool) -> list[Result]:
    """:func:`run` in a fresh interpreter that makes ``world`` logical CPUs."""
    return run_in_subprocess(__name__, BACKEND, world, quick, {}, f"{world} logical CPUs")


def main(argv: list[str] | None = None) -> None:
    """The subprocess: ``world`` logical CPUs (before TF uses its devices), Results as JSON."""
    args = subprocess_arguments(__name__, argv)
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.world)
    print_results(run(args.world, args.quick))


if __name__ == "__main__":
    main()

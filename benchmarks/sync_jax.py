"""JAX: a synchronized training step under ``shard_map`` on 2 devices, as ratios.

Per shape (the global batch split over the devices), timed interleaved (see
:func:`benchmarks.common.interleaved`):

- convbn ``conv_bn(..., sync="data")`` against flax.linen ``Conv`` + ``BatchNorm(axis_name="data")``,
  the layer it replaces: with Flax's default one-pass variance (``use_fast_variance=True``, what
  Flax users get) and with its two-pass one (``False``, convbn's numerics);
- convbn synchronized against convbn unsynchronized: the cost of the collectives.

A step is ``jax.value_and_grad`` of each device's ``sum(y * dy)`` with respect to the weights and
the input, returning the new batch statistics, jitted around the ``shard_map``; the weights are
replicated, so their gradients come back summed over the devices on both sides.

On a CPU the devices are host devices: ``--xla_force_host_platform_device_count`` is added to
``XLA_FLAGS`` before JAX is imported. Run: ``python -m benchmarks.sync_jax`` (``--quick`` for a
smoke run, ``--devices N``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import SHAPES, Shape, interleaved, rel_err

AXIS = "data"
EPS = 1e-5
MOMENTUM = 0.99


def _steps(shape: Shape, devices: int) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """Each contender's jitted step on ``shape``: name -> (run it, its y and moving variance)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import convbn

    a = shape.arrays()
    mesh = Mesh(np.array(jax.devices()[:devices]), (AXIS,))
    x, dy = jnp.asarray(a["x"]), jnp.asarray(a["dy"])

    class Native(nn.Module):
        fast: bool

        @nn.compact
        def __call__(self, x: Any) -> Any:
            z = nn.Conv(shape.out, (shape.k, shape.k), strides=shape.stride, padding="SAME", use_bias=False,
                        feature_group_count=shape.groups)(x)
            return nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS, axis_name=AXIS,
                                use_fast_variance=self.fast)(z)

    def native(fast: bool) -> tuple[Callable[..., Any], tuple[Any, Any]]:
        model = Native(fast)

        def loss(trainable: Any, stats: Any, xb: Any, dyb: Any) -> Any:
            y, upd = model.apply({"params": trainable, "batch_stats": stats}, xb, mutable=["batch_stats"])
            return jnp.sum(y * dyb), (y, upd["batch_stats"]["BatchNorm_0"]["var"])

        trainable = {"Conv_0": {"kernel": jnp.asarray(a["kernel"])},
                     "BatchNorm_0": {"scale": jnp.asarray(a["gamma"]), "bias": jnp.asarray(a["beta"])}}
        stats = {"BatchNorm_0": {"mean": jnp.asarray(a["moving_mean"]), "var": jnp.asarray(a["moving_var"])}}
        return loss, (trainable, stats)

    def ours(sync: str | None) -> tuple[Callable[..., Any], tuple[Any, Any]]:
        def loss(trainable: Any, stats: Any, xb: Any, dyb: Any) -> Any:
            p = convbn.ConvBNParams(**trainable, **stats, stride=shape.stride, padding="SAME", groups=shape.groups,
                                    eps=EPS, momentum=MOMENTUM, var_update="biased")
            y, new = convbn.conv_bn(xb, p, training=True, sync=sync)
            return jnp.sum(y * dyb), (y, new.moving_var)

        trainable = {k: jnp.asarray(a[k]) for k in ("kernel", "gamma", "beta")}
        stats = {k: jnp.asarray(a[k]) for k in ("moving_mean", "moving_var")}
        return loss, (trainable, stats)

    def compiled(loss: Callable[..., Any], weights: tuple[Any, Any]) -> tuple[Callable[[], Any], Callable[[], Any]]:
        def replica(trainable: Any, stats: Any, xb: Any, dyb: Any) -> Any:
            (_, (y, var)), grads = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)(trainable, stats, xb, dyb)
            return (y, var[None]), grads

        # y, dx and each device's moving variance per device; the weights' gradients are summed.
        out = ((P(AXIS), P(AXIS)), (P(), P(AXIS)))
        step = jax.jit(jax.shard_map(replica, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=out))
        trainable, stats = weights

        def results() -> Any:
            (y, var), _ = step(trainable, stats, x, dy)
            return np.asarray(y), np.asarray(var)[0]

        return lambda: step(trainable, stats, x, dy), results

    return {
        "convbn sync": compiled(*ours(AXIS)),
        "convbn unsynced": compiled(*ours(None)),
        "flax BatchNorm(axis_name)": compiled(*native(True)),
        "flax BatchNorm(axis_name, use_fast_variance=False)": compiled(*native(False)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one small shape, few samples")
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--min-time", type=float, default=0.2)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time this process's CPU seconds (less sensitive to a busy machine)")
    parser.add_argument("--shapes", nargs="+", choices=[s.name for s in SHAPES], help="default: all")
    args = parser.parse_args(argv)
    if "jax" in sys.modules:
        raise SystemExit("run as a program: the host device count must be set before JAX is imported")
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}".strip()
    )
    import jax

    print(f"jax {jax.__version__}, {args.devices} devices: {jax.devices()[: args.devices]}")
    shapes = SHAPES[:1] if args.quick else [s for s in SHAPES if not args.shapes or s.name in args.shapes]
    samples, min_time = (3, 0.05) if args.quick else (args.samples, args.min_time)
    clock = time.process_time if args.cpu_time else time.perf_counter
    for shape in shapes:
        # Each device needs at least one image, and shard_map splits the batch evenly.
        shape = dataclasses.replace(shape, n=max(shape.n, args.devices) // args.devices * args.devices)
        steps = _steps(shape, args.devices)
        ours_run, ours_results = steps["convbn sync"]
        y, var = ours_results()
        print(f"\n{shape.name}: {shape.describe()}, {shape.n // args.devices} per device")
        for name in ("flax BatchNorm(axis_name)", "flax BatchNorm(axis_name, use_fast_variance=False)",
                     "convbn unsynced"):
            run, results = steps[name]
            t = interleaved(ours_run, run, jax.block_until_ready, samples=samples, min_time=min_time, clock=clock)
            agree = ""
            if name.startswith("flax"):
                yn, varn = results()
                agree = f"; max rel diff y {rel_err(y, yn):.1e}, moving var {rel_err(var, varn):.1e}"
            print(f"  convbn sync / {name}: {t.ratio:.3f} (IQR {t.ratio_q1:.3f}-{t.ratio_q3:.3f}), "
                  f"{t.convbn_s * 1e3:.2f} ms vs {t.native_s * 1e3:.2f} ms{agree}")


if __name__ == "__main__":
    main()

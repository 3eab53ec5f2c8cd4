"""JAX: ``conv_bn`` against ``flax.linen`` ``Conv`` + ``BatchNorm``, both under ``jax.jit``.

NHWC only: flax's ``Conv`` has no channels-first layout. Eval jits ``model.apply`` against a jitted
``conv_bn``; training jits ``jax.value_and_grad`` of ``sum(y * dy)`` with respect to the trainable
weights and the input, returning the updated batch statistics, on both sides. Flax's BatchNorm
runs with its defaults (``use_fast_variance=True``, the one-pass E[x^2] - E[x]^2 variance), which
is what flax users get; convbn's variance is numerically sound on large-mean data (see
docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import convbn
from benchmarks.common import Contest, Shape

NAME = "jax"
DATA_FORMATS = ("NHWC",)
EPS = 1e-5
MOMENTUM = 0.99


def environment() -> dict[str, Any]:
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
    }


class _ConvBN(nn.Module):
    shape: Shape

    @nn.compact
    def __call__(self, x: Any, train: bool) -> Any:
        s = self.shape
        x = nn.Conv(s.out, (s.k, s.k), strides=s.stride, padding="SAME", use_bias=False,
                    feature_group_count=s.groups)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPS)(x)


def _variables(a: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "params": {"Conv_0": {"kernel": jnp.asarray(a["kernel"])},
                   "BatchNorm_0": {"scale": jnp.asarray(a["gamma"]), "bias": jnp.asarray(a["beta"])}},
        "batch_stats": {"BatchNorm_0": {"mean": jnp.asarray(a["moving_mean"]),
                                        "var": jnp.asarray(a["moving_var"])}},
    }


def _params(shape: Shape, a: dict[str, np.ndarray]) -> convbn.ConvBNParams:
    return convbn.to_backend(convbn.ConvBNParams(
        kernel=a["kernel"], gamma=a["gamma"], beta=a["beta"],
        moving_mean=a["moving_mean"], moving_var=a["moving_var"],
        stride=shape.stride, padding="SAME", groups=shape.groups,
        eps=EPS, momentum=MOMENTUM, var_update="biased",
    ), "jax")


def _sync(out: Any) -> Any:
    return jax.block_until_ready(out)


def contests(shape: Shape, data_formats: tuple[str, ...] = DATA_FORMATS) -> Iterator[Contest]:
    a = shape.arrays()
    x = jnp.asarray(a["x"])
    dy = jnp.asarray(a["dy"])
    model = _ConvBN(shape)
    variables = _variables(a)
    params = _params(shape, a)

    eval_convbn = jax.jit(lambda p, xb: convbn.conv_bn(xb, p))
    eval_native = jax.jit(lambda v, xb: model.apply(v, xb, False))

    def eval_outputs() -> Any:
        return {"y": np.asarray(eval_convbn(params, x))}, {"y": np.asarray(eval_native(variables, x))}

    yield Contest(NAME, shape, "eval", "NHWC jit", lambda: eval_convbn(params, x),
                  lambda: eval_native(variables, x), eval_outputs, "flax.linen Conv+BatchNorm, jit", _sync)

    # Both sides take the trainable weights and the statistics as separate trees (as flax does)
    # and return the new statistics; convbn's params are assembled inside the jitted step.
    def convbn_loss(trainable: Any, stats: Any, xb: Any) -> Any:
        p = convbn.ConvBNParams(**trainable, **stats, stride=shape.stride, padding="SAME", groups=shape.groups,
                                eps=EPS, momentum=MOMENTUM, var_update="biased")
        y, new = convbn.conv_bn(xb, p, training=True)
        return jnp.sum(y * dy), (y, {"moving_mean": new.moving_mean, "moving_var": new.moving_var})

    def native_loss(trainable: Any, stats: Any, xb: Any) -> Any:
        y, updates = model.apply({"params": trainable, "batch_stats": stats}, xb, True, mutable=["batch_stats"])
        return jnp.sum(y * dy), (y, updates["batch_stats"])

    train_convbn = jax.jit(jax.value_and_grad(convbn_loss, argnums=(0, 2), has_aux=True))
    train_native = jax.jit(jax.value_and_grad(native_loss, argnums=(0, 2), has_aux=True))
    trainable, stats = variables["params"], variables["batch_stats"]
    ours_trainable = {"kernel": params.kernel, "gamma": params.gamma, "beta": params.beta}
    ours_stats = {"moving_mean": params.moving_mean, "moving_var": params.moving_var}

    def train_outputs() -> Any:
        (_, (y, new)), (gp, gx) = train_convbn(ours_trainable, ours_stats, x)
        (_, (yn, newn)), (gpn, gxn) = train_native(trainable, stats, x)
        ours = {"y": np.asarray(y), "dx": np.asarray(gx), "dkernel": np.asarray(gp["kernel"]),
                "dgamma": np.asarray(gp["gamma"]), "moving_mean": np.asarray(new["moving_mean"]),
                "moving_var": np.asarray(new["moving_var"])}
        theirs = {"y": np.asarray(yn), "dx": np.asarray(gxn), "dkernel": np.asarray(gpn["Conv_0"]["kernel"]),
                  "dgamma": np.asarray(gpn["BatchNorm_0"]["scale"]),
                  "moving_mean": np.asarray(newn["BatchNorm_0"]["mean"]),
                  "moving_var": np.asarray(newn["BatchNorm_0"]["var"])}
        return ours, theirs

    yield Contest(NAME, shape, "train", "NHWC jit", lambda: train_convbn(ours_trainable, ours_stats, x),
                  lambda: train_native(trainable, stats, x), train_outputs,
                  "flax.linen, jit(value_and_grad) step", _sync)

"""The small reference nets the tests build, per framework, from each framework's ordinary layers.

Two families, each importing its framework only when built:

- :func:`torch_stem_dw_pw` and :func:`keras_stem_dw_pw`: a strided stem, a depthwise conv and a
  1x1 conv, each followed by a BatchNorm, as a torch ``nn.Sequential`` and its tf_keras / Keras 3
  twin (the Keras 2 ``.h5`` and ``load_into`` tests).
- :func:`keras_two_conv_bn`: two Conv2D + BatchNormalization pairs in tf_keras or Keras 3 (the
  fuzzer's seed files).
- One torchvision-style residual block, below.


``conv1 (3x3, stride 2, pad 1) -> bn1 -> relu -> conv2 (3x3, pad 1) -> bn2``, plus a shortcut
``conv (1x1, stride 2) -> bn``, added, then a ReLU: torchvision's ``BasicBlock`` with a downsample.
Every framework expresses this geometry identically (symmetric padding 1: torch ``padding=1``,
Keras ``ZeroPadding2D(1)`` + ``"valid"``, Flax ``((1, 1), (1, 1))``), so outputs agree on any input
size. BatchNorm eps is 1e-5 everywhere (torch's and Flax's default; Keras is told).

Each framework has ``build`` (a fresh model), ``assign`` (put the values of :func:`random_values`
in, with the framework's own API) and ``run`` (NHWC NumPy in, NHWC NumPy out, eval mode).
Nothing imports a framework at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

IN, OUT = 4, 8
X_SHAPE = (2, 8, 8, IN)
EPS = 1e-5
# (kernel size, in, out) of conv1, conv2 and the shortcut conv, in forward order.
LAYERS = [(3, IN, OUT), (3, OUT, OUT), (1, IN, OUT)]


def random_values(seed: int = 0, bias: bool = False) -> list[dict[str, np.ndarray]]:
    """Per layer: HWIO kernel, optional conv bias, gamma, beta, moving mean and variance (float32)."""
    rng = np.random.default_rng(seed)
    out = []
    for k, cin, cout in LAYERS:
        v = {
            "kernel": rng.standard_normal((k, k, cin, cout)) * 0.4,
            "gamma": rng.uniform(0.5, 1.5, cout),
            "beta": rng.normal(0, 0.2, cout),
            "mean": rng.normal(0, 0.3, cout),
            "var": rng.uniform(0.3, 2.0, cout),
        }
        if bias:
            v["bias"] = rng.normal(0, 0.5, cout)
        out.append({name: a.astype(np.float32) for name, a in v.items()})
    return out


def checkpoint_of(values: list[dict[str, np.ndarray]], eps: float = EPS) -> Any:
    """A :class:`convbn.convert.Checkpoint` holding ``values`` as layers ``L0``, ``L1``, ...
    (the geometry of a format that stores none)."""
    import convbn
    from convbn.convert import Checkpoint, LayerSource

    ckpt = Checkpoint(format="safetensors")
    for i, v in enumerate(values):
        key = f"L{i}"
        ckpt.layers[key] = convbn.ConvBNParams(
            kernel=v["kernel"], bias=v.get("bias"), gamma=v["gamma"], beta=v["beta"],
            moving_mean=v["mean"], moving_var=v["var"], eps=eps,
        )
        ckpt.sources[key] = LayerSource(conv={}, bn={}, reason="explicit", conv_name=key, bn_name=f"{key}_bn")
    return ckpt


def x_input(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(X_SHAPE).astype(np.float32)


# -- torch -------------------------------------------------------------------------------------------


def torch_build(bias: bool = False, eps: float = EPS) -> Any:
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(IN, OUT, 3, stride=2, padding=1, bias=bias)
            self.bn1 = nn.BatchNorm2d(OUT, eps=eps)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(OUT, OUT, 3, padding=1, bias=bias)
            self.bn2 = nn.BatchNorm2d(OUT, eps=eps)
            self.downsample = nn.Sequential(nn.Conv2d(IN, OUT, 1, stride=2, bias=bias), nn.BatchNorm2d(OUT, eps=eps))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out = out + self.downsample(identity)
            return self.relu(out)

    torch.manual_seed(123)
    return BasicBlock().eval()


TORCH_PAIRS = ["conv1", "conv2", "downsample.0"]


def torch_assign(model: Any, values: list[dict[str, np.ndarray]]) -> Any:
    import torch

    modules = [(model.conv1, model.bn1), (model.conv2, model.bn2), (model.downsample[0], model.downsample[1])]
    with torch.no_grad():
        for (conv, bn), v in zip(modules, values, strict=True):
            conv.weight.copy_(torch.from_numpy(v["kernel"].transpose(3, 2, 0, 1).copy()))
            if "bias" in v:
                conv.bias.copy_(torch.from_numpy(v["bias"]))
            bn.weight.copy_(torch.from_numpy(v["gamma"]))
            bn.bias.copy_(torch.from_numpy(v["beta"]))
            bn.running_mean.copy_(torch.from_numpy(v["mean"]))
            bn.running_var.copy_(torch.from_numpy(v["var"]))
    return model


def torch_run(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()  # type: ignore[no-any-return]


def torch_save(model: Any, path: Path) -> None:
    import torch

    torch.save(model.state_dict(), path)


# -- Keras 3 -----------------------------------------------------------------------------------------


def keras_build(bias: bool = False, eps: float = EPS, head: bool = False) -> Any:
    import keras

    L = keras.layers
    x = keras.Input(X_SHAPE[1:])
    h = L.ZeroPadding2D(1)(x)
    h = L.Conv2D(OUT, 3, strides=2, use_bias=bias, name="conv1")(h)
    h = L.ReLU()(L.BatchNormalization(epsilon=eps, name="bn1")(h))
    h = L.Conv2D(OUT, 3, padding="same", use_bias=bias, name="conv2")(h)
    h = L.BatchNormalization(epsilon=eps, name="bn2")(h)
    s = L.Conv2D(OUT, 1, strides=2, use_bias=bias, name="down_conv")(x)
    s = L.BatchNormalization(epsilon=eps, name="down_bn")(s)
    y = L.ReLU(name="block_out")(L.Add()([h, s]))
    if head:
        y = L.Dense(3, name="head")(L.GlobalAveragePooling2D()(y))
    return keras.Model(x, y)


KERAS_PAIRS = ["conv1", "conv2", "down_conv"]


def keras_assign(model: Any, values: list[dict[str, np.ndarray]]) -> Any:
    for (conv, bn), v in zip((("conv1", "bn1"), ("conv2", "bn2"), ("down_conv", "down_bn")), values, strict=True):
        model.get_layer(conv).set_weights([v["kernel"], *([v["bias"]] if "bias" in v else [])])
        model.get_layer(bn).set_weights([v["gamma"], v["beta"], v["mean"], v["var"]])
    return model


def keras_run(model: Any, x: np.ndarray) -> np.ndarray:
    import keras

    return keras.ops.convert_to_numpy(model(x, training=False))  # type: ignore[no-any-return]


def keras_save(model: Any, path: Path) -> None:
    model.save_weights(path)


# -- Flax linen --------------------------------------------------------------------------------------


def flax_module(bias: bool = False, eps: float = EPS) -> Any:
    from flax import linen as nn

    class BasicBlock(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:
            def bn() -> nn.BatchNorm:
                return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=eps)

            out = nn.Conv(OUT, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=bias)(x)
            out = nn.relu(bn()(out))
            out = nn.Conv(OUT, (3, 3), padding=((1, 1), (1, 1)), use_bias=bias)(out)
            out = bn()(out)
            shortcut = bn()(nn.Conv(OUT, (1, 1), strides=2, padding="VALID", use_bias=bias)(x))
            return nn.relu(out + shortcut)

    return BasicBlock()


FLAX_PAIRS = ["Conv_0", "Conv_1", "Conv_2"]


def flax_build(bias: bool = False, eps: float = EPS) -> tuple[Any, Any]:
    """``(module, variables)``: the tree ``init`` returns (module creation order)."""
    import jax
    import jax.numpy as jnp

    module = flax_module(bias, eps)
    return module, module.init(jax.random.key(0), jnp.zeros(X_SHAPE, jnp.float32))


def flax_assign(variables: Any, values: list[dict[str, np.ndarray]]) -> Any:
    """A new tree (same key order) holding ``values``."""
    import jax.numpy as jnp

    params = {k: dict(v) for k, v in variables["params"].items()}
    stats = {k: dict(v) for k, v in variables["batch_stats"].items()}
    for i, v in enumerate(values):
        params[f"Conv_{i}"]["kernel"] = jnp.asarray(v["kernel"])
        if "bias" in v:
            params[f"Conv_{i}"]["bias"] = jnp.asarray(v["bias"])
        params[f"BatchNorm_{i}"] = {"scale": jnp.asarray(v["gamma"]), "bias": jnp.asarray(v["beta"])}
        stats[f"BatchNorm_{i}"] = {"mean": jnp.asarray(v["mean"]), "var": jnp.asarray(v["var"])}
    return {"params": params, "batch_stats": stats}


def flax_run(module: Any, variables: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(module.apply(variables, x, train=False))


def flax_save(variables: Any, path: Path) -> None:
    from flax import serialization

    path.write_bytes(serialization.to_bytes(variables))


# -- stem, depthwise, 1x1: torch and its Keras twin ------------------------------------------------


def torch_stem_dw_pw(bias: tuple[bool, bool, bool], eps: float = 1e-5, width: int = 16) -> Any:
    """``conv 3x3/2 pad 1 (3->8) -> BN -> ReLU -> depthwise 3x3 pad 1 -> BN -> ReLU -> conv 1x1
    (8->width) -> BN``, in eval mode; ``bias`` says which of the three convs have one. Weights come
    from ``torch.manual_seed(0)``, then every BatchNorm gets trained-looking statistics."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=bias[0]), nn.BatchNorm2d(8, eps=eps), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=bias[1]), nn.BatchNorm2d(8, eps=eps), nn.ReLU(),
        nn.Conv2d(8, width, 1, bias=bias[2]), nn.BatchNorm2d(width, eps=eps),
    )
    for bn in net[1::3]:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    return net.eval()


def keras_stem_dw_pw(
    keras: Any, names: tuple[str, str, str], bias: tuple[bool, bool, bool], eps: float = 1e-3, width: int = 16
) -> Any:
    """:func:`torch_stem_dw_pw`'s twin on 9x9x3 NHWC input, built with ``keras`` (the ``tf_keras``
    or ``keras`` module): ``ZeroPadding2D(1)`` + a VALID stride-2 conv (TF's SAME would differ at
    stride 2), convs named ``names``, each BatchNorm ``<name>_bn``."""
    layers = keras.layers
    inp = keras.Input((9, 9, 3))
    x = layers.ZeroPadding2D(1)(inp)
    x = layers.Conv2D(8, 3, strides=2, use_bias=bias[0], name=names[0])(x)
    x = layers.BatchNormalization(epsilon=eps, name=f"{names[0]}_bn")(x)
    x = layers.ReLU()(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=bias[1], name=names[1])(x)
    x = layers.BatchNormalization(epsilon=eps, name=f"{names[1]}_bn")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(width, 1, use_bias=bias[2], name=names[2])(x)
    x = layers.BatchNormalization(epsilon=eps, name=f"{names[2]}_bn")(x)
    return keras.Model(inp, x)


def keras_two_conv_bn(keras: Any) -> Any:
    """``Conv2D(4, 3, same) -> BN -> Conv2D(4, 3, stride 2, no bias) -> BN`` on 8x8x3 input, built
    with ``keras`` (the ``tf_keras`` or ``keras`` module) after ``set_random_seed(0)``; the
    BatchNorms keep their initial statistics."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, padding="same"), keras.layers.BatchNormalization(),
        keras.layers.Conv2D(4, 3, strides=2, use_bias=False), keras.layers.BatchNormalization(),
    ])

"""A small ResNet (stem, a basic block, a bottleneck block), built from each framework's own layers.

``stem``: conv 3x3 3->8 + bn + relu. ``b1`` (basic, 8->8): ``b1_conv1``, ``b1_conv2`` (3x3), the
identity added. ``b2`` (bottleneck, 8->8->32, stride 2): ``b2_conv1`` (1x1), ``b2_conv2`` (3x3,
stride 2, padding 1), ``b2_conv3`` (1x1 8->32), and the shortcut ``b2_down`` (1x1 8->32, stride 2),
added. ``b2_conv3`` and ``b2_down`` have the same kernel shape, (1, 1, 8, 32), and ``b1_conv1``,
``b1_conv2``, ``b2_conv2`` share (3, 3, 8, 8): order and shape cannot tell them apart.

Each framework lists the shortcut somewhere else: torch registers ``b2_down`` before ``b2_conv3``
and runs it between ``b2_conv2`` and ``b2_conv3``; Keras lists it after ``b2_conv3`` (its graph
order); Flax creates it first in the block. ``names`` gives each layer its key as name (Keras
``b2_conv3``, Flax ``b2_conv3``, torch attribute ``b2_conv3``), so names correspond; ``names=None``
gives Keras's and Flax's generated names.

``BLOCK`` alone (``block=True``) is the bottleneck on its own, the "swap case".
Every ``run`` takes and gives NHWC NumPy, eval mode. Nothing imports a framework at import time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-5
IN = 3
X_SHAPE = (2, 12, 12, IN)
# key: (kernel, in, out, stride, padding)
LAYERS = {
    "stem": (3, IN, 8, 1, 1),
    "b1_conv1": (3, 8, 8, 1, 1),
    "b1_conv2": (3, 8, 8, 1, 1),
    "b2_conv1": (1, 8, 8, 1, 0),
    "b2_conv2": (3, 8, 8, 2, 1),
    "b2_down": (1, 8, 32, 2, 0),
    "b2_conv3": (1, 8, 32, 1, 0),
}
BLOCK_X_SHAPE = (2, 12, 12, 8)


def x_input(seed: int = 1, block: bool = False) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(BLOCK_X_SHAPE if block else X_SHAPE).astype(np.float32)


def keys(block: bool = False) -> list[str]:
    return [k for k in LAYERS if k.startswith("b2_")] if block else list(LAYERS)


# -- torch -------------------------------------------------------------------------------------------


def torch_build(block: bool = False, seed: int = 0) -> Any:
    """The torch model, every BatchNorm with random statistics (``seed``)."""
    import torch
    from torch import nn

    layers = keys(block)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for key in layers:  # registration order: b2_down before b2_conv3
                k, cin, cout, stride, pad = LAYERS[key]
                setattr(self, key, nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False))
                setattr(self, f"{key}_bn", nn.BatchNorm2d(cout, eps=EPS))

        def cbr(self, key: str, x: Any, relu: bool = True) -> Any:
            y = getattr(self, f"{key}_bn")(getattr(self, key)(x))
            return torch.relu(y) if relu else y

        def forward(self, x: Any) -> Any:
            if not block:
                x = self.cbr("stem", x)
                x = torch.relu(self.cbr("b1_conv2", self.cbr("b1_conv1", x), relu=False) + x)
            h = self.cbr("b2_conv2", self.cbr("b2_conv1", x))
            shortcut = self.cbr("b2_down", x, relu=False)  # run between conv2 and conv3
            return torch.relu(self.cbr("b2_conv3", h, relu=False) + shortcut)

    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.3, 2.0)
    return net.eval()


def torch_run(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()  # type: ignore[no-any-return]


# -- Keras 3 -----------------------------------------------------------------------------------------


def keras_build(block: bool = False, names: str | None = "") -> Any:
    """The Keras functional model; layer names are ``key + names`` (None: Keras's generated names)."""
    import keras

    L = keras.layers

    def name(key: str, suffix: str = "") -> str | None:
        return None if names is None else f"{key}{suffix}{names}"

    def cbr(key: str, x: Any, relu: bool = True) -> Any:
        k, _, cout, stride, pad = LAYERS[key]
        if pad:
            x = L.ZeroPadding2D(pad)(x)
        x = L.Conv2D(cout, k, strides=stride, use_bias=False, name=name(key))(x)
        x = L.BatchNormalization(epsilon=EPS, name=name(key, "_bn"))(x)
        return L.ReLU()(x) if relu else x

    inp = keras.Input((BLOCK_X_SHAPE if block else X_SHAPE)[1:])
    x = inp
    if not block:
        x = cbr("stem", x)
        x = L.ReLU()(L.Add()([cbr("b1_conv2", cbr("b1_conv1", x), relu=False), x]))
    h = cbr("b2_conv3", cbr("b2_conv2", cbr("b2_conv1", x)), relu=False)
    y = L.ReLU()(L.Add()([h, cbr("b2_down", x, relu=False)]))
    return keras.Model(inp, y)


def keras_run(model: Any, x: np.ndarray) -> np.ndarray:
    import keras

    return keras.ops.convert_to_numpy(model(x, training=False))  # type: ignore[no-any-return]


# -- Flax linen --------------------------------------------------------------------------------------


def flax_build(block: bool = False, names: str | None = "") -> tuple[Any, Any]:
    """``(module, variables)``; the shortcut is created first in the block."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    def name(key: str, suffix: str = "") -> str | None:
        return None if names is None else f"{key}{suffix}{names}"

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            def cbr(key: str, x: Any, relu: bool = True) -> Any:
                k, _, cout, stride, pad = LAYERS[key]
                x = nn.Conv(cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)), use_bias=False,
                            name=name(key))(x)
                x = nn.BatchNorm(use_running_average=True, epsilon=EPS, name=name(key, "_bn"))(x)
                return nn.relu(x) if relu else x

            if not block:
                x = cbr("stem", x)
                x = nn.relu(cbr("b1_conv2", cbr("b1_conv1", x), relu=False) + x)
            shortcut = cbr("b2_down", x, relu=False)
            h = cbr("b2_conv3", cbr("b2_conv2", cbr("b2_conv1", x)), relu=False)
            return nn.relu(h + shortcut)

    module = Net()
    return module, module.init(jax.random.key(0), jnp.zeros(BLOCK_X_SHAPE if block else X_SHAPE, jnp.float32))


def flax_run(model: tuple[Any, Any], x: np.ndarray) -> np.ndarray:
    module, variables = model
    return np.asarray(module.apply(variables, x))

"""The whole nets of :mod:`tests._support.whole_nets`, written independently in Keras 3 and Flax linen.

Each port computes what the torch net computes (NHWC instead of NCHW): torch's symmetric
``padding=1`` at stride 2 is an explicit ``ZeroPadding2D(1)`` + ``"valid"`` conv (Keras) or explicit
pads (Flax), since TF's ``"same"`` pads stride-2 convs on even sizes at the bottom/right only, and
every BatchNorm has torch's eps 1e-5.

The Keras ports use Keras's own layer names (``conv2d_7``, ``dense_1``), which convbn never takes as
names: their layers match torch's by the graph's structure and order only. The Flax ports name their
modules in their own words (``stem``, ``s1b0_a``), none of which corresponds to a torch name. The
Keras EfficientNet's ``Dense`` before its BatchNormalization has no bias, so torch's bias is folded.

Importing this module imports neither Keras nor Flax: each builder imports its framework.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-5


# -- Keras 3 -----------------------------------------------------------------------------------------


def _k_conv(x: Any, filters: int, k: int, stride: int = 1, bias: bool = False, depthwise: bool = False) -> Any:
    """A conv padded as torch's ``padding=k // 2``."""
    from keras import layers as L

    if k > 1 and stride > 1:
        x = L.ZeroPadding2D(k // 2)(x)
        padding = "valid"
    else:
        padding = "same"
    if depthwise:
        return L.DepthwiseConv2D(k, strides=stride, padding=padding, use_bias=bias)(x)
    return L.Conv2D(filters, k, strides=stride, padding=padding, use_bias=bias)(x)


def _k_bn(x: Any) -> Any:
    from keras import layers as L

    return L.BatchNormalization(epsilon=EPS)(x)


def _k_basic(x: Any, cin: int, cout: int, stride: int = 1) -> Any:
    from keras import layers as L

    y = L.ReLU()(_k_bn(_k_conv(x, cout, 3, stride)))
    y = _k_bn(_k_conv(y, cout, 3))
    short = x if stride == 1 and cin == cout else _k_bn(_k_conv(x, cout, 1, stride))
    return L.ReLU()(L.Add()([y, short]))


def _k_bottleneck(x: Any, cin: int, width: int) -> Any:
    from keras import layers as L

    cout = width * 4
    y = L.ReLU()(_k_bn(_k_conv(x, width, 1)))
    y = L.ReLU()(_k_bn(_k_conv(y, width, 3)))
    y = _k_bn(_k_conv(y, cout, 1))
    short = x if cin == cout else _k_bn(_k_conv(x, cout, 1))
    return L.ReLU()(L.Add()([y, short]))


def keras_resnet(classes: int = 5, size: int = 16) -> Any:
    import keras
    from keras import layers as L

    inp = keras.Input((size, size, 3))
    x = L.ReLU()(_k_bn(_k_conv(inp, 8, 3)))
    x = _k_basic(x, 8, 8)
    x = _k_basic(x, 8, 16, 2)
    x = _k_bottleneck(x, 16, 8)
    x = _k_bottleneck(x, 32, 8)
    return keras.Model(inp, L.Dense(classes)(L.GlobalAveragePooling2D()(x)))


def _k_inverted(x: Any, cin: int, cout: int, stride: int, expand: int) -> Any:
    from keras import layers as L

    hidden = cin * expand
    y = x
    if expand != 1:
        y = L.ReLU(6.0)(_k_bn(_k_conv(y, hidden, 1)))
    y = L.ReLU(6.0)(_k_bn(_k_conv(y, hidden, 3, stride, depthwise=True)))
    y = _k_bn(_k_conv(y, cout, 1))
    return L.Add()([x, y]) if stride == 1 and cin == cout else y


def keras_mobilenet_v2(classes: int = 5, size: int = 16) -> Any:
    import keras
    from keras import layers as L

    inp = keras.Input((size, size, 3))
    x = L.ReLU(6.0)(_k_bn(_k_conv(inp, 8, 3, 2)))
    x = _k_inverted(x, 8, 8, 1, 1)
    x = _k_inverted(x, 8, 12, 2, 4)
    x = _k_inverted(x, 12, 12, 1, 4)
    x = L.ReLU(6.0)(_k_bn(_k_conv(x, 24, 1)))
    x = L.Dropout(0.2)(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, L.Dense(classes)(x))


def keras_efficient(classes: int = 5, size: int = 16) -> Any:
    import keras
    from keras import layers as L

    inp = keras.Input((size, size, 3))
    x = L.ReLU()(_k_conv(inp, 8, 3, 2, bias=True))
    y = L.ReLU()(_k_bn(_k_conv(x, 16, 1)))
    y = L.ReLU()(_k_bn(_k_conv(y, 16, 3, depthwise=True)))
    s = L.GlobalAveragePooling2D(keepdims=True)(y)
    s = L.Conv2D(16, 1, activation="sigmoid")(L.Conv2D(4, 1, activation="relu")(s))
    y = _k_bn(_k_conv(L.Multiply()([y, s]), 8, 1))
    x = L.GlobalAveragePooling2D()(L.Add()([x, y]))
    x = L.ReLU()(L.BatchNormalization(epsilon=EPS)(L.Dense(12, use_bias=False)(x)))
    return keras.Model(inp, L.Dense(classes)(x))


KERAS = {"resnet": keras_resnet, "mobilenet_v2": keras_mobilenet_v2, "efficient": keras_efficient}


def keras_run(model: Any, x: np.ndarray) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


# -- Flax linen --------------------------------------------------------------------------------------


def _flax_modules() -> dict[str, Any]:
    """The Flax modules, defined on first use (so that importing this module imports no Flax)."""
    import flax.linen as nn
    import jax.numpy as jnp

    def pads(k: int) -> Any:
        return ((k // 2, k // 2), (k // 2, k // 2))

    class ConvNorm(nn.Module):
        features: int
        k: int
        stride: int = 1
        groups: int = 1

        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.Conv(self.features, (self.k, self.k), self.stride, padding=pads(self.k),
                        feature_group_count=self.groups, use_bias=False, name="w")(x)
            return nn.BatchNorm(use_running_average=True, epsilon=EPS, name="n")(x)

    class Basic(nn.Module):
        cin: int
        cout: int
        stride: int = 1

        @nn.compact
        def __call__(self, x: Any) -> Any:
            y = nn.relu(ConvNorm(self.cout, 3, self.stride, name="a")(x))
            y = ConvNorm(self.cout, 3, name="b")(y)
            short = x if self.stride == 1 and self.cin == self.cout else ConvNorm(self.cout, 1, self.stride,
                                                                                  name="skip")(x)
            return nn.relu(y + short)

    class Bottle(nn.Module):
        cin: int
        width: int

        @nn.compact
        def __call__(self, x: Any) -> Any:
            cout = self.width * 4
            y = nn.relu(ConvNorm(self.width, 1, name="reduce")(x))
            y = nn.relu(ConvNorm(self.width, 3, name="spatial")(y))
            y = ConvNorm(cout, 1, name="grow")(y)
            short = x if self.cin == cout else ConvNorm(cout, 1, name="skip")(x)
            return nn.relu(y + short)

    class ResNet(nn.Module):
        classes: int = 5

        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.relu(ConvNorm(8, 3, name="stem")(x))
            x = Basic(8, 8, name="s1b0")(x)
            x = Basic(8, 16, 2, name="s1b1")(x)
            x = Bottle(16, 8, name="s2b0")(x)
            x = Bottle(32, 8, name="s2b1")(x)
            return nn.Dense(self.classes, name="logits")(x.mean((1, 2)))

    class Inverted(nn.Module):
        cin: int
        cout: int
        stride: int
        expand: int

        @nn.compact
        def __call__(self, x: Any) -> Any:
            hidden = self.cin * self.expand
            y = x
            if self.expand != 1:
                y = jnp.clip(ConvNorm(hidden, 1, name="expand")(y), 0, 6)
            y = jnp.clip(ConvNorm(hidden, 3, self.stride, hidden, name="depthwise")(y), 0, 6)
            y = ConvNorm(self.cout, 1, name="project")(y)
            return x + y if self.stride == 1 and self.cin == self.cout else y

    class MobileNetV2(nn.Module):
        classes: int = 5

        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = jnp.clip(ConvNorm(8, 3, 2, name="stem")(x), 0, 6)
            x = Inverted(8, 8, 1, 1, name="ir0")(x)
            x = Inverted(8, 12, 2, 4, name="ir1")(x)
            x = Inverted(12, 12, 1, 4, name="ir2")(x)
            x = jnp.clip(ConvNorm(24, 1, name="top")(x), 0, 6)
            return nn.Dense(self.classes, name="logits")(x.mean((1, 2)))

    class Efficient(nn.Module):
        classes: int = 5

        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.relu(nn.Conv(8, (3, 3), 2, padding=pads(3), name="stem")(x))
            y = nn.relu(ConvNorm(16, 1, name="pointwise")(x))
            y = nn.relu(ConvNorm(16, 3, 1, 16, name="depthwise")(y))
            s = y.mean((1, 2), keepdims=True)
            s = nn.Conv(4, (1, 1), name="squeeze")(s)
            s = nn.sigmoid(nn.Conv(16, (1, 1), name="excite")(nn.relu(s)))
            y = ConvNorm(8, 1, name="project")(y * s)
            x = (x + y).mean((1, 2))
            x = nn.Dense(12, name="hidden")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=EPS, name="hidden_norm")(x))
            return nn.Dense(self.classes, name="logits")(x)

    return {"resnet": ResNet, "mobilenet_v2": MobileNetV2, "efficient": Efficient}


def flax_build(name: str, size: int = 16, seed: int = 0) -> tuple[Any, Any]:
    """``(module, variables)`` of the Flax port of net ``name``, freshly initialized."""
    import jax

    module = _flax_modules()[name]()
    variables = module.init(jax.random.PRNGKey(seed), np.zeros((1, size, size, 3), np.float32))
    return module, variables


def flax_run(module: Any, variables: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(module.apply(variables, x))

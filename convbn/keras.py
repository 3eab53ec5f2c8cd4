"""``ConvBN``: Conv2D + BatchNorm as a Keras 3 layer that computes :func:`convbn.conv_bn`.

Importing this module imports Keras (set ``KERAS_BACKEND`` before, as always with Keras). The layer
runs on whichever Keras backend is in use (TensorFlow, JAX or torch) through convbn's backend for
that framework, so the numbers are convbn's on all three: TF's SAME padding, explicit padding,
stride together with dilation, the two-pass batch variance (Keras-on-torch's BatchNormalization
computes E[x^2]-E[x]^2), and the moving variance updated the biased (Keras 3) or unbiased (torch,
Keras 2, tf-slim) way. Its weights carry Keras's own names: ``kernel``, ``bias``, ``gamma``,
``beta``, ``moving_mean``, ``moving_variance``.

The layer is registered for serialization as ``"convbn>ConvBN"``: import ``convbn.keras`` before
``keras.models.load_model`` on a ``.keras`` file that contains it.

Example:
    >>> import keras
    >>> from convbn.keras import ConvBN
    >>> model = keras.Sequential([keras.Input((32, 32, 3)), ConvBN(16, 3, strides=2), keras.layers.ReLU()])
    >>> model.output_shape
    (None, 16, 16, 16)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from convbn import adapters
from convbn.api import conv_bn
from convbn.errors import ConvBNError
from convbn.geometry import plan_for_spec
from convbn.params import ConvBNParams, assemble
from convbn.spec import ConvBNSpec, VarUpdate

__all__ = ["ConvBN"]

# The layer's argument for each spec field it names differently (for the spec's errors).
_ARGUMENTS = {"out_channels": "filters", "stride": "strides", "dilation": "dilation_rate", "eps": "epsilon"}

_WEIGHTS = (
    ("kernel", "kernel"), ("bias", "bias"), ("gamma", "gamma"), ("beta", "beta"),
    ("moving_mean", "moving_mean"), ("moving_variance", "moving_var"),
)


def _padding_config(padding: Any) -> Any:
    """The padding as it goes in the config: ``"same"``/``"valid"`` or nested lists of pairs."""
    if isinstance(padding, str):
        return padding.lower()
    return [list(side) for side in padding]


@keras.saving.register_keras_serializable(package="convbn")
class ConvBN(keras.layers.Layer):
    """Conv2D followed by BatchNormalization, computed by :func:`convbn.conv_bn`.

    It behaves as ``Conv2D`` + ``BatchNormalization`` do: ``training=True`` (which ``fit`` passes)
    normalizes with the batch statistics and updates ``moving_mean``/``moving_variance``; without
    it, or when the layer is ``trainable=False``, it uses the moving statistics and updates nothing.
    ``momentum`` is Keras's: the fraction of the old moving value kept.

    Args:
        filters: output channels.
        kernel_size: an int or ``(kh, kw)``.
        strides: an int or a pair.
        padding: ``"same"`` (TF's), ``"valid"``, an int, ``(ph, pw)`` or ``((top, bottom), (left,
            right))``.
        data_format: ``"channels_last"`` or ``"channels_first"``; None is
            ``keras.config.image_data_format()``.
        dilation_rate: an int or a pair (may be combined with strides > 1).
        groups: conv groups; ``groups == input channels`` is depthwise.
        use_bias: whether the conv has a bias (redundant before BatchNorm; kept for converted weights).
        momentum: fraction of the moving statistics kept per training step.
        epsilon: added to the variance inside the square root.
        var_update: ``"biased"`` (Keras 3's, Flax's) or ``"unbiased"`` (torch's, Keras 2's fused,
            tf-slim's) batch variance for the moving-variance update.
        center: whether BatchNorm has ``beta``.
        scale: whether BatchNorm has ``gamma``.
        kernel_initializer, bias_initializer, beta_initializer, gamma_initializer,
        moving_mean_initializer, moving_variance_initializer: Keras initializers.
        kernel_regularizer, bias_regularizer, beta_regularizer, gamma_regularizer: Keras
            regularizers.
        synchronized: Keras's ``BatchNormalization(synchronized=True)``, TensorFlow backend only:
            in training, inside ``strategy.run`` of a ``tf.distribute`` strategy (``fit`` under
            ``strategy.scope()``), the batch statistics are those of every replica's batch
            together and each replica's moving statistics get the same update
            (``conv_bn(..., sync=True)``). Where there is no replica to share with (no strategy,
            one replica, or a call in the strategy's cross-replica context) it uses this call's
            batch, as Keras's layer does. On the JAX and torch backends it is refused, as by Keras.
        **kwargs: ``Layer`` arguments (``name``, ``dtype``, ``trainable``, ...).

    Raises:
        ConvBNError: for a malformed geometry or convention, a bad ``data_format``, ``synchronized``
            on a backend other than TensorFlow, or (when built) input channels that ``groups``
            does not divide.

    Example:
        >>> import numpy as np
        >>> from convbn.keras import ConvBN
        >>> layer = ConvBN(8, 3, strides=2, padding="same")
        >>> y = layer(np.random.rand(2, 9, 9, 4).astype("float32"), training=True)
        >>> tuple(y.shape), [w.name for w in layer.weights]
        ((2, 5, 5, 8), ['kernel', 'gamma', 'beta', 'moving_mean', 'moving_variance'])
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int],
        strides: int | tuple[int, int] = 1,
        padding: Any = "same",
        data_format: str | None = None,
        dilation_rate: int | tuple[int, int] = 1,
        groups: int = 1,
        use_bias: bool = False,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        var_update: VarUpdate = "biased",
        center: bool = True,
        scale: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        synchronized: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if synchronized and keras.backend.backend() != "tensorflow":
            raise ConvBNError(
                "synchronized=True is only supported with the TensorFlow backend (as for Keras's "
                "BatchNormalization); on JAX, call convbn.conv_bn(..., sync=axis_name) inside "
                f"shard_map. Received: synchronized=True with KERAS_BACKEND={keras.backend.backend()!r}"
            )
        self.synchronized = bool(synchronized)
        # Geometry and convention are validated here, once; the input channels join at build.
        self._spec = ConvBNSpec.named(
            _ARGUMENTS, kernel_size=kernel_size, out_channels=filters, stride=strides, padding=padding,
            dilation=dilation_rate, groups=groups, eps=epsilon, momentum=momentum, var_update=var_update,
        )
        self.filters: int = self._spec.out_channels  # type: ignore[assignment]
        self.kernel_size: tuple[int, int] = self._spec.kernel_size  # type: ignore[assignment]
        self.data_format = adapters.keras_data_format(data_format)
        self.use_bias = bool(use_bias)
        self.center = bool(center)
        self.scale = bool(scale)
        self.strides = self._spec.stride
        self.padding = _padding_config(self._spec.padding)
        self.dilation_rate = self._spec.dilation
        self.groups = self._spec.groups
        self.momentum = self._spec.momentum
        self.epsilon = self._spec.eps
        self.var_update: VarUpdate = self._spec.var_update
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self._data_format_code = "NHWC" if self.data_format == "channels_last" else "NCHW"
        self._channel_axis = 3 if self.data_format == "channels_last" else 1
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape: Any) -> None:
        channels = input_shape[self._channel_axis]
        if channels is None:
            raise ConvBNError(
                f"the channel dimension of the input must be known to build the layer (axis "
                f"{self._channel_axis}, data_format={self.data_format!r}). Received: input_shape={tuple(input_shape)}"
            )
        if channels % self.groups:
            raise ConvBNError(
                f"groups must divide the input channels. Received: groups={self.groups}, "
                f"input_shape={tuple(input_shape)} (data_format={self.data_format!r})"
            )
        self._spec = dataclasses.replace(self._spec, in_channels=channels)
        shape = (self.filters,)
        self.kernel = self.add_weight(
            name="kernel", shape=(*self.kernel_size, channels // self.groups, self.filters),
            initializer=self.kernel_initializer, regularizer=self.kernel_regularizer, autocast=False,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=shape, initializer=self.bias_initializer,
                regularizer=self.bias_regularizer, autocast=False,
            )
        self.gamma = None
        if self.scale:
            self.gamma = self.add_weight(
                name="gamma", shape=shape, initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, autocast=False,
            )
        self.beta = None
        if self.center:
            self.beta = self.add_weight(
                name="beta", shape=shape, initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, autocast=False,
            )
        self.moving_mean = self.add_weight(
            name="moving_mean", shape=shape, initializer=self.moving_mean_initializer,
            trainable=False, autocast=False,
        )
        self.moving_variance = self.add_weight(
            name="moving_variance", shape=shape, initializer=self.moving_variance_initializer,
            trainable=False, autocast=False,
        )
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={self._channel_axis: channels})

    def _current_params(self) -> ConvBNParams:
        """The layer's params holding the variables' current values as the backend's tensors."""
        values = {}
        for attr, field in _WEIGHTS:
            variable = getattr(self, attr)
            # The backend's own tensor (tf.Variable, torch Parameter, or the JAX value of the
            # current stateless scope), so gradients and tracing see the variable itself.
            values[field] = None if variable is None else variable.value
        return assemble(self._current_spec(), **values)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        params = self._current_params()
        if training and self.trainable:
            y, new = conv_bn(inputs, params, True, data_format=self._data_format_code,
                             sync=self.synchronized and _in_replica_context())
            self.moving_mean.assign(new.moving_mean)
            self.moving_variance.assign(new.moving_var)
        else:
            y = conv_bn(inputs, params, data_format=self._data_format_code)
        return y

    def compute_output_shape(self, input_shape: Any) -> tuple[int | None, ...]:
        shape = tuple(input_shape)
        spec = self._spec
        if spec.in_channels is None:  # asked before build: the input's channels complete the spec
            spec = dataclasses.replace(spec, in_channels=shape[self._channel_axis])
        plan = plan_for_spec(shape, spec, self._data_format_code, False)
        if self.data_format == "channels_last":
            return (shape[0], *plan.out_hw, self.filters)
        return (shape[0], self.filters, *plan.out_hw)

    # -- params ------------------------------------------------------------------------------------

    def _current_spec(self) -> ConvBNSpec:
        """The spec with the layer's current ``momentum``/``epsilon``/``var_update`` (users may set
        them between calls), checked again only when one changed."""
        spec = self._spec
        if (spec.momentum, spec.eps, spec.var_update) != (self.momentum, self.epsilon, self.var_update):
            spec = self._spec = dataclasses.replace(
                spec, momentum=self.momentum, eps=self.epsilon, var_update=self.var_update
            )
        return spec

    def params(self) -> ConvBNParams:
        """A snapshot of the built layer as :class:`ConvBNParams` (NumPy copies).

        ``conv_bn(x, layer.params(), training=..., data_format=...)`` gives exactly the layer's
        output for the same ``x``.

        Raises:
            ConvBNError: when the layer is not built yet.

        Example:
            >>> from convbn.keras import ConvBN
            >>> layer = ConvBN(8, 3)
            >>> layer.build((None, 16, 16, 4))
            >>> p = layer.params()
            >>> p.kernel.shape, p.momentum, p.var_update
            ((3, 3, 4, 8), 0.99, 'biased')
        """
        if not self.built:
            raise ConvBNError(f"the layer must be built before its params exist. Received: layer {self.name!r} unbuilt")
        values = {}
        for attr, field in _WEIGHTS:
            variable = getattr(self, attr)
            values[field] = None if variable is None else adapters.numpy_copy(keras.ops.convert_to_numpy(variable))
        return assemble(self._current_spec(), **values)

    @classmethod
    def from_params(cls, params: ConvBNParams, *, data_format: str | None = None, **kwargs: Any) -> ConvBN:
        """A built layer holding ``params`` (copied), with their geometry and convention.

        ``use_bias``/``scale``/``center`` follow whether the params have a bias/gamma/beta.

        Args:
            params: the params; their arrays may be of any framework.
            data_format: ``"channels_last"`` or ``"channels_first"``; None is Keras's default.
            **kwargs: other ``ConvBN``/``Layer`` arguments (``name``, ``dtype``, ...); ``dtype``
                defaults to the kernel's.

        Raises:
            TypeError: when ``params`` is not a ``ConvBNParams``.

        Example:
            >>> import numpy as np, convbn
            >>> from convbn.keras import ConvBN
            >>> p = convbn.ConvBNParams(kernel=np.ones((3, 3, 2, 4), np.float32), moving_mean=np.zeros(4, np.float32),
            ...                         moving_var=np.ones(4, np.float32), stride=2, dilation=2, eps=1e-5, momentum=0.9)
            >>> layer = ConvBN.from_params(p)
            >>> layer.strides, layer.dilation_rate, layer.momentum, layer.var_update, layer.scale
            ((2, 2), (2, 2), 0.9, 'unbiased', False)
        """
        adapters.check_params(params)
        kwargs.setdefault("dtype", adapters.keras_dtype(params))
        layer = cls(
            params.out_channels, params.kernel_size, strides=params.stride, padding=params.padding,
            data_format=data_format, dilation_rate=params.dilation, groups=params.groups,
            use_bias=params.bias is not None, momentum=params.momentum, epsilon=params.eps,
            var_update=params.var_update, center=params.beta is not None, scale=params.gamma is not None,
            **kwargs,
        )
        shape: list[int | None] = [None, None, None, None]
        shape[layer._channel_axis] = params.in_channels
        layer.build(tuple(shape))
        for attr, field in _WEIGHTS:
            value = getattr(params, field)
            if value is not None:
                variable = getattr(layer, attr)
                variable.assign(keras.ops.cast(adapters.numpy_copy(value), variable.dtype))
        return layer

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
            groups=self.groups,
            use_bias=self.use_bias,
            momentum=self.momentum,
            epsilon=self.epsilon,
            var_update=self.var_update,
            center=self.center,
            scale=self.scale,
            synchronized=self.synchronized,
            **{
                name: keras.initializers.serialize(getattr(self, name))
                for name in (
                    "kernel_initializer", "bias_initializer", "beta_initializer", "gamma_initializer",
                    "moving_mean_initializer", "moving_variance_initializer",
                )
            },
            **{
                name: keras.regularizers.serialize(getattr(self, name))
                for name in ("kernel_regularizer", "bias_regularizer", "beta_regularizer", "gamma_regularizer")
            },
        )
        return config




def _in_replica_context() -> bool:
    """Whether this call runs in a ``tf.distribute`` replica context (``synchronized`` is
    TensorFlow-only, so TF is loaded); Keras's layer also falls back to local statistics outside one."""
    import tensorflow as tf

    return tf.distribute.get_replica_context() is not None

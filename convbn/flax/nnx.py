"""``ConvBN``: Conv2D + BatchNorm as a ``flax.nnx`` module that computes :func:`convbn.conv_bn`.

The module holds a real ``nnx.Conv`` (``conv``) and ``nnx.BatchNorm`` (``bn``), so its state has
their paths (``conv.kernel``, ``conv.bias``, ``bn.scale``, ``bn.bias``, ``bn.mean``, ``bn.var``)
and :func:`convbn.from_flax` reads them directly; its call is convbn's (see :mod:`convbn.flax`).
Like ``nnx.BatchNorm`` it starts in training mode (``use_running_average=False``) until
``.eval()``; training updates ``bn.mean``/``bn.var`` in place.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from convbn.flax.nnx import ConvBN
    >>> layer = ConvBN(3, 16, 3, strides=2, rngs=nnx.Rngs(0))
    >>> y = layer(jnp.ones((4, 32, 32, 3)))          # training: updates bn.mean / bn.var
    >>> layer.eval()
    >>> layer(jnp.ones((1, 32, 32, 3))).shape
    (1, 16, 16, 16)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from convbn import adapters
from convbn.api import conv_bn
from convbn.params import ConvBNParams, with_arrays
from convbn.spec import ConvBNSpec

# The module's argument for each spec field (for the spec's errors).
_ARGUMENTS = {
    "in_channels": "in_features", "out_channels": "out_features", "stride": "strides",
    "dilation": "kernel_dilation", "groups": "feature_group_count", "eps": "epsilon",
}

__all__ = ["ConvBN"]


class ConvBN(nnx.Module):
    """Conv2D followed by BatchNorm on NHWC data, computed by :func:`convbn.conv_bn`.

    Args:
        in_features: input channels.
        out_features: output channels.
        kernel_size: an int (square) or ``(kh, kw)``.
        strides: an int or a pair.
        padding: ``"SAME"`` (TF's), ``"VALID"``, an int, ``(ph, pw)`` or ``((top, bottom), (left,
            right))``.
        kernel_dilation: an int or a pair.
        feature_group_count: conv groups.
        use_bias: whether the conv has a bias.
        use_running_average: eval mode when True; ``.eval()``/``.train()`` set it.
        momentum: fraction of the moving statistics kept per training step (Flax's meaning).
        epsilon: added to the variance inside the square root.
        use_scale: whether BatchNorm has ``scale``.
        use_bn_bias: whether BatchNorm has ``bias``.
        var_update: ``"biased"`` (Flax's) or ``"unbiased"`` (torch's) moving-variance update.
        param_dtype: the params' dtype.
        axis_name: in training, the axis name (or a tuple of names) of the enclosing
            ``shard_map``/``pmap`` whose devices share batch statistics, as ``nnx.BatchNorm``'s
            (``conv_bn``'s ``sync``); kept on ``bn``. None under plain ``jax.jit`` on a sharded
            batch, whose statistics are already global.
        rngs: the ``nnx.Rngs`` for initialization.

    Raises:
        ConvBNError: for a malformed geometry or convention.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, int],
        strides: int | tuple[int, int] = 1,
        *,
        padding: Any = "SAME",
        kernel_dilation: int | tuple[int, int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = False,
        use_running_average: bool = False,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        use_scale: bool = True,
        use_bn_bias: bool = True,
        var_update: str = "biased",
        param_dtype: Any = jnp.float32,
        axis_name: str | tuple[str, ...] | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        # Validated once, here, before any weight exists.
        spec = ConvBNSpec.named(
            _ARGUMENTS, kernel_size=kernel_size, in_channels=in_features, out_channels=out_features,
            stride=strides, padding=padding, dilation=kernel_dilation, groups=feature_group_count,
            eps=epsilon, momentum=momentum, var_update=var_update,
        )
        self.padding = spec.padding
        self.var_update = spec.var_update
        self.use_running_average = use_running_average
        self.conv = nnx.Conv(
            in_features, out_features, spec.kernel_size, spec.stride,  # type: ignore[arg-type]
            padding=adapters.flax_padding(spec), kernel_dilation=spec.dilation,
            feature_group_count=feature_group_count, use_bias=use_bias, param_dtype=param_dtype, rngs=rngs,
        )
        self.bn = nnx.BatchNorm(
            out_features, momentum=momentum, epsilon=epsilon, use_bias=use_bn_bias, use_scale=use_scale,
            use_fast_variance=False, param_dtype=param_dtype, axis_name=axis_name, rngs=rngs,  # type: ignore[arg-type]
        )

    def _params(self) -> ConvBNParams:
        """Params holding the current values (arrays, or tracers under ``nnx.jit``)."""
        conv, bn = self.conv, self.bn

        def value(variable: Any) -> Any:
            return None if variable is None else adapters.nnx_value(variable)

        return ConvBNParams(
            kernel=value(conv.kernel), bias=value(conv.bias), gamma=value(bn.scale), beta=value(bn.bias),
            moving_mean=value(bn.mean), moving_var=value(bn.var), stride=conv.strides, padding=self.padding,
            dilation=conv.kernel_dilation, groups=conv.feature_group_count, eps=bn.epsilon,
            momentum=bn.momentum, var_update=self.var_update,
        )

    def params(self) -> ConvBNParams:
        """The layer as :class:`ConvBNParams` (NumPy copies).

        Example:
            >>> from flax import nnx
            >>> from convbn.flax.nnx import ConvBN
            >>> p = ConvBN(4, 8, 3, strides=2, var_update="unbiased", rngs=nnx.Rngs(0)).params()
            >>> p.kernel.shape, p.stride, p.var_update
            ((3, 3, 4, 8), (2, 2), 'unbiased')
        """
        live = self._params()
        return with_arrays(live, **{name: adapters.numpy_copy(v) for name, v in live.arrays().items()})

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Apply the layer to NHWC ``x``; in training, ``bn.mean``/``bn.var`` are updated.

        Args:
            x: ``(N, H, W, C)`` input.
            use_running_average: overrides the module's mode for this call.
        """
        eval_mode = self.use_running_average if use_running_average is None else use_running_average
        params = self._params()
        if eval_mode:
            return conv_bn(x, params)  # type: ignore[no-any-return]
        y, new = conv_bn(x, params, True, sync=self.bn.axis_name)
        _set(self.bn.mean, new.moving_mean)
        _set(self.bn.var, new.moving_var)
        return y  # type: ignore[no-any-return]


def _set(variable: Any, value: Any) -> None:
    setter = getattr(variable, "set_value", None)
    if setter is not None:
        setter(value)
    else:  # Flax before set_value
        variable.value = value

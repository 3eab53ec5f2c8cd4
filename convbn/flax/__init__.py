"""``ConvBN``: Conv2D + BatchNorm as a ``flax.linen`` module that computes :func:`convbn.conv_bn`.

Importing this module imports JAX and Flax. The variables have the tree of an ``nn.Conv`` named
``conv`` followed by an ``nn.BatchNorm`` named ``bn``: ``params/conv/kernel`` (HWIO),
``params/conv/bias``, ``params/bn/scale``, ``params/bn/bias``, ``batch_stats/bn/mean`` and
``batch_stats/bn/var``. As with ``nn.BatchNorm``, ``use_running_average`` is given at construction
or at call time, and training needs ``mutable=["batch_stats"]``. The numbers are convbn's: TF's
SAME padding, the two-pass batch variance (Flax's default ``use_fast_variance`` computes
E[x^2]-E[x]^2), and the moving variance updated the biased (Flax's) or unbiased (torch's) way.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from convbn.flax import ConvBN
    >>> model = ConvBN(16, (3, 3), strides=2)
    >>> x = jnp.ones((4, 32, 32, 3))
    >>> variables = model.init(jax.random.key(0), x, use_running_average=True)
    >>> y, updates = model.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    >>> y.shape, sorted(updates["batch_stats"]["bn"])
    ((4, 16, 16, 16), ['mean', 'var'])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from convbn import adapters
from convbn.api import conv_bn
from convbn.errors import ConvBNError
from convbn.params import ConvBNParams
from convbn.spec import ConvBNSpec

__all__ = ["ConvBN"]

Initializer = Callable[..., Any]

# The module's attribute for each spec field (for the spec's errors); the input channels come
# from ``x``.
_ARGUMENTS = {
    "in_channels": "x's channels", "out_channels": "features", "stride": "strides",
    "dilation": "kernel_dilation", "groups": "feature_group_count", "eps": "epsilon",
}


class _ConvVariables(nn.Module):
    """The conv's variables, under the name ``conv`` as ``nn.Conv`` would hold them."""

    shape: tuple[int, int, int, int]
    use_bias: bool
    kernel_init: Initializer
    bias_init: Initializer
    param_dtype: Any

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, self.shape[-1:], self.param_dtype) if self.use_bias else None
        return kernel, bias


class _BatchNormVariables(nn.Module):
    """The BatchNorm's variables, under the name ``bn`` as ``nn.BatchNorm`` would hold them."""

    features: int
    use_scale: bool
    use_bias: bool
    scale_init: Initializer
    bias_init: Initializer
    param_dtype: Any

    def setup(self) -> None:
        shape = (self.features,)
        self.scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        self.bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        # Float32 statistics whatever the param dtype, as nn.BatchNorm keeps them.
        self.mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
        self.var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)

    def __call__(self) -> tuple[Any, Any, jax.Array, jax.Array]:
        return self.scale, self.bias, self.mean.value, self.var.value

    def update(self, mean: jax.Array, var: jax.Array) -> None:
        self.mean.value = mean
        self.var.value = var


class ConvBN(nn.Module):
    """Conv2D followed by BatchNorm on NHWC data, computed by :func:`convbn.conv_bn`.

    Attributes:
        features: output channels.
        kernel_size: an int (square) or ``(kh, kw)``.
        strides: an int or a pair.
        padding: ``"SAME"`` (TF's, as Flax's), ``"VALID"``, an int, ``(ph, pw)`` or ``((top,
            bottom), (left, right))``.
        kernel_dilation: an int or a pair.
        feature_group_count: conv groups; equal to the input channels is depthwise.
        use_bias: whether the conv has a bias (redundant before BatchNorm; kept for converted weights).
        use_running_average: eval mode (moving statistics) when True, training (batch statistics,
            updating ``batch_stats``) when False; given here or at call time, as ``nn.BatchNorm``.
        momentum: fraction of the moving statistics kept per training step (Flax's meaning).
        epsilon: added to the variance inside the square root.
        use_scale: whether BatchNorm has ``scale`` (gamma).
        use_bn_bias: whether BatchNorm has ``bias`` (beta).
        var_update: ``"biased"`` (Flax's) or ``"unbiased"`` (torch's) batch variance for the
            moving-variance update.
        kernel_init, bias_init, scale_init, bn_bias_init: initializers.
        param_dtype: the params' dtype (the moving statistics are float32, as in ``nn.BatchNorm``).
        axis_name: in training, the axis name (or a tuple of names) of the enclosing
            ``shard_map``/``pmap`` whose devices share batch statistics, as ``nn.BatchNorm``'s
            (``conv_bn``'s ``sync``). As there, ``init`` does not need the axis bound. Under plain
            ``jax.jit`` on a batch sharded with ``NamedSharding`` leave it None: the statistics are
            already the whole batch's.

    The output has the input's dtype.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from convbn.flax import ConvBN
        >>> model = ConvBN(8, 3, use_running_average=True)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 4)))
        >>> jax.tree_util.tree_map(jnp.shape, variables["params"]["conv"])
        {'kernel': (3, 3, 4, 8)}
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = False
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bn_bias: bool = True
    var_update: str = "biased"
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    scale_init: Initializer = nn.initializers.ones_init()
    bn_bias_init: Initializer = nn.initializers.zeros_init()
    param_dtype: Any = jnp.float32
    axis_name: str | tuple[str, ...] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Apply the layer to NHWC ``x``.

        Args:
            x: ``(N, H, W, C)`` input.
            use_running_average: True for eval, False for training; given here or as the
                attribute, not both.

        Returns:
            ``(N, H_out, W_out, features)``, in ``x``'s dtype.

        Raises:
            ValueError: when ``use_running_average`` is given neither or both ways (Flax's rule).
            ConvBNError: for a malformed configuration or input shape.
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        spec = self._spec(x.shape[-1])
        kh, kw = spec.kernel_size  # type: ignore[misc]
        kernel, bias = _ConvVariables(
            (kh, kw, x.shape[-1] // spec.groups, self.features), self.use_bias, self.kernel_init,
            self.bias_init, self.param_dtype, name="conv",
        )()
        bn = _BatchNormVariables(
            self.features, self.use_scale, self.use_bn_bias, self.scale_init, self.bn_bias_init,
            self.param_dtype, name="bn",
        )
        scale, beta, mean, var = bn()
        params = ConvBNParams.from_spec(
            spec, kernel=kernel, bias=bias, gamma=scale, beta=beta, moving_mean=mean, moving_var=var
        )
        if use_running_average:
            return conv_bn(x, params)  # type: ignore[no-any-return]
        # As nn.BatchNorm: init neither moves the statistics nor needs the axis bound.
        initializing = self.is_initializing()
        y, new = conv_bn(x, params, True, sync=None if initializing else self.axis_name)
        if not initializing:
            bn.update(new.moving_mean, new.moving_var)
        return y  # type: ignore[no-any-return]

    @nn.nowrap
    def _spec(self, in_channels: int | None) -> ConvBNSpec:
        """The module's geometry and convention, validated (errors name its attributes)."""
        return ConvBNSpec.named(
            _ARGUMENTS, kernel_size=self.kernel_size, in_channels=in_channels, out_channels=self.features,
            stride=self.strides, padding=self.padding, dilation=self.kernel_dilation,
            groups=self.feature_group_count, eps=self.epsilon, momentum=self.momentum, var_update=self.var_update,
        )

    @nn.nowrap
    def params(self, variables: Mapping[str, Any]) -> ConvBNParams:
        """The layer with ``variables`` as :class:`ConvBNParams` (NumPy copies).

        ``conv_bn(x, model.params(variables), training=...)`` gives exactly ``model.apply``'s output.

        Args:
            variables: this module's variables (``{"params": ..., "batch_stats": ...}``).

        Raises:
            ConvBNError: when a variable is missing.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from convbn.flax import ConvBN
            >>> model = ConvBN(8, 3, strides=2)
            >>> v = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 4)), use_running_average=True)
            >>> p = model.params(v)
            >>> p.kernel.shape, p.stride, p.momentum, p.var_update
            ((3, 3, 4, 8), (2, 2), 0.99, 'biased')
        """
        params = adapters.as_mapping(variables.get("params", {}), "variables['params']")
        stats = adapters.as_mapping(variables.get("batch_stats", {}), "variables['batch_stats']")
        conv = adapters.as_mapping(params.get("conv", {}), "variables['params']['conv']")
        bn = adapters.as_mapping(params.get("bn", {}), "variables['params']['bn']")
        bn_stats = adapters.as_mapping(stats.get("bn", {}), "variables['batch_stats']['bn']")
        if "kernel" not in conv or "mean" not in bn_stats or "var" not in bn_stats:
            raise ConvBNError(
                "variables must hold params/conv/kernel, batch_stats/bn/mean and batch_stats/bn/var. "
                f"Received: params keys {sorted(params)}, batch_stats keys {sorted(stats)}"
            )

        def array(mapping: Mapping[str, Any], name: str) -> np.ndarray | None:
            return adapters.numpy_copy(mapping[name]) if name in mapping else None

        return ConvBNParams.from_spec(
            self._spec(None), kernel=array(conv, "kernel"), bias=array(conv, "bias"), gamma=array(bn, "scale"),
            beta=array(bn, "bias"), moving_mean=array(bn_stats, "mean"), moving_var=array(bn_stats, "var"),
        )

    @classmethod
    def from_params(cls, params: ConvBNParams, **kwargs: Any) -> tuple[ConvBN, dict[str, Any]]:
        """A module with the params' geometry and convention, and its variables holding them.

        Args:
            params: the params; their arrays may be of any framework.
            **kwargs: other attributes (``use_running_average``, ``name``, ...).

        Returns:
            ``(module, variables)``; ``variables`` holds ``jax.Array`` values (float64 stays float64
            only with ``jax_enable_x64``), with ``use_bias``/``use_scale``/``use_bn_bias``
            following whether the params have a bias/gamma/beta.

        Raises:
            TypeError: when ``params`` is not a ``ConvBNParams``.

        Example:
            >>> import numpy as np, convbn
            >>> from convbn.flax import ConvBN
            >>> p = convbn.ConvBNParams(kernel=np.ones((3, 3, 2, 4), np.float32), moving_mean=np.zeros(4, np.float32),
            ...                         moving_var=np.ones(4, np.float32), stride=2, momentum=0.9)
            >>> model, variables = ConvBN.from_params(p)
            >>> model.strides, model.momentum, model.var_update, sorted(variables["params"])
            ((2, 2), 0.9, 'unbiased', ['conv'])
        """
        adapters.check_params(params)
        module = cls(
            features=params.out_channels, kernel_size=params.kernel_size, strides=params.stride,
            padding=adapters.flax_padding(params), kernel_dilation=params.dilation,
            feature_group_count=params.groups, use_bias=params.bias is not None, momentum=params.momentum,
            epsilon=params.eps, use_scale=params.gamma is not None, use_bn_bias=params.beta is not None,
            var_update=params.var_update, **kwargs,
        )

        def array(value: Any) -> jax.Array:
            return jnp.asarray(adapters.numpy_copy(value))

        conv = {"kernel": array(params.kernel)}
        if params.bias is not None:
            conv["bias"] = array(params.bias)
        bn = {}
        if params.gamma is not None:
            bn["scale"] = array(params.gamma)
        if params.beta is not None:
            bn["bias"] = array(params.beta)
        # As init makes them: no "bn" entry under params when BatchNorm has neither scale nor bias.
        variables = {
            "params": {"conv": conv, **({"bn": bn} if bn else {})},
            "batch_stats": {"bn": {"mean": array(params.moving_mean), "var": array(params.moving_var)}},
        }
        return module, variables

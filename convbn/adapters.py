"""Adapters between each framework's own Conv2D + BatchNorm layers and :class:`ConvBNParams`.

``from_torch``/``from_keras``/``from_flax`` read a framework's conv and BatchNorm layers into
params (NumPy copies, HWIO kernel, kept-fraction momentum, the framework's eps and ``var_update``);
``to_torch``/``to_keras``/``to_flax`` build the framework's own layers from params; and
``assign_torch``/``assign_keras`` load params into layers that already exist, checking that their
geometry agrees. Every convention is translated here, in one place:

==================  =====================  ========================  =========================
                    torch                  Keras 3                   Flax
==================  =====================  ========================  =========================
kernel              OIHW                   HWIO (depthwise HWCM)     HWIO
momentum            weight of the new      fraction kept             fraction kept
                    value (``1 - kept``)
moving-var update   unbiased               biased                    biased
no gamma / beta     ``affine=False``       ``scale=``/``center=``    ``use_scale=``/``use_bias=``
==================  =====================  ========================  =========================

A framework's own BatchNorm can only update its moving variance its own way, so building or
loading one from params whose ``var_update`` differs raises :class:`ConvBNError` rather than
silently changing how training behaves; convbn's own layers (:mod:`convbn.torch`,
:mod:`convbn.keras`, :mod:`convbn.flax`) take either convention.

This module imports no framework at import time: each function imports its framework when called.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from convbn import layouts
from convbn._dtypes import keras_float_name
from convbn.conventions import kept_to_torch_momentum, torch_momentum_to_kept
from convbn.errors import ConvBNError
from convbn.folding import FILLS, filled, fit
from convbn.params import ConvBNParams
from convbn.spec import ConvBNSpec, VarUpdate, normalize_padding, symmetric

if TYPE_CHECKING:
    from flax import linen
    from keras import layers as keras_layers
    from torch import nn

__all__ = [
    "assign_keras",
    "assign_torch",
    "from_flax",
    "from_keras",
    "from_torch",
    "to_flax",
    "to_keras",
    "to_torch",
]


# -- framework-free translation ---------------------------------------------------------------------


def torch_momentum(params: ConvBNParams) -> float:
    """``params.momentum`` (fraction kept) as torch's ``momentum`` (weight of the new value)."""
    return kept_to_torch_momentum(params.momentum)


def kept_from_torch(momentum: float | None, where: str) -> float:
    """torch's ``momentum`` as the fraction kept; ``None`` (a cumulative average) has no equivalent."""
    if momentum is None:
        raise ConvBNError(
            f"{where}.momentum must be a number: momentum=None keeps a cumulative average, which "
            "has no fixed kept fraction to convert. Set a momentum (torch's default is 0.1) first. "
            f"Received: {where}.momentum=None"
        )
    if not 0.0 <= momentum <= 1.0:
        raise ConvBNError(f"{where}.momentum must be in [0, 1]. Received: {where}.momentum={momentum!r}")
    return torch_momentum_to_kept(momentum)


def require_var_update(params: ConvBNParams, expected: str, target: str, alternative: str) -> None:
    """Raise unless ``params.var_update`` is what ``target``'s own BatchNorm does in training."""
    if params.var_update != expected:
        raise ConvBNError(
            f"{target} updates its moving variance with the {expected} batch variance, but these "
            f"params use var_update={params.var_update!r}. Use {alternative}, which takes either, or "
            f"accept the change with dataclasses.replace(params, var_update={expected!r}) (weights and "
            f"eval outputs are unchanged; only training's moving-variance update differs). "
            f"Received: params.var_update={params.var_update!r}"
        )


def numpy_copy(a: Any) -> np.ndarray:
    """Any framework's array as a NumPy copy the caller may keep."""
    from convbn.backends.numpy import to_numpy

    return np.array(to_numpy(a), copy=True)


def _spec_of(geometry: ConvBNParams | ConvBNSpec) -> ConvBNSpec:
    return geometry.spec if isinstance(geometry, ConvBNParams) else geometry


def _is_stride1_same(spec: ConvBNSpec, pads: Any) -> bool:
    """Whether ``pads`` are what TF's SAME gives ``spec`` at stride 1, where they do not depend on
    the input size (the frameworks' own ``"same"`` then expresses them)."""
    return spec.stride == (1, 1) and pads == dataclasses.replace(spec, padding="SAME").pads()


def _check_geometry(params: ConvBNParams, layer: ConvBNSpec, where: str) -> None:
    """Raise unless ``layer`` (the target's geometry) computes the same conv as ``params``.

    Paddings agree when their pads do at every input size (SAME at stride 1 equals explicit pads).
    """
    spec = params.spec
    mismatches = [
        f"{name}: params {getattr(spec, name)!r}, {where} {getattr(layer, name)!r}"
        for name in ("kernel_size", "in_channels", "out_channels", "stride", "dilation", "groups")
        if getattr(spec, name) != getattr(layer, name)
    ]
    if spec.pads() != layer.pads():
        mismatches.append(f"padding: params {spec.padding!r}, {where} {layer.padding!r}")
    if mismatches:
        raise ConvBNError(
            f"{where} must have the geometry of the params it is loaded with. Received: "
            + "; ".join(mismatches)
        )


def _optional_into(params: ConvBNParams, *, bias: bool, gamma: bool, beta: bool) -> dict[str, np.ndarray]:
    """The conv bias, gamma and beta for a target that has (True) or lacks each, by the rule of
    :mod:`convbn.folding`: an absent value becomes its fill (0, 1, 0), which computes the same
    numbers; a value for a target without the weight is accepted only when it equals the fill."""
    fitted = fit(params, bias=bias, gamma=gamma, beta=beta)
    for name in fitted.lost:
        fill = FILLS[name]
        raise ConvBNError(
            f"{'conv' if name == 'bias' else 'bn'} has no {name}, but the params' {name} is not all {fill:g}, so it "
            f"would be lost. Build the layer with a {name}. Received: params.{name} with values other than {fill:g}"
        )
    kernel = numpy_copy(params.kernel)
    return {
        name: numpy_copy(filled(getattr(fitted.params, name), name, kernel.shape[-1], kernel.dtype)) for name in FILLS
    }


def as_mapping(value: Any, name: str) -> Mapping[str, Any]:
    """``value`` if it is a mapping (of Flax variables), else TypeError naming ``name``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of variables. Received: {name} of type {type(value).__name__}")
    return value


# -- torch ------------------------------------------------------------------------------------------


def torch_padding_to_convbn(padding: Any) -> Any:
    """A torch conv's ``padding`` as convbn's: ``'same'`` -> ``"SAME"``, else a tuple of ints."""
    if isinstance(padding, str):
        return padding.upper()  # torch's 'same' exists at stride 1 only, where it equals TF's
    return tuple(int(p) for p in padding)


def _torch_conv_spec(conv: nn.Conv2d, **settings: Any) -> ConvBNSpec:
    """The conv's geometry (its weight's shape, stride, padding, ...) as a spec, with the
    BatchNorm ``settings``; errors name the module's attributes."""
    out, in_per_group, kh, kw = (int(d) for d in conv.weight.shape)
    return ConvBNSpec.named(
        _ATTRIBUTE_NAMES, kernel_size=(kh, kw), in_channels=in_per_group * conv.groups, out_channels=out,
        stride=tuple(conv.stride), padding=torch_padding_to_convbn(conv.padding),
        dilation=tuple(conv.dilation), groups=conv.groups, **settings,
    )


# A spec read from a framework's conv and BatchNorm names each setting as their attribute.
_ATTRIBUTE_NAMES = {
    **{name: f"conv.{name}" for name in ("kernel_size", "in_channels", "out_channels", "stride", "padding",
                                         "dilation", "groups")},
    "eps": "bn.eps", "momentum": "bn.momentum",
}


def check_torch_pair(conv: Any, bn: Any) -> None:
    """That ``conv``/``bn`` are a Conv2d and a BatchNorm2d convbn can read and write (TypeError,
    ConvBNError otherwise); :func:`from_torch`, :func:`assign_torch` and ``load_into`` check this."""
    from torch import nn

    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be a torch.nn.Conv2d. Received: conv of type {type(conv).__name__}")
    if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        raise TypeError(
            f"bn must be a torch.nn.BatchNorm2d or SyncBatchNorm. Received: bn of type {type(bn).__name__}"
        )
    for name, module in (("conv", conv), ("bn", bn)):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ConvBNError(f"{name} is a lazy module that has not been run yet, so it has no weights to convert.")
    if conv.padding_mode != "zeros":
        raise ConvBNError(
            "conv.padding_mode must be 'zeros': convbn pads with zeros. "
            f"Received: conv.padding_mode={conv.padding_mode!r}"
        )
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ConvBNError(
            "bn must track running statistics (track_running_stats=True): without them eval mode "
            f"uses batch statistics and there are no moving statistics to convert. "
            f"Received: bn.track_running_stats={bn.track_running_stats}"
        )
    if bn.num_features != conv.out_channels:
        raise ConvBNError(
            f"bn.num_features must equal conv.out_channels. Received: bn.num_features={bn.num_features}, "
            f"conv.out_channels={conv.out_channels}"
        )


def from_torch(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> ConvBNParams:
    """Params from a ``torch.nn.Conv2d`` followed by a ``torch.nn.BatchNorm2d``.

    The kernel is transposed OIHW -> HWIO, torch's ``momentum`` (weight of the new value) becomes
    the fraction kept (0.1 -> 0.9), ``var_update`` is ``"unbiased"`` as torch trains, and
    ``affine=False`` gives ``gamma``/``beta`` None. Padding ``'same'`` (stride 1 only in torch) is
    TF's SAME. Arrays are NumPy copies: later training of the modules does not change them.
    ``num_batches_tracked`` is not carried (it only matters for ``momentum=None``).

    Args:
        conv: a ``torch.nn.Conv2d`` with zero padding.
        bn: a ``torch.nn.BatchNorm2d`` (or ``SyncBatchNorm``) tracking running statistics.

    Returns:
        The pair as :class:`ConvBNParams`.

    Raises:
        TypeError: when ``conv``/``bn`` are not those module types.
        ConvBNError: for ``momentum=None``, ``track_running_stats=False``, a non-zero
            ``padding_mode``, an uninitialized lazy module, or mismatched channel counts.

    Example:
        >>> import torch, convbn
        >>> conv, bn = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        >>> p = convbn.from_torch(conv, bn)
        >>> p.kernel.shape, p.momentum, p.eps, p.var_update
        ((3, 3, 3, 8), 0.9, 1e-05, 'unbiased')
    """
    check_torch_pair(conv, bn)
    momentum = kept_from_torch(bn.momentum, "bn")
    spec = _torch_conv_spec(conv, eps=float(bn.eps), momentum=momentum, var_update="unbiased")
    return ConvBNParams.from_spec(
        spec,
        kernel=numpy_copy(conv.weight.detach().permute(*layouts.OIHW_TO_HWIO)),
        bias=None if conv.bias is None else numpy_copy(conv.bias),
        gamma=None if bn.weight is None else numpy_copy(bn.weight),
        beta=None if bn.bias is None else numpy_copy(bn.bias),
        moving_mean=numpy_copy(bn.running_mean),
        moving_var=numpy_copy(bn.running_var),
    )


def torch_padding(geometry: ConvBNParams | ConvBNSpec) -> Any:
    """The padding as ``nn.Conv2d``'s ``padding``, or None when torch cannot express it."""
    spec = _spec_of(geometry)
    pads = spec.pads()
    if pads is None:
        return None
    if symmetric(pads):
        return (pads[0][0], pads[1][0])
    if _is_stride1_same(spec, pads):
        return "same"  # torch's 'same' puts the extra row/column at the bottom/right, as TF's
    return None


def to_torch(params: ConvBNParams, *, device: Any = None, dtype: Any = None) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A new ``torch.nn.Conv2d`` and ``torch.nn.BatchNorm2d`` holding ``params``.

    The fraction-kept momentum becomes torch's (0.9 -> 0.1). Missing gamma and beta give
    ``affine=False``; only one missing is filled with ones/zeros (the same numbers). The modules
    come in training mode, as new torch modules do; call ``.eval()`` for inference.

    Args:
        params: the params; their arrays may be of any framework.
        device: where the modules live (torch's default when None).
        dtype: the modules' dtype; None takes the kernel's.

    Returns:
        ``(conv, bn)``.

    Raises:
        ConvBNError: when ``nn.Conv2d`` cannot express the padding (SAME at stride > 1, which
            depends on the input size, or asymmetric explicit padding), or when ``params.var_update``
            is ``"biased"`` (``nn.BatchNorm2d`` trains with the unbiased variance).
            :class:`convbn.torch.ConvBN2d` handles both.

    Example:
        >>> import numpy as np, convbn
        >>> p = convbn.ConvBNParams(kernel=np.ones((3, 3, 2, 4), np.float32),
        ...                         moving_mean=np.zeros(4, np.float32), moving_var=np.ones(4, np.float32),
        ...                         padding=1, eps=1e-5, momentum=0.9)
        >>> conv, bn = convbn.to_torch(p)
        >>> tuple(conv.weight.shape), conv.padding, bn.momentum, bn.affine
        ((4, 2, 3, 3), (1, 1), 0.1, False)
    """
    import torch
    from torch import nn

    from convbn.backends.torch import asarray

    check_params(params)
    padding = torch_padding(params)
    if padding is None:
        raise ConvBNError(
            "nn.Conv2d cannot express this padding: TF's SAME at stride > 1 depends on the input "
            "size, and explicit padding must be symmetric. Use convbn.torch.ConvBN2d.from_params(params), "
            f"which pads as convbn does. Received: padding={params.padding!r}, stride={params.stride}"
        )
    require_var_update(params, "unbiased", "torch.nn.BatchNorm2d", "convbn.torch.ConvBN2d.from_params(params)")
    if dtype is None:
        dtype = asarray(params.kernel).dtype
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
    conv = nn.Conv2d(
        params.in_channels, params.out_channels, params.kernel_size, params.stride, padding,
        params.dilation, params.groups, bias=params.bias is not None, device=device, dtype=dtype,
    )
    bn = nn.BatchNorm2d(
        params.out_channels, params.eps, torch_momentum(params),
        affine=params.gamma is not None or params.beta is not None, device=device, dtype=dtype,
    )
    assign_torch(conv, bn, params)
    return conv, bn


def assign_torch(conv: nn.Conv2d, bn: nn.BatchNorm2d, params: ConvBNParams) -> None:
    """Load ``params`` into an existing ``nn.Conv2d`` + ``nn.BatchNorm2d``, in place.

    The conv's geometry must compute the same conv as the params (SAME at stride 1 equals the
    matching explicit padding). ``bn.eps`` and ``bn.momentum`` are set from the params, since the
    outputs depend on them. ``num_batches_tracked`` is left as it is.

    Args:
        conv: the target conv (not a lazy, uninitialized one).
        bn: the target BatchNorm, tracking running statistics.
        params: the params; their arrays may be of any framework.

    Raises:
        ConvBNError: for a geometry mismatch, a conv bias/gamma/beta the target lacks (unless it is
            exactly 0/1/0), or ``var_update="biased"``.

    Example:
        >>> import torch, convbn
        >>> conv, bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        >>> p = convbn.from_torch(conv, bn)
        >>> conv2, bn2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        >>> convbn.adapters.assign_torch(conv2, bn2, p)
        >>> bool(torch.equal(conv.weight, conv2.weight))
        True
    """
    import torch

    from convbn.backends.torch import asarray

    check_torch_pair(conv, bn)
    check_params(params)
    require_var_update(params, "unbiased", "torch.nn.BatchNorm2d", "convbn.torch.ConvBN2d.from_params(params)")
    kernel = numpy_copy(params.kernel)
    _check_geometry(params, _torch_conv_spec(conv), "conv")
    held = _optional_into(params, bias=conv.bias is not None, gamma=bn.weight is not None, beta=bn.bias is not None)
    values = [
        (conv.weight, layouts.conv_to_torch(kernel)),
        (conv.bias, held["bias"]),
        (bn.weight, held["gamma"]),
        (bn.bias, held["beta"]),
        (bn.running_mean, numpy_copy(params.moving_mean)),
        (bn.running_var, numpy_copy(params.moving_var)),
    ]
    with torch.no_grad():
        for target, value in values:
            if target is not None:
                target.copy_(asarray(value))
    bn.eps = params.eps
    bn.momentum = torch_momentum(params)


def check_params(params: Any) -> None:
    """TypeError unless ``params`` is a :class:`ConvBNParams` (what every ``from_params`` takes)."""
    if not isinstance(params, ConvBNParams):
        raise TypeError(f"params must be a convbn.ConvBNParams. Received: params of type {type(params).__name__}")


# -- Keras ------------------------------------------------------------------------------------------


def _keras_channel_axis(data_format: str) -> int:
    return 3 if data_format == "channels_last" else 1


def _keras_of(layer: Any, tf_keras: bool) -> Any:
    """The Keras module that defines ``layer``: Keras 3, or with ``tf_keras`` also tf_keras where it
    is imported (a tf_keras layer cannot exist otherwise); None for anything else."""
    import keras

    spaces = [keras, *([sys.modules["tf_keras"]] if tf_keras and "tf_keras" in sys.modules else [])]
    return next((ns for ns in spaces if isinstance(layer, ns.layers.Layer)), None)


def check_keras_pair(conv: Any, bn: Any, *, tf_keras: bool = False) -> Any:
    """Raise unless ``conv`` + ``bn`` are built Keras layers that compute a conv + BatchNorm pair: a
    linear conv, a plain BatchNorm over its channel axis. Returns the Keras module that defines them.

    ``tf_keras`` accepts tf_keras (Keras 2) layers too, which only assignment writes into.
    """
    ns = _keras_of(conv, tf_keras)
    which = "Keras 3 keras.layers" + (" (or tf_keras)" if tf_keras else "")
    if ns is None or not isinstance(conv, (ns.layers.Conv2D, ns.layers.DepthwiseConv2D)) or isinstance(
        conv, ns.layers.Conv2DTranspose  # tf_keras's subclasses its Conv2D
    ):
        raise TypeError(
            f"conv must be a {which}.Conv2D or DepthwiseConv2D. "
            f"Received: conv of type {type(conv).__module__}.{type(conv).__name__}"
        )
    if not isinstance(bn, ns.layers.BatchNormalization):
        raise TypeError(
            f"bn must be a {which}.BatchNormalization of the same Keras as conv. "
            f"Received: bn of type {type(bn).__module__}.{type(bn).__name__}"
        )
    for name, layer in (("conv", conv), ("bn", bn)):
        if not layer.built:
            raise ConvBNError(
                f"{name} must be built (called once, or .build(input_shape)) so that it has weights. "
                f"Received: {name}={layer.name!r} unbuilt"
            )
    activation = ns.activations.serialize(conv.activation)
    if activation != "linear":
        raise ConvBNError(
            "conv must have no activation: an activation between the conv and BatchNorm is not a "
            f"Conv2D + BatchNorm pair. Received: conv.activation={activation!r}"
        )
    for option in ("renorm", "virtual_batch_size", "adjustment"):  # Keras 3 has only renorm
        if getattr(bn, option, None):
            raise ConvBNError(f"bn must be a plain BatchNormalization. Received: bn.{option}={getattr(bn, option)!r}")
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    channel = _keras_channel_axis(conv.data_format)
    if axis is None or axis % 4 != channel:
        raise ConvBNError(
            f"bn.axis must be the conv's channel axis ({channel} for data_format={conv.data_format!r}). "
            f"Received: bn.axis={bn.axis!r}"
        )
    return ns


def keras_var_update(bn: Any) -> VarUpdate:
    """The moving-variance update a built Keras BatchNorm trains with: Keras 3's is biased;
    tf_keras's is unbiased on its fused path (the default for 4-D inputs), biased with ``fused=False``."""
    import keras

    return "biased" if isinstance(bn, keras.layers.Layer) or not bn.fused else "unbiased"


def _keras_kernel(conv: Any) -> Any:
    """The conv's kernel variable: tf_keras names a depthwise one ``depthwise_kernel``."""
    import keras

    return conv.kernel if isinstance(conv, keras.layers.Layer) or not _keras_depthwise(conv) else conv.depthwise_kernel


def _keras_depthwise(conv: Any) -> bool:
    ns = _keras_of(conv, tf_keras=True)
    return ns is not None and isinstance(conv, ns.layers.DepthwiseConv2D)


def _keras_conv_spec(conv: Any, **settings: Any) -> ConvBNSpec:
    """The conv's geometry as a spec, with the BatchNorm ``settings``: a depthwise ``(kh, kw, C, m)``
    kernel is the grouped HWIO ``(kh, kw, 1, C*m)`` with ``groups=C``."""
    kh, kw, c, m = (int(d) for d in _keras_kernel(conv).shape)
    if _keras_depthwise(conv):
        groups, in_channels, out_channels = c, c, c * m
    else:
        groups, in_channels, out_channels = conv.groups, c * conv.groups, m
    return ConvBNSpec.named(
        _KERAS_NAMES, kernel_size=(kh, kw), in_channels=in_channels, out_channels=out_channels,
        stride=tuple(conv.strides), padding=conv.padding.upper(), dilation=tuple(conv.dilation_rate),
        groups=groups, **settings,
    )


_KERAS_NAMES = {
    **_ATTRIBUTE_NAMES, "stride": "conv.strides", "dilation": "conv.dilation_rate", "eps": "bn.epsilon",
}


def _keras_hwio(conv: Any) -> np.ndarray:
    kernel = numpy_copy(conv.kernel.value)
    kh, kw, c, m = kernel.shape
    # A depthwise (kh, kw, C, m) kernel is the grouped HWIO (kh, kw, 1, C*m): output channel c*m+j.
    return kernel.reshape(kh, kw, 1, c * m) if _keras_depthwise(conv) else kernel


def from_keras(conv: keras_layers.Conv2D, bn: keras_layers.BatchNormalization) -> ConvBNParams:
    """Params from a built Keras 3 ``Conv2D`` (or ``DepthwiseConv2D``) and ``BatchNormalization``.

    The kernel is already HWIO (a depthwise ``(kh, kw, C, m)`` kernel becomes the grouped
    ``(kh, kw, 1, C*m)`` with ``groups=C``); Keras's momentum is the fraction kept, as convbn's;
    ``var_update`` is ``"biased"`` as Keras 3 trains; ``scale=False``/``center=False`` give
    ``gamma``/``beta`` None. Arrays are NumPy copies. Either ``data_format`` works (the kernel layout
    does not depend on it).

    Args:
        conv: a built ``keras.layers.Conv2D`` or ``DepthwiseConv2D`` without activation.
        bn: a built ``keras.layers.BatchNormalization`` over the conv's channel axis.

    Returns:
        The pair as :class:`ConvBNParams`.

    Raises:
        TypeError: for other layer types (including ``tf_keras`` / Keras 2 layers).
        ConvBNError: for unbuilt layers, an activation on the conv, a BatchNorm over another axis,
            or batch renormalization.

    Example:
        >>> import keras, convbn
        >>> conv, bn = keras.layers.Conv2D(8, 3, padding="same", use_bias=False), keras.layers.BatchNormalization()
        >>> _ = bn(conv(keras.ops.zeros((1, 8, 8, 3))))
        >>> p = convbn.from_keras(conv, bn)
        >>> p.kernel.shape, p.momentum, p.eps, p.var_update
        ((3, 3, 3, 8), 0.99, 0.001, 'biased')
    """
    check_keras_pair(conv, bn)
    spec = _keras_conv_spec(conv, eps=float(bn.epsilon), momentum=float(bn.momentum), var_update="biased")
    if bn.moving_mean.shape[0] != spec.out_channels:
        raise ConvBNError(
            f"bn must normalize the conv's {spec.out_channels} output channels. "
            f"Received: bn.moving_mean.shape={tuple(bn.moving_mean.shape)}"
        )
    return ConvBNParams.from_spec(
        spec,
        kernel=_keras_hwio(conv),
        bias=numpy_copy(conv.bias.value) if conv.use_bias else None,
        gamma=numpy_copy(bn.gamma.value) if bn.scale else None,
        beta=numpy_copy(bn.beta.value) if bn.center else None,
        moving_mean=numpy_copy(bn.moving_mean.value),
        moving_var=numpy_copy(bn.moving_variance.value),
    )


def keras_padding(geometry: ConvBNParams | ConvBNSpec) -> str | None:
    """The padding as Keras's ``padding``, or None when Keras cannot express it."""
    spec = _spec_of(geometry)
    pads = spec.pads()
    if pads is None or _is_stride1_same(spec, pads):
        return "same"
    if pads == ((0, 0), (0, 0)):
        return "valid"
    return None


def to_keras(
    params: ConvBNParams, *, data_format: str | None = None, dtype: Any = None
) -> tuple[keras_layers.Conv2D, keras_layers.BatchNormalization]:
    """A new, built Keras ``Conv2D`` and ``BatchNormalization`` holding ``params``.

    Args:
        params: the params; their arrays may be of any framework.
        data_format: ``"channels_last"`` or ``"channels_first"``; None is Keras's
            ``image_data_format()``.
        dtype: the layers' dtype (policy); None takes the kernel's dtype.

    Returns:
        ``(conv, bn)``, built for the params' input channels, ``scale``/``center`` False where
        gamma/beta are None.

    Raises:
        ConvBNError: when Keras cannot express the geometry (explicit padding other than SAME's or
            VALID's, or stride > 1 together with dilation > 1), or when ``params.var_update`` is
            ``"unbiased"`` (Keras 3 trains with the biased variance). :class:`convbn.keras.ConvBN`
            handles all of these.

    Example:
        >>> import numpy as np, convbn
        >>> p = convbn.ConvBNParams(kernel=np.ones((3, 3, 2, 4), np.float32), moving_mean=np.zeros(4, np.float32),
        ...                         moving_var=np.ones(4, np.float32), var_update="biased")
        >>> conv, bn = convbn.to_keras(p)
        >>> conv.padding, tuple(conv.kernel.shape), bn.scale
        ('same', (3, 3, 2, 4), False)
    """
    import keras

    check_params(params)
    padding = keras_padding(params)
    if padding is None:
        raise ConvBNError(
            "Keras Conv2D cannot express this padding (only 'same' and 'valid'). Use "
            f"convbn.keras.ConvBN.from_params(params), which takes explicit padding. Received: padding={params.padding!r}"
        )
    if params.stride != (1, 1) and params.dilation != (1, 1):
        raise ConvBNError(
            "Keras Conv2D rejects stride > 1 together with dilation > 1. Use "
            f"convbn.keras.ConvBN.from_params(params). Received: stride={params.stride}, dilation={params.dilation}"
        )
    require_var_update(params, "biased", "Keras 3 BatchNormalization", "convbn.keras.ConvBN.from_params(params)")
    data_format = keras_data_format(data_format)
    channel = _keras_channel_axis(data_format)
    dtype = keras_dtype(params) if dtype is None else dtype
    conv = keras.layers.Conv2D(
        params.out_channels, params.kernel_size, strides=params.stride, padding=padding,
        data_format=data_format, dilation_rate=params.dilation, groups=params.groups,
        use_bias=params.bias is not None, dtype=dtype,
    )
    bn = keras.layers.BatchNormalization(
        axis=channel, momentum=params.momentum, epsilon=params.eps,
        center=params.beta is not None, scale=params.gamma is not None, dtype=dtype,
    )
    shape: list[int | None] = [None, None, None, None]
    shape[channel] = params.in_channels
    conv.build(tuple(shape))
    shape[channel] = params.out_channels
    bn.build(tuple(shape))
    assign_keras(conv, bn, params)
    return conv, bn


def keras_dtype(params: ConvBNParams) -> str:
    """The name of the kernel's floating dtype, as Keras spells it (``"float32"`` for others)."""
    from convbn.backends.numpy import to_numpy

    return keras_float_name(to_numpy(params.kernel).dtype)


def keras_data_format(data_format: str | None) -> str:
    """Keras's ``data_format`` (None: ``image_data_format()``), checked."""
    import keras

    value = keras.config.image_data_format() if data_format is None else data_format
    if value not in ("channels_last", "channels_first"):
        raise ConvBNError(
            f"data_format must be 'channels_last' or 'channels_first'. Received: data_format={data_format!r}"
        )
    return value


def assign_keras(
    conv: keras_layers.Conv2D, bn: keras_layers.BatchNormalization, params: ConvBNParams
) -> None:
    """Load ``params`` into built Keras ``Conv2D``/``DepthwiseConv2D`` + ``BatchNormalization`` layers.

    Keras 3 layers, or tf_keras (Keras 2) ones: transformers' TF models and keras.applications
    under tf_keras are built from those, and :func:`convbn.load_into` writes them through here. The
    conv must compute the same conv as the params (stride-1 SAME equals the matching explicit
    padding). ``bn.epsilon`` and ``bn.momentum`` are set from the params.

    Args:
        conv: the target conv, built, without activation.
        bn: the target BatchNorm, built, over the conv's channel axis.
        params: the params; their arrays may be of any framework.

    Raises:
        TypeError: for layers that are not Keras 3 or tf_keras convs and BatchNorms.
        ConvBNError: for a geometry mismatch, a conv bias/gamma/beta the target lacks (unless it is
            exactly 0/1/0), or a ``var_update`` other than the one ``bn`` trains with (see
            :func:`keras_var_update`: ``"biased"`` for Keras 3).

    Example:
        >>> import keras, numpy as np, convbn
        >>> conv, bn = keras.layers.Conv2D(4, 3, use_bias=False), keras.layers.BatchNormalization()
        >>> _ = bn(conv(keras.ops.zeros((1, 5, 5, 2))))
        >>> p = convbn.ConvBNParams(kernel=np.ones((3, 3, 2, 4), np.float32), moving_mean=np.zeros(4, np.float32),
        ...                         moving_var=np.full(4, 2.0, np.float32), padding="VALID", var_update="biased")
        >>> convbn.adapters.assign_keras(conv, bn, p)
        >>> float(bn.moving_variance.numpy()[0])
        2.0
    """
    import keras

    ns = check_keras_pair(conv, bn, tf_keras=True)
    check_params(params)
    target = "Keras 3 BatchNormalization" if ns is keras else f"tf_keras BatchNormalization(fused={bn.fused})"
    require_var_update(params, keras_var_update(bn), target, "convbn.keras.ConvBN.from_params(params)")
    kernel = numpy_copy(params.kernel)
    _check_geometry(params, _keras_conv_spec(conv), "conv")
    held = _optional_into(params, bias=bool(conv.use_bias), gamma=bool(bn.scale), beta=bool(bn.center))
    conv_kernel = _keras_kernel(conv)
    values = [
        (conv_kernel, kernel.reshape(tuple(conv_kernel.shape))),
        (conv.bias if conv.use_bias else None, held["bias"]),
        (bn.gamma if bn.scale else None, held["gamma"]),
        (bn.beta if bn.center else None, held["beta"]),
        (bn.moving_mean, numpy_copy(params.moving_mean)),
        (bn.moving_variance, numpy_copy(params.moving_var)),
    ]
    for variable, value in values:
        if variable is not None:
            # A tf_keras weight is a tf.Variable, whose dtype is a tf.DType.
            variable.assign(keras.ops.cast(value, variable.dtype) if ns is keras
                            else value.astype(variable.dtype.as_numpy_dtype))
    bn.epsilon = params.eps
    bn.momentum = params.momentum


# -- Flax -------------------------------------------------------------------------------------------

_FLAX_DEFAULTS = {"stride": 1, "padding": "SAME", "dilation": 1, "groups": 1, "eps": 1e-5, "momentum": 0.99}


def _flax_setting(name: str, explicit: Any, from_module: Any) -> Any:
    """One setting from the keyword or the module (not both, unless they agree), else Flax's default."""
    if explicit is not None and from_module is not None and explicit != from_module:
        raise ConvBNError(
            f"{name} was given both as a keyword and by the module, with different values. "
            f"Received: {name}={explicit!r}, module's {from_module!r}"
        )
    value = explicit if explicit is not None else from_module
    return _FLAX_DEFAULTS[name] if value is None else value


def _flax_padding(padding: Any) -> Any:
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        raise ConvBNError(
            "padding must be 'SAME', 'VALID' or explicit zero padding; Flax's "
            f"{padding!r} padding is not zero padding. Received: padding={padding!r}"
        )
    return normalize_padding(padding)


def nnx_value(variable: Any) -> Any:
    """An nnx Variable's value (``get_value`` where Flax has it: ``.value`` is deprecated)."""
    getter = getattr(variable, "get_value", None)
    return getter() if getter is not None else variable.value


def _unwrap(value: Any) -> Any:
    """An nnx Variable's value, or the value itself."""
    return nnx_value(value) if _is_nnx(value, "Variable") else value


def _is_nnx(value: Any, name: str) -> bool:
    import sys

    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(value, getattr(nnx, name))


def from_flax(
    conv_vars: Any,
    bn_vars: Any,
    *,
    conv: linen.Conv | None = None,
    bn: linen.BatchNorm | None = None,
    stride: Any = None,
    padding: Any = None,
    dilation: Any = None,
    groups: int | None = None,
    eps: float | None = None,
    momentum: float | None = None,
) -> ConvBNParams:
    """Params from a Flax conv's and BatchNorm's variables.

    Flax variables carry no configuration, so the geometry and BatchNorm settings come from the
    ``conv``/``bn`` modules that own the variables, from keywords, or else Flax's defaults
    (``strides=1``, ``padding="SAME"``, ``epsilon=1e-5``, ``momentum=0.99``). ``flax.nnx.Conv`` and
    ``flax.nnx.BatchNorm`` modules may be passed directly as ``conv_vars``/``bn_vars``: they carry
    both. Flax's momentum is the fraction kept, as convbn's; ``var_update`` is ``"biased"`` as Flax
    trains; ``use_scale=False``/``use_bias=False`` give ``gamma``/``beta`` None. Arrays are NumPy
    copies.

    Args:
        conv_vars: the conv's variables, ``{"params": {"kernel", "bias"?}}`` or just
            ``{"kernel", "bias"?}``; or an ``nnx.Conv``.
        bn_vars: the BatchNorm's variables, ``{"params": {"scale"?, "bias"?}, "batch_stats":
            {"mean", "var"}}``; or an ``nnx.BatchNorm``.
        conv: the ``flax.linen.Conv`` the variables belong to, for its geometry.
        bn: the ``flax.linen.BatchNorm`` the variables belong to, for ``epsilon``/``momentum``.
        stride, padding, dilation, groups, eps, momentum: the settings when no module gives them
            (a keyword that disagrees with the module is an error).

    Returns:
        The pair as :class:`ConvBNParams`.

    Raises:
        TypeError: when the variables are not mappings or modules.
        ConvBNError: for missing variables, non-zero padding (``"CIRCULAR"``, ...), input dilation,
            a BatchNorm over an axis other than the last, or conflicting settings.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, convbn
        >>> conv, bn = nn.Conv(8, (3, 3), strides=2, use_bias=False), nn.BatchNorm()
        >>> cv = conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
        >>> bv = bn.init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)), use_running_average=True)
        >>> p = convbn.from_flax(cv, bv, conv=conv, bn=bn)
        >>> p.kernel.shape, p.stride, p.momentum, p.var_update
        ((3, 3, 3, 8), (2, 2), 0.99, 'biased')
    """
    if _is_nnx(conv_vars, "Conv"):
        conv, conv_vars = conv_vars, {"kernel": conv_vars.kernel, "bias": getattr(conv_vars, "bias", None)}
    if _is_nnx(bn_vars, "BatchNorm"):
        nnx_bn = bn_vars
        bn, bn_vars = nnx_bn, {
            "params": {"scale": getattr(nnx_bn, "scale", None), "bias": getattr(nnx_bn, "bias", None)},
            "batch_stats": {"mean": nnx_bn.mean, "var": nnx_bn.var},
        }
    conv_params = as_mapping(conv_vars, "conv_vars")
    conv_params = as_mapping(conv_params.get("params", conv_params), "conv_vars['params']")
    bn_mapping = as_mapping(bn_vars, "bn_vars")
    bn_params = as_mapping(bn_mapping.get("params", {}), "bn_vars['params']")
    stats = as_mapping(bn_mapping.get("batch_stats", {}), "bn_vars['batch_stats']")
    for where, mapping, names in (
        ("conv_vars['params']", conv_params, ("kernel",)),
        ("bn_vars['batch_stats']", stats, ("mean", "var")),
    ):
        missing = [n for n in names if _unwrap(mapping.get(n)) is None]
        if missing:
            raise ConvBNError(f"{where} must hold {list(names)}. Received: keys {sorted(mapping)}")
    if conv is not None:
        input_dilation = getattr(conv, "input_dilation", None)
        if input_dilation is not None and set(np.atleast_1d(input_dilation).tolist()) != {1}:
            raise ConvBNError(
                f"conv.input_dilation must be 1: convbn has no input dilation. Received: conv.input_dilation={conv.input_dilation!r}"
            )
        if getattr(conv, "mask", None) is not None:
            raise ConvBNError("conv.mask must be None: a masked kernel is not a plain conv. Received: a mask")
    if bn is not None and bn.axis not in (-1, 3):
        raise ConvBNError(f"bn.axis must be -1 (the channel axis of NHWC data). Received: bn.axis={bn.axis!r}")
    settings = {
        "stride": _flax_setting("stride", stride, None if conv is None else conv.strides),
        "padding": _flax_setting("padding", padding, None if conv is None else conv.padding),
        "dilation": _flax_setting("dilation", dilation, None if conv is None else conv.kernel_dilation),
        "groups": _flax_setting("groups", groups, None if conv is None else conv.feature_group_count),
        "eps": _flax_setting("eps", eps, None if bn is None else bn.epsilon),
        "momentum": _flax_setting("momentum", momentum, None if bn is None else bn.momentum),
    }

    def optional(mapping: Mapping[str, Any], name: str) -> np.ndarray | None:
        value = _unwrap(mapping.get(name))
        return None if value is None else numpy_copy(value)

    return ConvBNParams(
        kernel=numpy_copy(_unwrap(conv_params["kernel"])),
        bias=optional(conv_params, "bias"),
        gamma=optional(bn_params, "scale"),
        beta=optional(bn_params, "bias"),
        moving_mean=numpy_copy(_unwrap(stats["mean"])),
        moving_var=numpy_copy(_unwrap(stats["var"])),
        stride=settings["stride"],
        padding=_flax_padding(settings["padding"]),
        dilation=settings["dilation"],
        groups=int(settings["groups"]),
        eps=float(settings["eps"]),
        momentum=float(settings["momentum"]),
        var_update="biased",
    )


def flax_padding(geometry: ConvBNParams | ConvBNSpec) -> Any:
    """The padding as Flax's ``padding``: ``"SAME"``, ``"VALID"`` or a tuple of pairs."""
    padding = geometry.padding
    if isinstance(padding, str):
        return padding
    return tuple(tuple(p) for p in padding)


def to_flax(params: ConvBNParams) -> tuple[tuple[linen.Conv, dict[str, Any]], tuple[linen.BatchNorm, dict[str, Any]]]:
    """A ``flax.linen.Conv`` and ``flax.linen.BatchNorm`` with their variables, holding ``params``.

    The BatchNorm gets ``use_fast_variance=False`` (the two-pass variance convbn uses; Flax's
    default E[x^2]-E[x]^2 loses precision on data with a large mean) and ``use_running_average``
    unset, to be passed at call time as Flax expects. Arrays become ``jax.Array`` (float64 kernels
    stay float64 only with ``jax_enable_x64``).

    Args:
        params: the params; their arrays may be of any framework.

    Returns:
        ``((conv, conv_variables), (bn, bn_variables))``, where ``conv_variables`` is
        ``{"params": {"kernel", "bias"?}}`` and ``bn_variables`` is ``{"params": {"scale"?,
        "bias"?}, "batch_stats": {"mean", "var"}}``.

    Raises:
        ConvBNError: when ``params.var_update`` is ``"unbiased"`` (Flax trains with the biased
            variance); :class:`convbn.flax.ConvBN` takes either.

    Example:
        >>> import numpy as np, convbn
        >>> p = convbn.ConvBNParams(kernel=np.ones((3, 3, 2, 4), np.float32), moving_mean=np.zeros(4, np.float32),
        ...                         moving_var=np.ones(4, np.float32), stride=2, var_update="biased")
        >>> (conv, conv_vars), (bn, bn_vars) = convbn.to_flax(p)
        >>> conv.strides, sorted(bn_vars["batch_stats"])
        ((2, 2), ['mean', 'var'])
    """
    import jax.numpy as jnp
    from flax import linen

    check_params(params)
    require_var_update(params, "biased", "flax.linen.BatchNorm", "convbn.flax.ConvBN.from_params(params)")
    conv = linen.Conv(
        features=params.out_channels, kernel_size=params.kernel_size, strides=params.stride,
        padding=flax_padding(params), kernel_dilation=params.dilation,
        feature_group_count=params.groups, use_bias=params.bias is not None,
    )
    bn = linen.BatchNorm(
        momentum=params.momentum, epsilon=params.eps, use_bias=params.beta is not None,
        use_scale=params.gamma is not None, use_fast_variance=False,
    )
    arrays = {name: None if v is None else jnp.asarray(numpy_copy(v)) for name, v in
              (("kernel", params.kernel), ("bias", params.bias), ("scale", params.gamma),
               ("beta", params.beta), ("mean", params.moving_mean), ("var", params.moving_var))}
    conv_params = {"kernel": arrays["kernel"]}
    if arrays["bias"] is not None:
        conv_params["bias"] = arrays["bias"]
    bn_params = {}
    if arrays["scale"] is not None:
        bn_params["scale"] = arrays["scale"]
    if arrays["beta"] is not None:
        bn_params["bias"] = arrays["beta"]
    bn_vars: dict[str, Any] = {"batch_stats": {"mean": arrays["mean"], "var": arrays["var"]}}
    if bn_params:
        bn_vars = {"params": bn_params, **bn_vars}
    return (conv, {"params": conv_params}), (bn, bn_vars)

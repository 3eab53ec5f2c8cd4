"""The BatchNorm conventions of each framework, and their translation to convbn's.

convbn has one meaning for each BatchNorm setting (see :class:`convbn.ConvBNParams`): ``momentum`` is
the fraction of the old moving value kept, ``eps`` goes inside the square root, and ``var_update``
says which batch variance feeds the moving variance. Each framework spells these differently; the
presets here hold the measured defaults (``shared/SEMANTICS.md``, section 1) so converters and users
translate in one place.

Example:
    >>> from convbn import conventions
    >>> conventions.TORCH.momentum, conventions.TORCH.native_momentum
    (0.9, 0.1)
    >>> conventions.get("slim").has_gamma
    False
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from convbn.errors import ConvBNError
from convbn.params import ConvBNParams

__all__ = [
    "ALL",
    "DCGAN",
    "FLAX",
    "KERAS2_FUSED",
    "KERAS3",
    "SLIM",
    "TF_V1_LAYERS",
    "TORCH",
    "Convention",
    "get",
    "kept_to_torch_momentum",
    "torch_momentum_to_kept",
]


def torch_momentum_to_kept(momentum: float) -> float:
    """torch's momentum (weight of the new value) as the fraction kept: ``1 - momentum``.

    The result is snapped to the shortest decimal with the same complement: ``1 - (1 - 0.1)`` is
    0.09999999999999998 in floating point, and the snap gives back 0.1, so a momentum survives a
    round trip through the other convention bit for bit.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ConvBNError(f"torch momentum must be in [0, 1]. Received: momentum={momentum!r}")
    value = 1.0 - float(momentum)
    snapped = float(f"{value:.15g}")
    return snapped if 1.0 - snapped == 1.0 - value else value


def kept_to_torch_momentum(momentum: float) -> float:
    """The fraction kept as torch's momentum (weight of the new value): ``1 - momentum``."""
    return torch_momentum_to_kept(momentum)


@dataclasses.dataclass(frozen=True)
class Convention:
    """One framework's BatchNorm defaults, expressed in convbn's terms.

    Attributes:
        name: short name (``"torch"``, ``"keras3"``, ...).
        eps: default epsilon.
        momentum: default momentum as the fraction kept (convbn's meaning).
        var_update: ``"unbiased"`` or ``"biased"`` moving-variance update of the default code path.
        has_gamma: whether the layer has a scale by default.
        has_beta: whether the layer has an offset by default.
        native_momentum: the default as the framework itself spells it.
        native_momentum_is_kept: True when the framework's momentum is the fraction kept, False
            when it is the weight of the new value (torch).
        description: where the convention comes from.
    """

    name: str
    eps: float
    momentum: float
    var_update: Literal["unbiased", "biased"]
    has_gamma: bool
    has_beta: bool
    native_momentum: float
    native_momentum_is_kept: bool
    description: str

    def momentum_from_native(self, native: float) -> float:
        """A momentum spelled the framework's way, as the fraction kept."""
        return native if self.native_momentum_is_kept else torch_momentum_to_kept(native)

    def momentum_to_native(self, kept: float) -> float:
        """A fraction-kept momentum, spelled the framework's way."""
        return kept if self.native_momentum_is_kept else kept_to_torch_momentum(kept)

    def apply(self, params: ConvBNParams) -> ConvBNParams:
        """``params`` with this convention's eps, momentum and var_update."""
        return dataclasses.replace(
            params, eps=self.eps, momentum=self.momentum, var_update=self.var_update
        )

    def params(
        self,
        kernel: Any,
        moving_mean: Any = None,
        moving_var: Any = None,
        **kwargs: Any,
    ) -> ConvBNParams:
        """Build params with this convention's eps/momentum/var_update.

        Missing moving statistics start as the frameworks initialise them (mean 0, variance 1).
        ``kwargs`` go to :class:`ConvBNParams` and override the convention.
        """
        out = int(np.shape(kernel)[3]) if np.ndim(kernel) == 4 else None
        dtype = getattr(kernel, "dtype", np.float32)
        if out is not None:
            np_dtype = dtype if isinstance(dtype, np.dtype) else np.float32
            if moving_mean is None:
                moving_mean = np.zeros(out, np_dtype)
            if moving_var is None:
                moving_var = np.ones(out, np_dtype)
        settings: dict[str, Any] = {
            "eps": self.eps,
            "momentum": self.momentum,
            "var_update": self.var_update,
        }
        settings.update(kwargs)
        return ConvBNParams(kernel=kernel, moving_mean=moving_mean, moving_var=moving_var, **settings)


TORCH = Convention(
    name="torch",
    eps=1e-5,
    momentum=0.9,
    var_update="unbiased",
    has_gamma=True,
    has_beta=True,
    native_momentum=0.1,
    native_momentum_is_kept=False,
    description="torch.nn.BatchNorm2d / F.batch_norm (momentum=0.1 is the weight of the new value)",
)
KERAS3 = Convention(
    name="keras3",
    eps=1e-3,
    momentum=0.99,
    var_update="biased",
    has_gamma=True,
    has_beta=True,
    native_momentum=0.99,
    native_momentum_is_kept=True,
    description="Keras 3 BatchNormalization, on every Keras backend (tf.keras in TF >= 2.16)",
)
KERAS2_FUSED = Convention(
    name="keras2",
    eps=1e-3,
    momentum=0.99,
    var_update="unbiased",
    has_gamma=True,
    has_beta=True,
    native_momentum=0.99,
    native_momentum_is_kept=True,
    description="Keras 2 / tf_keras BatchNormalization on its default fused path",
)
SLIM = Convention(
    name="slim",
    eps=1e-3,
    momentum=0.999,
    var_update="unbiased",
    has_gamma=False,
    has_beta=True,
    native_momentum=0.999,
    native_momentum_is_kept=True,
    description="tf-slim batch_norm (decay=0.999, scale=False, fused path)",
)
TF_V1_LAYERS = Convention(
    name="tf_v1_layers",
    eps=1e-3,
    momentum=0.99,
    var_update="unbiased",
    has_gamma=True,
    has_beta=True,
    native_momentum=0.99,
    native_momentum_is_kept=True,
    description="tf.compat.v1.layers.batch_normalization (fused by default)",
)
FLAX = Convention(
    name="flax",
    eps=1e-5,
    momentum=0.99,
    var_update="biased",
    has_gamma=True,
    has_beta=True,
    native_momentum=0.99,
    native_momentum_is_kept=True,
    description="flax.linen.BatchNorm and flax.nnx.BatchNorm",
)
DCGAN = Convention(
    name="dcgan",
    eps=1e-5,
    momentum=0.9,
    var_update="unbiased",
    has_gamma=True,
    has_beta=True,
    native_momentum=0.9,
    native_momentum_is_kept=True,
    description="DCGAN-style TF code: batch_norm(decay=0.9, epsilon=1e-5, scale=True), fused",
)

#: Every preset by name.
ALL: dict[str, Convention] = {
    c.name: c for c in (TORCH, KERAS3, KERAS2_FUSED, SLIM, TF_V1_LAYERS, FLAX, DCGAN)
}
_ALIASES = {
    "pytorch": "torch",
    "keras": "keras3",
    "tf_keras": "keras2",
    "keras2_fused": "keras2",
    "tf-slim": "slim",
    "tf_slim": "slim",
    "tf.compat.v1.layers": "tf_v1_layers",
    "linen": "flax",
    "nnx": "flax",
}


def get(name: str | Convention) -> Convention:
    """A preset by name (``"torch"``, ``"keras3"``, ``"keras2"``, ``"slim"``, ``"tf_v1_layers"``,
    ``"flax"``, ``"dcgan"``, or an alias such as ``"pytorch"``, ``"keras"``, ``"tf-slim"``).

    Raises:
        ConvBNError: for an unknown name.
    """
    if isinstance(name, Convention):
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    try:
        return ALL[key]
    except KeyError:
        raise ConvBNError(
            f"convention must be one of {sorted(ALL)} (or an alias: {sorted(_ALIASES)}). "
            f"Received: convention={name!r}"
        ) from None

"""A faithful Flax linen port of the DCGAN of tests/formats/dcgan_graphs.py, the target of
``convbn convert --to flax`` in tests/formats/test_dcgan_whole.py.

NHWC throughout, as the TF graph. Generator: ``Dense`` -> reshape into the first map ->
``BatchNorm`` -> relu -> three ``ConvTranspose`` (5x5, stride 2, no bias) + ``BatchNorm`` + relu -> a
last ``ConvTranspose`` with its bias -> tanh. Discriminator: ``Conv`` with bias -> lrelu -> three
``Conv`` (no bias) + ``BatchNorm`` + lrelu -> flatten -> ``Dense``. Every BatchNorm is DCGAN's:
``momentum=0.9``, ``epsilon=1e-5``, run with ``use_running_average=True`` (eval).

Padding: TF's SAME conv at stride 2 is flax's ``'SAME'`` (lax computes TF's pads). TF's SAME
``conv2d_transpose`` keeps ``n*s`` of the ``(n-1)*s + k`` rows of the full transposed conv, from row
``(k - s) // 2``; flax's ``ConvTranspose`` (``transpose_kernel=False``) runs a conv with the flipped
kernel over the stride-dilated input, whose full output needs ``k - 1`` rows of padding on each
side, so the crop is the padding ``(k - 1 - (k - s) // 2, k - 1 - (k - s - (k - s) // 2))``: (3, 2)
for k=5, s=2 (:func:`tf_same_transpose_padding`, checked against ``tf.nn.conv2d_transpose`` in the
test). Module names are what ``convert --to flax`` writes for the TF scopes. Nothing here imports
flax at import time.
"""

from __future__ import annotations

from typing import Any

from tests.formats import dcgan_graphs as g

BN = {"use_running_average": True, "momentum": 0.9, "epsilon": 1e-5}


def tf_same_transpose_padding(k: int, s: int) -> tuple[int, int]:
    """The ``(low, high)`` padding of a flax ``ConvTranspose`` that keeps what TF's SAME
    ``conv2d_transpose`` keeps (for ``k >= s``): the module docstring derives it."""
    crop = k - s
    return k - 1 - crop // 2, k - 1 - (crop - crop // 2)


def models() -> tuple[Any, Any]:
    """``(generator, discriminator)`` as linen modules."""
    import flax.linen as nn
    import jax.numpy as jnp

    pads = (tf_same_transpose_padding(5, 2),) * 2

    class Generator(nn.Module):
        @nn.compact
        def __call__(self, z: Any) -> Any:
            h = nn.Dense(g.GF * 8 * g.S * g.S, name="g_h0_lin")(z).reshape(-1, g.S, g.S, g.GF * 8)
            h = nn.relu(nn.BatchNorm(**BN, name="g_bn0")(h))
            for scope, norm, out in g.G_DECONVS:
                h = nn.ConvTranspose(out, (5, 5), strides=(2, 2), padding=pads, use_bias=norm is None, name=scope)(h)
                h = nn.relu(nn.BatchNorm(**BN, name=f"{scope}_bn")(h)) if norm is not None else jnp.tanh(h)
            return h

    class ConvBN(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = nn.Conv(self.features, (5, 5), strides=(2, 2), padding="SAME", use_bias=False, name="conv")(x)
            return nn.BatchNorm(**BN, name="bn")(h)

    class Discriminator(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = x
            for scope, norm, out in g.D_CONVS:
                if norm is None:
                    h = nn.Conv(out, (5, 5), strides=(2, 2), padding="SAME", name=scope)(h)
                else:
                    h = ConvBN(out, name=scope)(h)
                h = nn.leaky_relu(h, 0.2)
            return nn.Dense(1, name="d_h4_lin")(h.reshape(h.shape[0], -1))

    return Generator(), Discriminator()


def run(variables: dict[str, Any], z: Any, x: Any) -> dict[str, Any]:
    """The port's eval outputs for ``variables`` (``{"params": ..., "batch_stats": ...}``, each with
    a ``generator`` and a ``discriminator`` subtree): ``{"fake": ..., "logits": ...}``."""
    import numpy as np

    generator, discriminator = models()

    def part(name: str) -> dict[str, Any]:
        return {collection: tree[name] for collection, tree in variables.items() if name in tree}

    return {
        "fake": np.asarray(generator.apply(part("generator"), z)),
        "logits": np.asarray(discriminator.apply(part("discriminator"), x)),
    }


def template(z: Any, x: Any) -> dict[str, Any]:
    """Freshly initialized variables of both nets, in the shape ``run`` takes (what
    ``flax.serialization.from_bytes`` restores a file into)."""
    import jax

    generator, discriminator = models()
    gen = generator.init(jax.random.key(0), z)
    disc = discriminator.init(jax.random.key(1), x)
    return {collection: {"generator": gen.get(collection, {}), "discriminator": disc.get(collection, {})}
            for collection in ("params", "batch_stats")}

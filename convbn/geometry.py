"""Padding arithmetic and shape validation, in plain Python on static dimensions.

Every backend gets a :class:`Plan` computed here, so TF's SAME split, the output size and every
shape check are written once and checked before any framework sees the data. Only dimensions that
are plain ints are checked, so tracing under ``jax.jit`` / ``tf.function`` (unknown batch size) works.
"""

from __future__ import annotations

import dataclasses

from convbn.errors import ConvBNError
from convbn.params import ConvBNParams, array_shape
from convbn.spec import ConvBNSpec, ExplicitPadding, Pair, output_size, same_pads, symmetric

__all__ = ["DATA_FORMATS", "Plan", "check_data_format", "output_size", "plan_for", "plan_for_spec", "same_pads", "share_plans"]

DATA_FORMATS = ("NHWC", "NCHW")
Dim = int | None


def check_data_format(data_format: str, formats: tuple[str, ...] = DATA_FORMATS) -> str:
    """``data_format`` if it is one of ``formats`` (convbn's two by default), else ConvBNError."""
    if data_format not in formats:
        raise ConvBNError(
            f"data_format must be {' or '.join(map(repr, formats))}. Received: data_format={data_format!r}"
        )
    return data_format


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call: resolved padding, sizes, and the checks already done.

    ``pads`` comes from :meth:`ConvBNSpec.pads`; it is None only for SAME padding along a strided
    dim whose size is unknown at trace time (TF), in which case the backend passes 'SAME' to the
    framework, whose SAME is TF's.
    """

    data_format: str
    training: bool
    pads: ExplicitPadding | None
    stride: Pair
    dilation: Pair
    groups: int
    in_channels: int
    out_channels: int
    out_hw: tuple[Dim, Dim]
    values_per_channel: Dim
    batch: Dim = None
    #: True when each spatial dim pads the same before and after, so the conv's own padding
    #: suffices (a field, not a property: backends read it on every call).
    symmetric: bool = False
    #: The ``(top, left)`` padding the conv itself takes when :attr:`symmetric` (else ``(0, 0)``:
    #: the backend pads first).
    conv_padding: Pair = (0, 0)
    #: True for a zero-size batch: the output is known from the geometry alone, and no framework
    #: kernel is asked to compute it (TF's oneDNN conv returns a wrong shape for one). A field, as
    #: every call reads it.
    empty: bool = False

    @property
    def out_shape(self) -> tuple[Dim, ...]:
        """The output's shape in ``data_format``."""
        h, w = self.out_hw
        if self.data_format == "NHWC":
            return (self.batch, h, w, self.out_channels)
        return (self.batch, self.out_channels, h, w)

    @property
    def depthwise(self) -> bool:
        """True when every input channel is its own group."""
        return self.groups == self.in_channels and self.groups > 1


def _received(x_shape: tuple[Dim, ...], data_format: str) -> str:
    return f"Received: x.shape={x_shape} (data_format={data_format!r})"


def plan_for(
    x_shape: tuple[Dim, ...], params: ConvBNParams, data_format: str, training: bool,
    synced: bool = False,
) -> Plan:
    """Validate ``x`` against ``params`` and resolve the geometry; cached per params object
    (and shared with the params a training step returns, see :func:`share_plans`).

    ``synced``: the batch statistics span every replica's batch, so this replica may hold one
    value per channel, or none.

    Raises:
        ConvBNError: for a bad data_format, rank, channel count, an input smaller than the
            dilated kernel, or (unless ``synced``) a training batch with one value per channel.
    """
    cache = params.cache
    plans = cache.plans
    if plans is None:
        plans = cache.plans = {}
    key = (x_shape, data_format, training, synced)
    plan = plans.get(key)
    if plan is None:
        params.check_arrays()  # params rebuilt by pytree transforms skipped the constructor
        if params.kernel_size is None or params.out_channels is None or params.in_channels is None:
            raise ConvBNError(f"kernel shape must be static. Received: kernel.shape={array_shape(params.kernel)}")
        plan = _make_plan(tuple(x_shape), params.spec, data_format, bool(training), synced)
        plans[key] = plan
    return plan


def share_plans(source: ConvBNParams, target: ConvBNParams) -> ConvBNParams:
    """Let ``target`` reuse ``source``'s plans: only for params with the same static config and
    array shapes (e.g. the moving statistics updated by a training step), so that a training loop
    that passes each step's new params to the next does not validate and plan again every step."""
    plans = source.cache.plans
    if plans is not None:
        target.cache.plans = plans
    return target


def plan_for_spec(
    x_shape: tuple[Dim, ...], spec: ConvBNSpec, data_format: str, training: bool, synced: bool = False
) -> Plan:
    """Validate an input of ``x_shape`` against ``spec`` and resolve the geometry (uncached; see
    :func:`plan_for` for params). The spec's kernel size and channel counts must be known.

    Raises:
        ConvBNError: as :func:`plan_for`.
    """
    if spec.kernel_size is None or spec.in_channels is None or spec.out_channels is None:
        raise ConvBNError(
            "the kernel size and channel counts must be known to plan a call. Received: "
            f"kernel_size={spec.kernel_size}, in_channels={spec.in_channels}, out_channels={spec.out_channels}"
        )
    return _make_plan(tuple(x_shape), spec, data_format, bool(training), synced)


def _make_plan(
    x_shape: tuple[Dim, ...], spec: ConvBNSpec, data_format: str, training: bool, synced: bool = False
) -> Plan:
    check_data_format(data_format)
    layout = "(N, H, W, C)" if data_format == "NHWC" else "(N, C, H, W)"
    if len(x_shape) != 4:
        raise ConvBNError(
            f"x must be 4-D {layout} for data_format={data_format!r}. Received: x.shape={x_shape}"
        )
    (kh, kw), groups = spec.kernel_size, spec.groups  # type: ignore[misc]
    in_channels, out_channels = spec.in_channels, spec.out_channels
    assert in_channels is not None and out_channels is not None
    if data_format == "NHWC":
        n, h, w, c = x_shape
    else:
        n, c, h, w = x_shape
    if c is not None and c != in_channels:
        extra = f" ({in_channels // groups} per group x groups={groups})" if groups > 1 else ""
        raise ConvBNError(
            f"x has {c} channels but the kernel expects {in_channels}{extra}. "
            + _received(x_shape, data_format)
        )
    sh, sw = spec.stride
    dh, dw = spec.dilation
    padding = spec.padding
    pads = spec.pads(h, w)
    out_hw: list[Dim] = []
    for size, k, s, d, axis, i in ((h, kh, sh, dh, "H", 0), (w, kw, sw, dw, "W", 1)):
        if size is None:
            out_hw.append(None)
            continue
        before, after = pads[i] if pads is not None else (0, 0)
        k_eff = (k - 1) * d + 1
        if size + before + after < k_eff:
            raise ConvBNError(
                f"the padded input must be at least as large as the dilated kernel along {axis}: "
                f"{size} + {before} + {after} < {k_eff} (kernel {k}, dilation {d}). "
                f"Received: padding={padding!r}, " + _received(x_shape, data_format)
            )
        out_hw.append(output_size(size, k, s, d, before, after))
    values: Dim = None
    if n is not None and out_hw[0] is not None and out_hw[1] is not None:
        values = n * out_hw[0] * out_hw[1]
        if training and values == 1 and not synced:
            raise ConvBNError(
                "training needs more than one value per channel to compute batch statistics "
                "(N * H_out * W_out = 1); use training=False for single values. "
                + _received(x_shape, data_format)
            )
    is_symmetric = pads is not None and symmetric(pads)
    return Plan(
        data_format=data_format,
        training=training,
        pads=pads,
        stride=(sh, sw),
        dilation=(dh, dw),
        groups=groups,
        in_channels=in_channels,
        out_channels=out_channels,
        out_hw=(out_hw[0], out_hw[1]),
        values_per_channel=values,
        batch=n,
        symmetric=is_symmetric,
        conv_padding=(pads[0][0], pads[1][0]) if is_symmetric and pads is not None else (0, 0),  # type: ignore[arg-type]
        empty=values == 0,
    )

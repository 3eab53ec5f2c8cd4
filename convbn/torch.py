"""``ConvBN2d``: Conv2D + BatchNorm as a ``torch.nn.Module`` that computes :func:`convbn.conv_bn`.

Importing this module imports torch. The layer holds a real ``nn.Conv2d`` (``conv``) and
``nn.BatchNorm2d`` (``bn``), so its ``state_dict`` has torch's names (``conv.weight``,
``bn.running_mean``, ``bn.num_batches_tracked``, ...) and torch tooling sees ordinary modules, but
its forward is convbn's: TF's SAME padding at any stride, BatchNorm folded into the conv in eval
mode, and the moving variance updated with the unbiased (torch) or biased (Keras/Flax) variance.

Example:
    >>> import torch
    >>> from convbn.torch import ConvBN2d
    >>> layer = ConvBN2d(3, 8, 3, stride=2)              # TF SAME padding, torch's momentum=0.1
    >>> y = layer(torch.randn(4, 3, 32, 32))              # training mode: updates bn's buffers
    >>> tuple(y.shape), int(layer.bn.num_batches_tracked)
    ((4, 8, 16, 16), 1)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from convbn import adapters
from convbn.backends import torch as backend
from convbn.errors import ConvBNError
from convbn.geometry import check_data_format, plan_for
from convbn.layouts import HWIO_TO_OIHW, OIHW_TO_HWIO
from convbn.params import ConvBNParams, with_arrays
from convbn.spec import ConvBNSpec, VarUpdate, symmetric

__all__ = ["ConvBN2d", "convert_sync"]


class ConvBN2d(nn.Module):
    """Conv2D followed by BatchNorm2d, computed by :func:`convbn.conv_bn`.

    ``momentum`` has torch's meaning, as in ``nn.BatchNorm2d``: the weight of the new batch value
    (``running = (1 - momentum) * running + momentum * batch``; convbn's kept fraction is
    ``1 - momentum``). ``train()``/``eval()`` pick the mode; in training the running buffers and
    ``num_batches_tracked`` are updated in place, as ``nn.BatchNorm2d`` does.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: an int or ``(kh, kw)``.
        stride: an int or a pair.
        padding: ``"SAME"`` (TF's: at odd totals the extra row/column goes at the bottom/right, at
            any stride), ``"VALID"``, an int, ``(ph, pw)`` or ``((top, bottom), (left, right))``.
        dilation: an int or a pair.
        groups: conv groups; ``groups == in_channels`` is depthwise.
        bias: whether the conv has a bias (redundant before BatchNorm; kept for converted weights).
        eps: BatchNorm epsilon, inside the square root.
        momentum: torch's momentum, the weight of the new value (``None``, torch's cumulative
            average, is not supported).
        var_update: ``"unbiased"`` (torch's) or ``"biased"`` (Keras 3's and Flax's) batch variance
            for the running-variance update. The output always uses the biased batch variance.
        data_format: ``"NCHW"`` (torch's) or ``"NHWC"``, for input and output.
        device: where the parameters live.
        dtype: the parameters' dtype.
        sync: in training, share the batch statistics across the ranks of a ``torch.distributed``
            process group, as ``nn.SyncBatchNorm`` does (on CPU with gloo too): ``True`` for the
            default group, or a ``ProcessGroup``. Ranks may hold different batch sizes, or none;
            every rank must run each forward and backward. None: this rank's batch only. Checked
            at the first training call, so the layer can be built before
            ``init_process_group``; :func:`convert_sync` sets it on a whole model.

    Attributes:
        conv: the ``nn.Conv2d`` holding ``weight`` (OIHW) and ``bias``. Its ``padding`` is torch's
            equivalent of ``padding`` where torch has one, else 0; the layer's forward pads as
            convbn does whatever it says.
        bn: the ``nn.BatchNorm2d`` holding ``weight`` (gamma), ``bias`` (beta), ``running_mean``,
            ``running_var`` and ``num_batches_tracked``. Changing ``bn.eps``/``bn.momentum`` takes
            effect on the next call.
        padding: the padding as convbn stores it (``"SAME"``, ``"VALID"`` or explicit pairs).
        var_update: as above.
        data_format: as above.
        sync: as above; may be changed between calls.

    Raises:
        ConvBNError: for a malformed geometry, ``momentum`` outside [0, 1] or None, a bad
            ``var_update``/``data_format``, or channels that ``groups`` does not divide.

    Example:
        >>> import torch
        >>> from convbn.torch import ConvBN2d
        >>> layer = ConvBN2d(16, 32, 3, stride=2).eval()
        >>> layer(torch.randn(1, 16, 9, 9)).shape
        torch.Size([1, 32, 5, 5])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: Any = "SAME",
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float = 0.1,
        var_update: VarUpdate = "unbiased",
        *,
        data_format: str = "NCHW",
        device: Any = None,
        dtype: Any = None,
        sync: Any = None,
    ) -> None:
        super().__init__()
        check_data_format(data_format, ("NCHW", "NHWC"))
        # Geometry and convention are validated once, here, before any weight exists.
        spec = ConvBNSpec(
            kernel_size=kernel_size, in_channels=in_channels, out_channels=out_channels, stride=stride,
            padding=padding, dilation=dilation, groups=groups, eps=eps,
            momentum=adapters.kept_from_torch(momentum, "ConvBN2d"), var_update=var_update,
        )
        self.padding = spec.padding
        self.var_update: VarUpdate = spec.var_update
        self.data_format = data_format
        self.conv = nn.Conv2d(
            in_channels, out_channels, spec.kernel_size, spec.stride, adapters.torch_padding(spec) or 0,  # type: ignore[arg-type]
            spec.dilation, groups, bias, device=device, dtype=dtype,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, device=device, dtype=dtype)
        self.sync = sync
        self._states: dict[bool, tuple[tuple[Any, ...], ConvBNParams]] = {}

    # -- params ------------------------------------------------------------------------------------

    def _live_params(self) -> tuple[ConvBNParams, tuple[torch.Tensor | None, ...]]:
        """Params viewing the live tensors, rebuilt only when a tensor or a setting changed, and the
        tensors (weight, bias, gamma, beta, running mean, running var).

        The key holds each tensor's identity (parameters replaced, parametrizations) and data
        pointer (``.to()``, ``.half()`` and ``channels_last`` swap the storage under the same
        Parameter). In-place updates keep the params valid (they are views). One params object is
        kept per grad mode: the HWIO kernel view made under ``no_grad`` carries no autograd
        history, so it must not serve a call that needs gradients. The cached params keep their
        tensors alive, so a key can never match a newer tensor.
        """
        tensors = self._tensors()
        bn = self.bn
        key = (
            bn.eps, bn.momentum, self.padding, self.var_update,
            *[(id(t), t.data_ptr()) for t in tensors if t is not None],
        )
        grad = torch.is_grad_enabled()
        state = self._states.get(grad)
        if state is None or state[0] != key:
            with torch.inference_mode(False):  # cached views must be usable outside inference mode
                state = (key, self._build_params(tensors))
            self._states[grad] = state
        return state[1], tensors

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        """weight, bias, gamma, beta, running mean, running var: read from the modules' own
        dicts, which is what ``nn.Module.__getattr__`` does at a fraction of the cost per call."""
        modules = self._modules
        conv, bn = modules["conv"], modules["bn"]
        params, bn_params, buffers = conv._parameters, bn._parameters, bn._buffers  # type: ignore[union-attr]
        try:
            return (params["weight"], params["bias"], bn_params["weight"], bn_params["bias"],
                    buffers["running_mean"], buffers["running_var"])
        except KeyError:  # a parametrization (torch.nn.utils.parametrize) computes the value
            return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)  # type: ignore[union-attr,return-value]

    def _build_params(self, tensors: tuple[torch.Tensor | None, ...]) -> ConvBNParams:
        """Params viewing ``tensors`` (from :meth:`_tensors`) with the modules' settings."""
        conv, bn = self.conv, self.bn
        weight, bias, gamma, beta, mean, var = tensors
        if mean is None or var is None:
            raise ConvBNError("bn must track running statistics. Received: bn.track_running_stats=False")
        return ConvBNParams(
            kernel=weight.permute(OIHW_TO_HWIO), bias=bias, gamma=gamma, beta=beta,  # type: ignore[union-attr]
            moving_mean=mean, moving_var=var, stride=conv.stride,
            padding=self.padding, dilation=conv.dilation, groups=conv.groups, eps=bn.eps,
            momentum=adapters.kept_from_torch(bn.momentum, "bn"), var_update=self.var_update,
        )

    def params(self) -> ConvBNParams:
        """A snapshot of the layer as :class:`ConvBNParams`: NumPy copies, HWIO kernel, momentum as
        the fraction kept (``1 - bn.momentum``).

        ``conv_bn(x, layer.params(), training=layer.training, data_format=layer.data_format)``
        gives exactly the layer's output.

        Example:
            >>> from convbn.torch import ConvBN2d
            >>> p = ConvBN2d(3, 8, 3).params()
            >>> p.kernel.shape, p.momentum, p.var_update
            ((3, 3, 3, 8), 0.9, 'unbiased')
        """
        live = self._build_params(self._tensors())
        return with_arrays(live, **{name: adapters.numpy_copy(v.detach()) for name, v in live.arrays().items()})

    @classmethod
    def from_params(
        cls, params: ConvBNParams, *, data_format: str = "NCHW", device: Any = None, dtype: Any = None
    ) -> ConvBN2d:
        """A layer holding ``params`` (copied), with its geometry, eps, momentum and ``var_update``.

        Missing gamma/beta/bias become ones/zeros/zeros (``bn`` is always affine; the numbers are
        the same); a conv bias is kept when the params have one.

        Args:
            params: the params; their arrays may be of any framework.
            data_format: the layer's ``"NCHW"`` or ``"NHWC"``.
            device: where the parameters live.
            dtype: the parameters' dtype; None takes the kernel's.

        Raises:
            TypeError: when ``params`` is not a ``ConvBNParams``.

        Example:
            >>> import numpy as np, convbn
            >>> from convbn.torch import ConvBN2d
            >>> p = convbn.ConvBNParams(kernel=np.ones((3, 3, 2, 4), np.float32), moving_mean=np.zeros(4, np.float32),
            ...                         moving_var=np.ones(4, np.float32), stride=2, momentum=0.9)
            >>> layer = ConvBN2d.from_params(p)
            >>> layer.bn.momentum, layer.conv.stride
            (0.1, (2, 2))
        """
        adapters.check_params(params)
        kernel = backend.asarray(params.kernel)
        if dtype is None:
            dtype = kernel.dtype if kernel.dtype.is_floating_point else torch.get_default_dtype()
        layer = cls(
            params.in_channels, params.out_channels, params.kernel_size, params.stride, params.padding,
            params.dilation, params.groups, bias=params.bias is not None, eps=params.eps,
            momentum=adapters.torch_momentum(params), var_update=params.var_update,
            data_format=data_format, device=device, dtype=dtype,
        )
        values = {
            "weight": (layer.conv.weight, kernel.permute(HWIO_TO_OIHW)),
            "bias": (layer.conv.bias, params.bias),
            "gamma": (layer.bn.weight, params.gamma),
            "beta": (layer.bn.bias, params.beta),
            "moving_mean": (layer.bn.running_mean, params.moving_mean),
            "moving_var": (layer.bn.running_var, params.moving_var),
        }
        with torch.no_grad():
            for target, value in values.values():
                if target is not None and value is not None:
                    target.copy_(backend.asarray(value))
        return layer

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv_bn(x, ...)`` in this module's mode; training updates the running buffers in place."""
        compiling = torch.compiler.is_compiling()
        if compiling:
            # Traced once per guard set: plain tensor ops, with the fold compiled into the graph.
            tensors = self._tensors()
            params = self._build_params(tensors)
        else:
            params, _ = self._live_params()
        training = self.training
        if training and self.sync is not None and self.sync is not False:
            return self._forward_sync(x, params)
        plan = plan_for(tuple(x.shape), params, self.data_format, training)
        if plan.empty:  # no statistics to learn from; the shape comes from the geometry
            return backend.empty_output(x, plan.out_shape)  # type: ignore[arg-type]
        if not training:
            # One conv with BatchNorm folded in: the backend caches the fold on the live params and
            # revalidates it with the tensors' version counters.
            return backend.conv_bn(x, params, plan)  # type: ignore[no-any-return]
        self.bn.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        # The live params view bn's own buffers: the backend updates them in place, as
        # nn.BatchNorm2d does (torch's batch_norm kernel writes them, with torch's convention),
        # and the numbers are conv_bn's in training, bit for bit.
        return backend.train_in_place(x, params, plan)  # type: ignore[no-any-return]

    def _forward_sync(self, x: torch.Tensor, params: ConvBNParams) -> torch.Tensor:
        """Training on the statistics of every rank of ``sync``'s group; an empty local batch
        still joins the collectives, so there is no early return for it."""
        group = backend.sync_group(self.sync)
        plan = plan_for(tuple(x.shape), params, self.data_format, True, synced=True)
        self.bn.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        y, new = backend.train_sync(x, params, plan, group)
        with torch.no_grad():  # the live params view bn's buffers
            params.moving_mean.copy_(new.moving_mean)
            params.moving_var.copy_(new.moving_var)
        return y

    # -- export ------------------------------------------------------------------------------------

    def fuse(self, input_size: tuple[int, int] | None = None) -> nn.Module:
        """An inference module with BatchNorm folded into the conv (as ``torch.nn.utils.fusion``).

        The weights come from :func:`convbn.fuse` on the current state (moving statistics, as in
        eval mode). The result is an ``nn.Conv2d``, or ``nn.Sequential(nn.ZeroPad2d, nn.Conv2d)``
        when the padding is asymmetric, so it holds only stock torch modules (for export). It takes
        NCHW input, as every torch conv does.

        Args:
            input_size: ``(H, W)`` of the input, needed when the padding is TF's SAME at stride > 1
                (its pads depend on the size); the result is then exact for that size only.

        Returns:
            The fused module, on the layer's device and dtype, with ``requires_grad`` parameters.

        Raises:
            ConvBNError: when SAME at stride > 1 needs ``input_size`` and none was given.

        Example:
            >>> import torch
            >>> from convbn.torch import ConvBN2d
            >>> layer = ConvBN2d(3, 8, 3, stride=2).eval()
            >>> fused = layer.fuse(input_size=(32, 32))
            >>> x = torch.randn(1, 3, 32, 32)
            >>> bool(torch.allclose(fused(x), layer(x), atol=1e-5))
            True
        """
        from convbn.api import fuse as fuse_params

        params = self._build_params(self._tensors())
        pads = params.spec.pads(*(input_size if input_size is not None else (None, None)))
        if pads is None:
            raise ConvBNError(
                "input_size=(H, W) is needed: TF's SAME padding at stride > 1 depends on the input "
                f"size. Received: input_size=None, stride={params.stride}"
            )
        with torch.no_grad():
            kernel, bias = fuse_params(params)
        one_conv = symmetric(pads)
        conv = nn.Conv2d(
            params.in_channels, params.out_channels, params.kernel_size, params.stride,
            (pads[0][0], pads[1][0]) if one_conv else 0, params.dilation, params.groups, True,
            device=kernel.device, dtype=kernel.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(kernel.permute(HWIO_TO_OIHW))
            conv.bias.copy_(bias)  # type: ignore[union-attr]
        if one_conv:
            return conv
        (top, bottom), (left, right) = pads
        return nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv)

    # -- plumbing ----------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        sync = "" if self.sync is None else f", sync={self.sync!r}"
        return f"padding={self.padding!r}, var_update={self.var_update!r}, data_format={self.data_format!r}{sync}"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # Views of the old tensors, and the folds cached on them: rebuilt on the first call.
        state.update(_states={})
        return state  # type: ignore[no-any-return]


def convert_sync(module: nn.Module, group: Any = None) -> nn.Module:
    """Make every :class:`ConvBN2d` in ``module`` (itself included) share its batch statistics
    across ``group``'s ranks in training, like ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    The layers are changed in place (``ConvBN2d`` itself synchronizes, so no module is replaced and
    the ``state_dict`` keeps its names); plain ``nn.BatchNorm2d`` layers are left alone, for
    ``nn.SyncBatchNorm.convert_sync_batchnorm``. Call it before wrapping the model in
    ``DistributedDataParallel``.

    Args:
        module: the model.
        group: a ``torch.distributed`` ``ProcessGroup``; None for the default group.

    Returns:
        ``module``.

    Example:
        >>> from torch import nn
        >>> from convbn.torch import ConvBN2d, convert_sync
        >>> model = convert_sync(nn.Sequential(ConvBN2d(3, 8, 3), ConvBN2d(8, 8, 3)))
        >>> [layer.sync for layer in model]
        [True, True]
    """
    sync = True if group is None else group
    for layer in module.modules():
        if isinstance(layer, ConvBN2d):
            layer.sync = sync
    return module

"""The params' cache slots: what is reused, what is invalidated, what never travels.

A params object caches derived values (plans, converted tensors, folds) in ``params.cache``. The
tests check reuse by identity of the cached objects across calls, invalidation by values (a
training step's new params never serve the old moving statistics; another dtype or device gets
its own fold), that pickling and copying drop the caches, and that ``convbn.torch.ConvBN2d``,
which goes through the same public backend functions, gives conv_bn's numbers bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest

import convbn
from convbn.caches import CacheSlots
from tests import reference
from tests._support.assertions import rel_err
from tests.cases import Case, reference_params, to_layout
from tests.conftest import need

TOL64 = 1e-12
# nn.Conv2d + nn.BatchNorm2d against the folded float32 eval (tests/layers/test_torch_layer.py).
TOL32 = 5e-6

CASE = Case("slots", (2, 7, 8, 3), (3, 3), 4, stride=2)


def _torch_params():
    x, params = CASE.params(momentum=0.8)
    return x, convbn.to_backend(params, "torch")


def test_new_params_start_with_empty_slots():
    x, params = CASE.params()
    convbn.conv_bn(x, params, backend="numpy")
    assert params.cache.plans
    for new in (dataclasses.replace(params, eps=0.5), pickle.loads(pickle.dumps(params)),
                copy.copy(params), copy.deepcopy(params)):
        assert isinstance(new.cache, CacheSlots) and new.cache is not params.cache
        assert new.cache.plans is None and new.cache.native is None


def test_pickling_drops_the_caches():
    need("torch")
    x, params = _torch_params()
    import torch

    convbn.conv_bn(torch.from_numpy(x), params)
    assert params.cache.torch_folds
    state = params.__getstate__()
    assert "cache" not in state and not any(isinstance(v, CacheSlots) for v in state.values())
    loaded = pickle.loads(pickle.dumps(params))
    assert loaded.cache.torch_folds is None and loaded.cache.torch_tensors is None
    # The reloaded params compute the same numbers from their own, fresh caches.
    xt = torch.from_numpy(x)
    assert torch.equal(convbn.conv_bn(xt, loaded), convbn.conv_bn(xt, params))


def test_numpy_input_reuses_the_converted_params():
    need("torch")
    x, params = CASE.params()
    y1 = convbn.conv_bn(x, params, backend="torch")
    (key, native), = params.cache.native.items()
    assert key.backend == "torch" and key.device == "cpu"
    y2 = convbn.conv_bn(x, params, backend="torch")
    assert params.cache.native[key] is native
    np.testing.assert_array_equal(y1, y2)
    assert rel_err(y1, reference.conv_bn(x, reference_params(params, CASE))) < TOL64


@pytest.mark.parametrize("field", ["kernel", "bias", "gamma", "beta", "moving_mean", "moving_var"])
def test_torch_fold_is_reused_and_follows_in_place_changes(field):
    need("torch")
    import torch

    x, params = _torch_params()
    xt = torch.from_numpy(x)
    y1 = convbn.conv_bn(xt, params)
    (entry,) = params.cache.torch_folds.values()
    folded = entry.folded
    y2 = convbn.conv_bn(xt, params)
    assert entry.folded is folded  # the same tensors: nothing was refolded
    assert torch.equal(y1, y2)
    with torch.no_grad():
        getattr(params, field).mul_(1.5)  # an in-place change: its version counter moves
    y3 = convbn.conv_bn(xt, params)
    assert entry.folded is not folded
    shifted = reference_params(convbn.to_numpy(params), CASE)
    assert rel_err(y3.numpy(), reference.conv_bn(x, shifted)) < TOL64


def test_torch_fold_per_dtype():
    need("torch")
    import torch

    x, params = _torch_params()
    y64 = convbn.conv_bn(torch.from_numpy(x), params)
    y32 = convbn.conv_bn(torch.from_numpy(x.astype(np.float32)), params)
    folds = params.cache.torch_folds
    assert set(folds) == {(torch.device("cpu"), torch.float64), (torch.device("cpu"), torch.float32)}
    assert folds[(torch.device("cpu"), torch.float32)].folded.weight.dtype == torch.float32
    assert y32.dtype == torch.float32
    assert rel_err(y32.double().numpy(), y64.numpy()) < TOL32


def test_torch_training_step_params_do_not_see_the_old_statistics():
    need("torch")
    import torch

    x, params = _torch_params()
    xt = torch.from_numpy(x)
    convbn.conv_bn(xt, params)  # caches the fold of the old statistics on params
    _, new = convbn.conv_bn(xt, params, training=True)
    assert new.cache.plans is params.cache.plans  # the geometry is shared
    assert new.cache.torch_folds is None  # but no fold of the old statistics
    (tensors,) = new.cache.torch_tensors.values()
    assert tensors.moving_mean is new.moving_mean and tensors.moving_var is new.moving_var
    assert tensors.kernel is params.cache.torch_tensors[torch.device("cpu")].kernel
    y_new = convbn.conv_bn(xt, new)
    ref = reference_params(convbn.to_numpy(new), CASE)
    assert rel_err(y_new.numpy(), reference.conv_bn(x, ref)) < TOL64
    assert rel_err(y_new.numpy(), convbn.conv_bn(xt, params).numpy()) > 1e-3  # the stats did move


def test_torch_device_gets_its_own_entries():
    # The meta device stands in for a second one (this suite runs on CPU): its tensors are
    # converted and folded under its own key, and the CPU entries stay as they were.
    need("torch")
    import torch

    x, params = _torch_params()
    cpu, meta = torch.device("cpu"), torch.device("meta")
    xt = torch.from_numpy(x)
    y_cpu = convbn.conv_bn(xt, params)
    cpu_fold = params.cache.torch_folds[(cpu, torch.float64)].folded
    y_meta = convbn.conv_bn(xt.to(meta), params)
    assert y_meta.device == meta and y_meta.shape == y_cpu.shape
    assert params.cache.torch_tensors[meta].kernel.device == meta
    assert params.cache.torch_tensors[cpu].kernel is params.kernel
    assert params.cache.torch_folds[(meta, torch.float64)].folded.weight.device == meta
    assert params.cache.torch_folds[(cpu, torch.float64)].folded is cpu_fold
    assert torch.equal(convbn.conv_bn(xt, params), y_cpu)


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("var_update", ["unbiased", "biased"])
def test_torch_layer_is_conv_bn_bit_for_bit(data_format, var_update):
    need("torch")
    import torch

    from convbn.torch import ConvBN2d

    x, params = CASE.params(momentum=0.7, var_update=var_update)
    layer = ConvBN2d.from_params(params, data_format=data_format)
    xt = torch.from_numpy(to_layout(x, data_format))
    for step in range(2):
        snapshot = convbn.to_backend(layer.params(), "torch")
        y = layer(xt * (step + 1))
        y_ref, new = convbn.conv_bn(xt * (step + 1), snapshot, True, data_format=data_format)
        assert torch.equal(y, y_ref)
        assert torch.equal(layer.bn.running_mean, new.moving_mean)
        assert torch.equal(layer.bn.running_var, new.moving_var)
    layer.eval()
    snapshot = convbn.to_backend(layer.params(), "torch")
    assert torch.equal(layer(xt), convbn.conv_bn(xt, snapshot, data_format=data_format))


def test_torch_layer_matches_the_torch_stack():
    need("torch")
    import torch
    from torch import nn

    from convbn.torch import ConvBN2d

    torch.manual_seed(0)
    layer = ConvBN2d(3, 6, 3, padding=1, momentum=0.3)
    seq = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, momentum=0.3))
    seq[0].load_state_dict(layer.conv.state_dict())
    seq[1].load_state_dict(layer.bn.state_dict())
    x = torch.randn(4, 3, 9, 9)
    for _ in range(2):
        assert rel_err(layer(x).detach().numpy(), seq(x).detach().numpy()) < TOL32
        assert rel_err(layer.bn.running_var.numpy(), seq[1].running_var.numpy()) < TOL32
        assert rel_err(layer.bn.running_mean.numpy(), seq[1].running_mean.numpy()) < TOL32
    layer.eval()
    seq.eval()
    with torch.no_grad():
        assert rel_err(layer(x).numpy(), seq(x).numpy()) < TOL32

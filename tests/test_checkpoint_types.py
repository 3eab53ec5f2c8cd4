"""The checkpoint data types: a model's layers in source order, and layers that refuse to be wrong."""

from __future__ import annotations

import numpy as np
import pytest

from convbn import ConvBNParams
from convbn.checkpoint import Checkpoint, FeatureMap, Layer, Norm
from convbn.errors import ConvBNError


def _pair(out: int = 4) -> ConvBNParams:
    return ConvBNParams(
        kernel=np.ones((3, 3, 2, out), np.float32),
        moving_mean=np.zeros(out, np.float32),
        moving_var=np.ones(out, np.float32),
    )


def _dense(n_in: int = 8, n_out: int = 3, **kw: object) -> Layer:
    return Layer("dense", kernel=np.arange(n_in * n_out, dtype=np.float32).reshape(n_in, n_out), **kw)  # type: ignore[arg-type]


def test_in_order_walks_pairs_and_other_layers_in_source_order() -> None:
    ckpt = Checkpoint(
        layers={"conv1": _pair(), "conv2": _pair()},
        others={"stem": Layer("conv", kernel=np.ones((1, 1, 2, 2))), "fc": _dense()},
        order=["stem", "conv1", "missing", "conv2", "fc"],
    )
    assert [name for name, _ in ckpt.in_order()] == ["stem", "conv1", "conv2", "fc"]
    ckpt.order = ["fc"]  # unlisted layers follow, pairs first
    assert [name for name, _ in ckpt.in_order()] == ["fc", "conv1", "conv2", "stem"]


def test_copy_has_its_own_containers() -> None:
    ckpt = Checkpoint(others={"fc": _dense()}, order=["fc"])
    other = ckpt.copy()
    other.others["head"] = _dense()
    other.order.append("head")
    assert list(ckpt.others) == ["fc"] and ckpt.order == ["fc"]
    assert other.others["fc"] is ckpt.others["fc"]


def test_out_features_per_kind() -> None:
    assert _dense(8, 3).out_features == 3
    transposed = Layer("conv_transpose", kernel=np.zeros((4, 4, 5, 7)), groups=2)  # (kh, kw, out/g, in)
    assert transposed.out_features == 10
    bn = Layer("batch_norm", norm=Norm("batch_norm", gamma=np.ones(6), moving_mean=np.zeros(6), moving_var=np.ones(6)))
    assert bn.out_features == 6


def test_layers_refuse_inconsistent_contents() -> None:
    with pytest.raises(ConvBNError, match=r"a dense kernel must have 2 dimensions. Received: shape \(1, 1, 2, 2\)"):
        Layer("dense", kernel=np.zeros((1, 1, 2, 2)))
    with pytest.raises(ConvBNError, match="a BatchNorm needs both moving_mean and moving_var"):
        Norm("batch_norm", moving_mean=np.zeros(3))
    with pytest.raises(ConvBNError, match="a layer_norm has no moving statistics"):
        Norm("layer_norm", moving_mean=np.zeros(3), moving_var=np.ones(3))
    with pytest.raises(ConvBNError, match=r"a dense layer with 8 inputs cannot read a flattened 2x2x3 map"):
        _dense(8, 3, flat_in=FeatureMap(2, 2, 3, "chw"))
    with pytest.raises(ConvBNError, match="only a BatchNorm is carried after a conv. Received: layer_norm"):
        Layer("conv", kernel=np.zeros((1, 1, 2, 2)), norm=Norm("layer_norm", gamma=np.ones(2)))
    with pytest.raises(ConvBNError, match="a group_norm needs a positive number of groups. Received: groups=None"):
        Norm("group_norm", gamma=np.ones(4))
    assert _dense(12, 3, flat_in=FeatureMap(2, 2, 3, "chw")).flat_in == FeatureMap(2, 2, 3, "chw")

"""conv_bn(sync=...) and ConvBN2d(sync=...) on torch.distributed: gloo ranks spawned on CPU.

Every multi-rank check compares values with one process on the whole batch: the float64 oracle
(convbn.conformance.reference) for conv_bn, and the same model trained in one process for the
layer under DDP. The scenarios share one spawned pair of ranks (:func:`two_ranks`), since
starting torch in two processes is most of what they cost.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import convbn
from convbn.conformance import distributed, reference
from convbn.errors import ConvBNError
from convbn.params import with_arrays

pytestmark = pytest.mark.needs("torch")

#: Float64 runs differ from the oracle (and one process from several) only in summation order.
TOL64 = 1e-10
#: DDP test: images per rank (uneven) and training steps.
SPLITS = (3, 1)
STEPS = 3


def _params(var_update: str = "unbiased", dtype: Any = np.float64, **kw: Any) -> convbn.ConvBNParams:
    rng = np.random.default_rng(3)
    settings: dict[str, Any] = {"stride": 2, "momentum": 0.9, "var_update": var_update, **kw}
    return convbn.ConvBNParams(
        kernel=rng.standard_normal((3, 3, 3, 4)).astype(dtype) / 5, bias=rng.standard_normal(4).astype(dtype),
        gamma=rng.uniform(0.5, 1.5, 4).astype(dtype), beta=rng.standard_normal(4).astype(dtype),
        moving_mean=rng.standard_normal(4).astype(dtype), moving_var=rng.uniform(0.5, 2, 4).astype(dtype),
        **settings,
    )


def _torch_params(params: convbn.ConvBNParams) -> convbn.ConvBNParams:
    return convbn.to_backend(params, "torch", "cpu")


# -- in one process: what sync refuses, and eval ignoring it ----------------------------------------

def test_sync_without_process_group_is_one_line_error() -> None:
    import torch
    import torch.distributed as dist

    assert not dist.is_initialized()
    x = torch.randn(2, 8, 8, 3, dtype=torch.float64)
    with pytest.raises(ConvBNError, match=r"^sync needs torch.distributed initialized in this process: call "
                       r"torch.distributed.init_process_group\(...\)") as info:
        convbn.conv_bn(x, _torch_params(_params()), training=True, sync=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("sync", ["WORLD", 1, ("replicas",)])
def test_sync_of_another_type_names_it(sync: Any) -> None:
    import torch

    x = torch.randn(2, 8, 8, 3, dtype=torch.float64)
    with pytest.raises(ConvBNError, match=rf"^sync must be True .* Received: sync={re.escape(repr(sync))} of type {type(sync).__name__}$"):
        convbn.conv_bn(x, _torch_params(_params()), training=True, sync=sync)


def test_eval_ignores_sync() -> None:
    import torch

    from convbn.torch import ConvBN2d

    x = torch.randn(2, 8, 8, 3, dtype=torch.float64)
    p = _torch_params(_params())
    expected = reference.forward(x.numpy(), _params(), False).y
    y = convbn.conv_bn(x, p, training=False, sync=True)  # no process group: eval never asks for one
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=TOL64 * np.abs(expected).max())
    layer = ConvBN2d(3, 4, 3, stride=2, dtype=torch.float64, sync=True).eval()
    plain = ConvBN2d(3, 4, 3, stride=2, dtype=torch.float64).eval()
    plain.load_state_dict(layer.state_dict())
    xc = x.permute(0, 3, 1, 2)
    assert torch.equal(layer(xc), plain(xc))


def test_layer_with_sync_refuses_training_without_process_group() -> None:
    import torch

    from convbn.torch import ConvBN2d

    layer = ConvBN2d(3, 4, 3, dtype=torch.float64, sync=True)
    before = layer.bn.running_mean.clone()
    with pytest.raises(ConvBNError, match=r"^sync needs torch.distributed initialized"):
        layer(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert torch.equal(layer.bn.running_mean, before)


def test_convert_sync_sets_every_layer_and_keeps_the_state_dict() -> None:
    from torch import nn

    from convbn.torch import ConvBN2d, convert_sync

    model = nn.Sequential(ConvBN2d(3, 4, 3), nn.ReLU(), nn.Sequential(ConvBN2d(4, 4, 1), nn.BatchNorm2d(4)))
    keys = list(model.state_dict())
    group = object()
    assert convert_sync(model) is model
    assert [m.sync for m in model.modules() if isinstance(m, ConvBN2d)] == [True, True]
    convert_sync(model, group)
    assert [m.sync for m in model.modules() if isinstance(m, ConvBN2d)] == [group, group]
    assert list(model.state_dict()) == keys
    assert isinstance(model[2][1], nn.BatchNorm2d)  # plain BatchNorm is left to SyncBatchNorm


# -- two spawned gloo ranks -------------------------------------------------------------------------

def _scenarios(rank: int, world: int) -> dict[str, Any]:
    """Everything the two-rank tests check, run once on each rank; a scenario that raises returns
    its ``"Type: message"`` instead, so the others still report."""
    out: dict[str, Any] = {}
    for name, fn in (("layouts", _layouts), ("one_value", _one_value), ("all_empty", _all_empty),
                     ("large_mean", _large_mean), ("groups", _own_groups), ("ddp", _ddp),
                     ("launched", _launched)):
        try:
            out[name] = fn(rank, world)
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def _slice(a: np.ndarray, splits: tuple[int, ...], rank: int) -> np.ndarray:
    start = sum(splits[:rank])
    return a[start:start + splits[rank]]


def _step(x: np.ndarray, params: convbn.ConvBNParams, dy: np.ndarray, layout: str, sync: Any) -> dict[str, Any]:
    """One training step of conv_bn on this rank's (NHWC NumPy) slice: y, moving stats, gradients
    of its own sum(y * dy), all NumPy NHWC."""
    import torch

    native = _torch_params(params)
    fields = [f for f in ("kernel", "bias", "gamma", "beta") if getattr(native, f) is not None]
    leaves = {f: getattr(native, f).clone().requires_grad_(True) for f in fields}
    perm, back = ((0, 3, 1, 2), (0, 2, 3, 1)) if layout == "NCHW" else ((0, 1, 2, 3),) * 2
    xt = torch.from_numpy(x).permute(*perm).requires_grad_(True)
    y, new = convbn.conv_bn(xt, with_arrays(native, **leaves), training=True,
                            data_format=layout, sync=sync)
    (y * torch.from_numpy(dy).permute(*perm)).sum().backward()
    grads = {f: leaves[f].grad.numpy() for f in fields}
    grads["x"] = xt.grad.permute(*back).numpy()
    return {"y": y.detach().permute(*back).numpy(), "mean": new.moving_mean.numpy(),
            "var": new.moving_var.numpy(), "grads": grads}


def _layouts(rank: int, world: int) -> dict[str, Any]:
    """Uneven and empty ranks, NHWC and NCHW, both var_update conventions, float64."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 7, 3)) + 0.5
    dy = rng.standard_normal((4, 4, 4, 4))
    out = {}
    for splits in ((2, 2), (3, 1), (4, 0), (0, 4)):
        for layout in ("NHWC", "NCHW"):
            for var_update in ("unbiased", "biased"):
                out[splits, layout, var_update] = _step(
                    _slice(x, splits, rank), _params(var_update), _slice(dy, splits, rank), layout, True
                )
    return out


def _one_value(rank: int, world: int) -> str:
    """One value per channel across the ranks (rank 0 one 1x1 image, rank 1 none): every rank
    refuses alike, after the collectives, so none is left waiting."""
    import torch

    p = _torch_params(_params(padding="VALID", stride=1))
    x = torch.randn(1 - rank, 3, 3, 3, dtype=torch.float64)
    try:
        convbn.conv_bn(x, p, training=True, sync=True)
    except ConvBNError as exc:
        return str(exc)
    return "no error"


def _all_empty(rank: int, world: int) -> dict[str, Any]:
    """Both ranks empty: an empty y of the geometry's shape, the moving statistics kept, and a
    backward that runs (and all-reduces) on both."""
    import torch

    p = _torch_params(_params())
    x = torch.zeros(0, 8, 7, 3, dtype=torch.float64, requires_grad=True)
    y, new = convbn.conv_bn(x, p, training=True, sync=True)
    y.sum().backward()
    return {"shape": tuple(y.shape), "mean": new.moving_mean.numpy(), "var": new.moving_var.numpy(),
            "dx_shape": tuple(x.grad.shape)}


def _large_mean(rank: int, world: int) -> dict[str, Any]:
    """|mean| = 1e3, std = 1 in float32, 3 and 1 images: the combined variance as the oracle's."""
    x, p = _large_mean_inputs()
    return _step(_slice(x, SPLITS, rank), p, np.zeros_like(_slice(x, SPLITS, rank)), "NHWC", True)


def _large_mean_inputs() -> tuple[np.ndarray, convbn.ConvBNParams]:
    """x ~ 1e3 + N(0, 1) in float32 and an identity 1x1 conv, so the conv output is x exactly and
    only the statistics can round: E[x^2] - E[x]^2 would be off by ~1e-1 here."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 8, 8, 3)) + 1e3).astype(np.float32)
    f32 = np.float32
    return x, convbn.ConvBNParams(
        kernel=np.eye(3, dtype=f32).reshape(1, 1, 3, 3), gamma=np.ones(3, f32), beta=np.zeros(3, f32),
        moving_mean=np.zeros(3, f32), moving_var=np.ones(3, f32), momentum=0.9,
    )


def _own_groups(rank: int, world: int) -> dict[str, Any]:
    """sync=ProcessGroup is honoured: each rank in a group of its own gets its own statistics."""
    import torch.distributed as dist

    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 7, 3))
    dy = rng.standard_normal((4, 4, 4, 4))
    return _step(_slice(x, SPLITS, rank), _params(), _slice(dy, SPLITS, rank), "NHWC", groups[rank])


def _model(seed: int = 0) -> Any:
    import torch
    from torch import nn

    from convbn.torch import ConvBN2d

    torch.manual_seed(seed)
    model = nn.Sequential(ConvBN2d(3, 4, 3, stride=2, bias=True), nn.ReLU(),
                          ConvBN2d(4, 5, 3, var_update="biased", data_format="NCHW")).double()
    with torch.no_grad():  # not the initial 0/1, so a wrong moving update shows
        for m in model.modules():
            if isinstance(m, ConvBN2d):
                m.bn.running_mean.uniform_(-1, 1)
                m.bn.running_var.uniform_(0.5, 2)
                m.bn.weight.uniform_(0.5, 1.5)
                m.bn.bias.uniform_(-1, 1)
    return model


def _batches() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [(rng.standard_normal((sum(SPLITS), 3, 8, 7)), rng.standard_normal((sum(SPLITS), 5, 4, 4)))
            for _ in range(STEPS)]


def _train(model: Any, batches: list[tuple[np.ndarray, np.ndarray]], scale: float) -> dict[str, Any]:
    """SGD steps on sum(y * dy) * scale; the outputs of each step and the final state."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ys = []
    for x, dy in batches:
        opt.zero_grad()
        y = model(torch.from_numpy(x))
        ((y * torch.from_numpy(dy)).sum() * scale).backward()
        opt.step()
        ys.append(y.detach().numpy())
    module = getattr(model, "module", model)
    return {"y": ys, "state": {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}}


def _ddp(rank: int, world: int) -> dict[str, Any]:
    """convert_sync + DistributedDataParallel, uneven ranks: DDP averages gradients over ranks,
    so the one-process run it is compared with scales its loss by 1 / world."""
    from torch.nn.parallel import DistributedDataParallel

    from convbn.torch import convert_sync

    model = DistributedDataParallel(convert_sync(_model()))
    mine = [(_slice(x, SPLITS, rank), _slice(dy, SPLITS, rank)) for x, dy in _batches()]
    return _train(model, mine, 1.0)


def _launched(rank: int, world: int) -> list[str]:
    """The conformance driver inside an existing group (as under torchrun): rank 0 gets every
    rank's results, the others none. Returns what did not pass (rank 0), or a marker."""
    from convbn.conformance import _distributed_torch

    results = _distributed_torch.run(world, quick=True)
    if rank != 0:
        return [f"rank {rank} got {len(results)} results"] if results else []
    return _not_passed(results) if results else ["rank 0 got no results"]


def _not_passed(results: list[Any]) -> list[str]:
    """Messages of the results that neither passed nor were skipped for the one reason the
    distributed group skips on torch: float32 gradients of the large-mean case, which no framework
    computes to any digit (the checks say so)."""
    return [r.message() for r in results
            if r.status != "pass" and not (r.status == "skip" and r.case.startswith("dist_large_mean"))]


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    from convbn.conformance._distributed_torch import spawn

    return spawn(2, _scenarios)


def _ok(value: Any) -> Any:
    assert not isinstance(value, str), value
    return value


@pytest.mark.parametrize("splits", [(2, 2), (3, 1), (4, 0), (0, 4)])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("var_update", ["unbiased", "biased"])
def test_two_ranks_match_one_process_on_the_whole_batch(two_ranks, splits, layout, var_update) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 7, 3)) + 0.5
    dy = rng.standard_normal((4, 4, 4, 4))
    params = _params(var_update)
    ref = reference.forward(x, params, True)
    grads = reference.gradients(x, params, dy, True)
    got = [_ok(r["layouts"])[splits, layout, var_update] for r in two_ranks]
    y = np.concatenate([g["y"] for g in got])
    np.testing.assert_allclose(y, ref.y, rtol=0, atol=TOL64 * np.abs(ref.y).max())
    for g in got:  # the same new moving statistics on every rank, and the oracle's
        np.testing.assert_array_equal(g["mean"], got[0]["mean"])
        np.testing.assert_array_equal(g["var"], got[0]["var"])
        np.testing.assert_allclose(g["mean"], ref.moving_mean, rtol=TOL64)
        np.testing.assert_allclose(g["var"], ref.moving_var, rtol=TOL64)
    dx = np.concatenate([g["grads"]["x"] for g in got])  # each rank's slice of the total's gradient
    np.testing.assert_allclose(dx, grads["x"], rtol=0, atol=TOL64 * np.abs(grads["x"]).max())
    for name in ("kernel", "gamma", "beta"):  # summed over ranks: the total's
        total = sum(g["grads"][name] for g in got)
        np.testing.assert_allclose(total, grads[name], rtol=0, atol=TOL64 * np.abs(grads[name]).max())
    bias = sum(g["grads"]["bias"] for g in got)  # exactly 0: batch statistics cancel a conv bias
    assert np.abs(bias).max() <= TOL64 * reference.bias_grad_scale(x, params, dy)


def test_one_value_across_ranks_is_refused_on_every_rank(two_ranks) -> None:
    for rank, message in enumerate(r["one_value"] for r in two_ranks):
        assert message == (
            "training needs more than one value per channel across the replicas of the sync group to "
            "compute batch statistics; together they hold 1 (N * H_out * W_out summed over replicas). "
            f"Received: x.shape=({1 - rank}, 3, 3, 3)"
        )


def test_every_rank_empty_keeps_the_moving_statistics(two_ranks) -> None:
    params = _params()
    for r in two_ranks:
        got = _ok(r["all_empty"])
        assert got["shape"] == (0, 4, 4, 4) and got["dx_shape"] == (0, 8, 7, 3)
        np.testing.assert_array_equal(got["mean"], params.moving_mean)
        np.testing.assert_array_equal(got["var"], params.moving_var)


def test_large_mean_variance_is_combined_within_float32_tolerance(two_ranks) -> None:
    from convbn.conformance.tolerances import tolerance

    x, p = _large_mean_inputs()
    ref = reference.forward(x, p, True)
    for r in two_ranks:
        got = _ok(r["large_mean"])
        err, where = reference.var_error(got["var"], ref.moving_var, ref.moving_var)
        assert err <= tolerance("stats", "float32"), where
        err, where = reference.mean_error(got["mean"], ref.moving_mean, ref.moving_mean, ref.moving_var)
        assert err <= tolerance("stats", "float32"), where


def test_sync_process_group_is_the_group_used(two_ranks) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 7, 3))
    for rank, r in enumerate(two_ranks):
        own = _slice(x, SPLITS, rank)  # a group of one rank: its own batch's statistics
        ref = reference.forward(own, _params(), True)
        got = _ok(r["groups"])
        np.testing.assert_allclose(got["y"], ref.y, rtol=0, atol=TOL64 * np.abs(ref.y).max())
        np.testing.assert_allclose(got["var"], ref.moving_var, rtol=TOL64)


def test_convert_sync_under_ddp_trains_as_one_process(two_ranks) -> None:
    single = _train(_model(), _batches(), 1.0 / len(SPLITS))
    got = [_ok(r["ddp"]) for r in two_ranks]
    for step in range(STEPS):
        y = np.concatenate([g["y"][step] for g in got])
        np.testing.assert_allclose(y, single["y"][step], rtol=0, atol=TOL64 * np.abs(single["y"][step]).max())
    for key, want in single["state"].items():
        for g in got:
            np.testing.assert_allclose(g["state"][key], want, rtol=TOL64, atol=TOL64, err_msg=key)
    assert int(single["state"]["0.bn.num_batches_tracked"]) == STEPS


def test_driver_inside_an_existing_group_gathers_to_rank_zero(two_ranks) -> None:
    assert [r["launched"] for r in two_ranks] == [[], []]


@pytest.mark.slow
def test_driver_spawns_three_ranks_uneven_and_empty() -> None:
    from convbn.conformance import _distributed_torch

    results = _distributed_torch.run(3, quick=True)
    ran = {task.splits for task in distributed.tasks(3, quick=True)}
    assert any(0 in s for s in ran) and any(len(set(s)) > 1 for s in ran), ran  # an empty rank, uneven ones
    assert {r.case for r in results} == {task.label for task in distributed.tasks(3, quick=True)}
    assert all(r.device == "cpu x3" for r in results)
    bad = _not_passed(results)
    assert not bad, bad

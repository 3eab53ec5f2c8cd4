"""convbn.torch.ConvBN2d: against nn.Conv2d + nn.BatchNorm2d, conv_bn and the float64 reference."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import numpy as np
import pytest

import convbn
from tests import reference
from tests._support.assertions import rel_err
from tests.cases import CASES, reference_params, to_layout

# Float64 runs differ from the reference and from torch's own modules only in summation order
# (measured <= 4e-16 relative); 1e-12 still catches every convention error (the biased/unbiased
# split alone is ~1e-2). Float32 eval folds BatchNorm into the weights where nn.Sequential does
# not: SEMANTICS.md measured fused-vs-unfused 3.8e-6 absolute at |y| = 8.4 (4.5e-7 relative), and
# the runs here measure <= 3e-7 relative, so 5e-6 leaves 10x headroom.
TOL64 = 1e-12
TOL32 = 5e-6

# The torch oracle warns that its own padding="same" with an even kernel pads a copy of the input.
pytestmark = [pytest.mark.needs("torch"), pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")]

LAYER_CASES = [c for c in CASES if c.name in (
    "same_s2_even", "same_s2_odd", "same_even_kernel_s2", "explicit_asym", "dilation_stride_same",
    "depthwise", "groups", "slim_style",
)]


def _pair(dtype=None, **kwargs):
    """A ConvBN2d and an nn.Sequential(Conv2d, BatchNorm2d) with the same random weights (None
    where nn.Conv2d cannot express the padding)."""
    import torch
    from torch import nn

    from convbn.torch import ConvBN2d

    torch.manual_seed(0)
    args = dict(in_channels=3, out_channels=6, kernel_size=3, stride=1, padding=1, dilation=1, groups=1,
                bias=True, eps=1e-3, momentum=0.3)
    args.update(kwargs)
    layer = ConvBN2d(**args, dtype=dtype)
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.normal_()
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2.0)
    padding = convbn.adapters.torch_padding(layer.params())
    if padding is None:  # TF's SAME at stride > 1: torch has no equivalent
        return layer, None
    seq = nn.Sequential(
        nn.Conv2d(args["in_channels"], args["out_channels"], args["kernel_size"], args["stride"],
                  padding, args["dilation"], args["groups"], args["bias"], dtype=dtype),
        nn.BatchNorm2d(args["out_channels"], args["eps"], args["momentum"], dtype=dtype),
    )
    seq.load_state_dict(_as_sequential(layer.state_dict()))
    return layer, seq


def _as_sequential(state):
    return {k.replace("conv.", "0.", 1).replace("bn.", "1.", 1): v for k, v in state.items()}


def _x(shape=(4, 3, 9, 9), dtype=None):
    import torch

    rng = np.random.default_rng(1)
    return torch.from_numpy(rng.standard_normal(shape) + 0.5).to(dtype or torch.float32)


@pytest.mark.parametrize("config", [
    dict(),
    dict(padding="SAME", kernel_size=4),  # torch's 'same' at stride 1 equals TF's, extra at the end
    dict(padding=0, stride=2, bias=False),
    dict(groups=3, out_channels=6, dilation=2, padding=2),
], ids=["pad1_bias", "same_even_kernel", "valid_s2", "groups_dilation"])
def test_training_updates_buffers_as_batchnorm2d(config):
    import torch

    layer, seq = _pair(torch.float64, **config)
    x = _x(dtype=torch.float64)
    with torch.no_grad():
        shape = seq.eval()(x).shape
    seq.train()
    dy = torch.from_numpy(np.random.default_rng(2).standard_normal(shape))
    for step in range(3):
        layer.zero_grad()
        seq.zero_grad()
        y, y_ref = layer(x * (step + 1)), seq(x * (step + 1))
        (y * dy).sum().backward()
        (y_ref * dy).sum().backward()
        assert rel_err(y.detach(), y_ref.detach()) < TOL64
        for mine, theirs in (("running_mean", "running_mean"), ("running_var", "running_var")):
            assert rel_err(getattr(layer.bn, mine), getattr(seq[1], theirs)) < TOL64
        assert int(layer.bn.num_batches_tracked) == int(seq[1].num_batches_tracked) == step + 1
        for a, b in ((layer.conv.weight, seq[0].weight), (layer.bn.weight, seq[1].weight), (layer.bn.bias, seq[1].bias)):
            assert rel_err(a.grad, b.grad) < TOL64
    layer.eval()
    seq.eval()
    assert rel_err(layer(x).detach(), seq(x).detach()) < TOL64


def test_float32_eval_and_training_match_the_torch_stack():
    import torch

    layer, seq = _pair()
    x = _x()
    y, y_ref = layer(x), seq(x)
    assert rel_err(y.detach(), y_ref.detach()) < TOL32
    # With torch's convention the layer trains with torch's own batch_norm kernel: bit for bit.
    assert torch.equal(layer.bn.running_var, seq[1].running_var)
    assert torch.equal(layer.bn.running_mean, seq[1].running_mean)
    layer.eval()
    seq.eval()
    assert rel_err(layer(x).detach(), seq(x).detach()) < TOL32


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_matches_reference_and_conv_bn_exactly(case, data_format):
    """TF SAME at stride 2, asymmetric padding, groups, missing gamma: the reference's numbers,
    and bit for bit what conv_bn computes from layer.params()."""
    import torch

    from convbn.torch import ConvBN2d

    x, params = case.params(momentum=0.7)
    expected = reference.conv_bn(x, reference_params(params, case), training=True)
    layer = ConvBN2d.from_params(params, data_format=data_format)
    assert layer.conv.weight.dtype == torch.float64
    xt = torch.from_numpy(to_layout(x, data_format))
    snapshot = layer.params()
    y = layer(xt)
    y_conv_bn, new = convbn.conv_bn(xt, snapshot, True, data_format=data_format)
    assert torch.equal(y, y_conv_bn)
    # The layer trains through the backend's train_in_place, conv_bn's kernel and arguments.
    assert torch.equal(layer.bn.running_mean, new.moving_mean)
    assert torch.equal(layer.bn.running_var, new.moving_var)
    y_ref, mean_ref, var_ref = expected
    assert rel_err(y.detach().numpy(), to_layout(y_ref, data_format)) < TOL64
    assert rel_err(layer.bn.running_mean.numpy(), mean_ref) < TOL64
    assert rel_err(layer.bn.running_var.numpy(), var_ref) < TOL64
    layer.eval()
    trained = layer.params()
    y = layer(xt)
    assert torch.equal(y, convbn.conv_bn(xt, trained, data_format=data_format))
    ref_params = {**reference_params(params, case), "moving_mean": mean_ref, "moving_var": var_ref}
    assert rel_err(y.detach().numpy(), to_layout(reference.conv_bn(x, ref_params), data_format)) < TOL64


def test_biased_var_update_follows_keras_and_flax():
    import torch

    from convbn.torch import ConvBN2d

    case = LAYER_CASES[0]
    x, params = case.params(var_update="biased")
    layer = ConvBN2d.from_params(params)
    assert layer.var_update == "biased"
    layer(torch.from_numpy(to_layout(x, "NCHW")))
    _, _, var_biased = reference.conv_bn(x, reference_params(params, case), training=True)
    _, _, var_unbiased = reference.conv_bn(x, {**reference_params(params, case), "var_update": "unbiased"}, True)
    assert rel_err(layer.bn.running_var.numpy(), var_biased) < TOL64
    assert rel_err(var_biased, var_unbiased) > 1e-3  # the two conventions are told apart


def test_state_dict_uses_torch_names_and_loads_from_a_torch_stack():
    layer, seq = _pair()
    assert list(layer.state_dict()) == [
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked",
    ]
    seq[1].num_batches_tracked.fill_(5)
    x = _x()
    seq(x)  # changes seq's running stats
    layer.load_state_dict({k.replace("0.", "conv.", 1).replace("1.", "bn.", 1): v for k, v in seq.state_dict().items()})
    assert int(layer.bn.num_batches_tracked) == 6
    layer.eval()
    seq.eval()
    assert rel_err(layer(x).detach(), seq(x).detach()) < TOL32


def test_eval_follows_in_place_updates_device_dtype_and_memory_format():
    """The cached fold must never serve stale weights: optimizer steps, load_state_dict, .to()
    and channels_last all change what the next eval call computes."""
    import torch

    layer, seq = _pair()
    layer.eval()
    seq.eval()
    x = _x()
    before = layer(x).detach()
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    (layer(x) ** 2).sum().backward()
    opt.step()
    seq.load_state_dict(_as_sequential(layer.state_dict()))
    with torch.no_grad():
        assert rel_err(layer(x), before) > 1e-2  # the step changed the output...
        assert rel_err(layer(x), seq(x)) < TOL32  # ...and the layer follows it
        seq[1].running_mean.add_(1.0)
        layer.bn.running_mean.add_(1.0)
        assert rel_err(layer(x), seq(x)) < TOL32
    layer.double()
    seq.double()
    with torch.no_grad():
        y64 = layer(x.double())
        assert y64.dtype == torch.float64
        assert rel_err(y64, seq(x.double())) < TOL64
    layer.float().to(memory_format=torch.channels_last)
    seq.float().to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = layer(xc)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(y, seq(xc)) < TOL32


def test_eval_mode_gradients_reach_the_weights():
    """Frozen-BatchNorm fine-tuning: eval mode, gradients on; the fold must stay differentiable."""
    import torch

    layer, seq = _pair(torch.float64)
    layer.eval()
    seq.eval()
    with torch.no_grad():
        layer(_x(dtype=torch.float64))  # a no_grad call first must not poison the grad-mode call
    x = _x(dtype=torch.float64).requires_grad_(True)
    (layer(x) ** 2).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    (seq(x) ** 2).sum().backward()
    assert rel_err(gx, x.grad) < TOL64
    for a, b in ((layer.conv.weight, seq[0].weight), (layer.bn.weight, seq[1].weight), (layer.bn.bias, seq[1].bias)):
        assert rel_err(a.grad, b.grad) < TOL64


def test_alternating_grad_modes_give_the_same_numbers():
    """inference_mode, no_grad and grad-enabled calls share nothing that could leak between them."""
    import torch

    layer, seq = _pair()
    layer.eval()
    seq.eval()
    x = _x()
    with torch.inference_mode():
        y_inference = layer(x)
    with torch.no_grad():
        y_no_grad = layer(x)
    y_grad = layer(x)
    assert y_grad.requires_grad
    layer.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    y_frozen = layer(xg)  # only the input needs gradients: the cached fold serves
    y_frozen.sum().backward()
    xs = x.clone().requires_grad_(True)
    seq(xs).sum().backward()
    assert rel_err(xg.grad, xs.grad) < TOL32
    for y in (y_no_grad, y_grad, y_frozen):
        assert torch.equal(y.detach(), y_inference)
    with torch.no_grad():
        assert torch.equal(layer(x), y_inference)


def test_parametrized_weight_is_followed():
    """torch.nn.utils.parametrize computes conv.weight on access; the layer must use that value."""
    import torch
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2.0 * w

    layer, seq = _pair(torch.float64)
    for conv in (layer.conv, seq[0]):
        parametrize.register_parametrization(conv, "weight", Doubled())
    x = _x(dtype=torch.float64)
    dy = torch.from_numpy(np.random.default_rng(2).standard_normal((4, 6, 9, 9)))
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        seq.train(mode == "train")
        layer.zero_grad()
        seq.zero_grad()
        y, y_ref = layer(x), seq(x)
        assert rel_err(y.detach(), y_ref.detach()) < TOL64
        (y * dy).sum().backward()
        (y_ref * dy).sum().backward()
        original = layer.conv.parametrizations.weight.original
        assert rel_err(original.grad, seq[0].parametrizations.weight.original.grad) < TOL64
    with torch.no_grad():
        assert rel_err(layer(x), seq(x)) < TOL64


def test_params_and_from_params_round_trip_bit_for_bit():
    import torch

    from convbn.torch import ConvBN2d

    layer, _ = _pair(stride=2, padding="SAME")
    layer(_x())  # trained buffers
    params = layer.params()
    assert params.momentum == 0.7 and params.eps == 1e-3 and params.var_update == "unbiased"
    assert params.padding == "SAME" and params.stride == (2, 2)
    np.testing.assert_array_equal(params.kernel, layer.conv.weight.detach().numpy().transpose(2, 3, 1, 0))
    clone = ConvBN2d.from_params(params)
    assert clone.bn.momentum == 0.3  # torch's meaning back, bit for bit
    for key, value in layer.state_dict().items():
        if key != "bn.num_batches_tracked":
            assert torch.equal(value, clone.state_dict()[key]), key
    layer.eval()
    clone.eval()
    x = _x()
    assert torch.equal(layer(x), clone(x))


def test_state_dict_round_trips_through_the_checkpoint_converter(tmp_path):
    """The converter reads ConvBN2d state_dicts (L.conv.*, L.bn.*) as layers and writes torch files
    with the same names, which load straight back into ConvBN2d modules."""
    import torch
    from torch import nn

    from convbn.torch import ConvBN2d

    def model():
        return nn.ModuleDict({"stem": ConvBN2d(3, 8, 3, stride=2, bias=True), "block": ConvBN2d(8, 4, 1)})

    source = model()
    for layer in source.values():
        layer(_x((4, layer.conv.in_channels, 9, 9)))  # moved statistics
        with torch.no_grad():
            layer.bn.weight.uniform_(0.5, 1.5)
    torch.save(source.state_dict(), tmp_path / "source.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "source.pt")
    assert list(ckpt.layers) == ["stem", "block"]
    for name, params in ckpt.layers.items():
        expected = source[name].params()
        for field, value in expected.arrays().items():
            np.testing.assert_array_equal(getattr(params, field), value, err_msg=f"{name}.{field}")
        assert (params.eps, params.momentum) == (expected.eps, expected.momentum)
    convbn.save_checkpoint(ckpt, tmp_path / "converted.pt", "torch")
    target = model()
    target.load_state_dict(torch.load(tmp_path / "converted.pt", weights_only=True))
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, target.state_dict()[key]), key
    target.eval()
    source.eval()
    x = _x((2, 3, 9, 9))
    assert torch.equal(target["stem"](x), source["stem"](x))


def test_deepcopy_is_independent():
    import torch

    layer, _ = _pair()
    layer.eval()
    x = _x()
    before = layer(x)
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.conv.weight.mul_(2.0)
    assert torch.equal(layer(x), before)
    assert not torch.allclose(clone(x), before)


@pytest.mark.parametrize("config, input_size, kind", [
    (dict(padding=1), None, "Conv2d"),
    (dict(padding="SAME", kernel_size=4), None, "Sequential"),
    (dict(padding="SAME", stride=2), (9, 9), "Conv2d"),       # odd input: SAME pads (1, 1)
    (dict(padding="SAME", stride=2), (10, 10), "Sequential"),  # even input: SAME pads (0, 1)
], ids=["symmetric", "same_even_kernel", "same_s2_odd", "same_s2_even"])
def test_fuse_gives_stock_modules_with_the_eval_output(config, input_size, kind):
    import torch

    layer, _ = _pair(**config)
    layer.eval()
    fused = layer.fuse(input_size)
    assert type(fused).__name__ == kind
    assert all(type(m).__module__.startswith("torch.nn") for m in fused.modules())
    x = _x((2, 3, *(input_size or (9, 9))))
    with torch.no_grad():
        assert rel_err(fused(x), layer(x)) < TOL32
    w, b = convbn.fuse(layer.params())
    conv = fused if kind == "Conv2d" else fused[1]
    np.testing.assert_array_equal(conv.weight.detach().numpy(), w.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(conv.bias.detach().numpy(), b)


def test_fuse_needs_input_size_for_strided_same():
    layer, _ = _pair(padding="SAME", stride=2)
    with pytest.raises(convbn.ConvBNError, match=r"input_size=\(H, W\) is needed.*Received: input_size=None, stride=\(2, 2\)"):
        layer.fuse()


@pytest.mark.slow
def test_torch_compile_trains_and_evaluates_like_eager():
    """One small model under torch.compile(fullgraph=True): no graph break, the buffers are updated
    in place as in eager mode, gradients and eval outputs agree."""
    import torch
    from torch import nn

    from convbn.torch import ConvBN2d

    torch.manual_seed(0)
    model = nn.Sequential(ConvBN2d(3, 8, 3, stride=2), nn.ReLU(), ConvBN2d(8, 4, 3, padding=1, var_update="biased"))
    eager = copy.deepcopy(model)
    # Inductor generates C++ on CPU; without a compiler, dynamo and AOTAutograd are still tested.
    backend = "inductor" if shutil.which("c++") or shutil.which("g++") else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = _x((4, 3, 10, 10))
    # A random output gradient: sum(y**2) would make BatchNorm's backward cancel almost exactly.
    dy = torch.from_numpy(np.random.default_rng(3).standard_normal((4, 4, 5, 5)).astype(np.float32))
    for _ in range(2):
        y, y_ref = compiled(x), eager(x)
        (y * dy).sum().backward()
        (y_ref * dy).sum().backward()
        assert rel_err(y.detach(), y_ref.detach()) < TOL32
    for mine, theirs in zip(model.modules(), eager.modules(), strict=True):
        if isinstance(mine, ConvBN2d):
            assert int(mine.bn.num_batches_tracked) == 2
            assert rel_err(mine.bn.running_var, theirs.bn.running_var) < TOL32
            assert rel_err(mine.bn.running_mean, theirs.bn.running_mean) < TOL32
            # Gradients are sums over the batch and spatial positions: 10x the output tolerance.
            assert rel_err(mine.conv.weight.grad, theirs.conv.weight.grad) < 10 * TOL32
    model.eval()
    eager.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), eager(x)) < TOL32


def test_errors_name_the_argument():
    from convbn.torch import ConvBN2d

    with pytest.raises(convbn.ConvBNError, match="ConvBN2d.momentum must be a number.*Received: ConvBN2d.momentum=None"):
        ConvBN2d(3, 4, 3, momentum=None)
    with pytest.raises(convbn.ConvBNError, match="Received: data_format='NWHC'"):
        ConvBN2d(3, 4, 3, data_format="NWHC")
    with pytest.raises(convbn.ConvBNError, match="groups must be a positive int dividing.*Received: groups=2, in_channels=3"):
        ConvBN2d(3, 4, 3, groups=2)
    with pytest.raises(convbn.ConvBNError, match="Received: padding='FULL'"):
        ConvBN2d(3, 4, 3, padding="FULL")
    with pytest.raises(convbn.ConvBNError, match="Received: var_update='N-1'"):
        ConvBN2d(3, 4, 3, var_update="N-1")
    layer = ConvBN2d(3, 4, 3)
    layer.bn.momentum = None
    with pytest.raises(convbn.ConvBNError, match="bn.momentum must be a number"):
        layer(_x())
    layer.bn.momentum = 0.1
    with pytest.raises(convbn.ConvBNError, match="x has 5 channels but the kernel expects 3"):
        layer(_x((2, 5, 8, 8)))
    with pytest.raises(convbn.ConvBNError, match="more than one value per channel"):
        layer(_x((1, 3, 1, 1)))


def test_changed_eps_and_momentum_take_effect():
    import torch

    layer, seq = _pair(torch.float64)
    for module in (layer.bn, seq[1]):
        module.eps = 0.5
        module.momentum = 0.05
    x = _x(dtype=torch.float64)
    assert rel_err(layer(x).detach(), seq(x).detach()) < TOL64
    assert rel_err(layer.bn.running_var, seq[1].running_var) < TOL64
    layer.eval()
    seq.eval()
    assert rel_err(layer(x).detach(), seq(x).detach()) < TOL64


def test_params_momentum_is_the_kept_fraction():
    layer, _ = _pair(momentum=0.1)
    p = layer.params()
    assert p.momentum == 0.9
    assert dataclasses.replace(p, momentum=0.9).momentum == convbn.conventions.TORCH.momentum

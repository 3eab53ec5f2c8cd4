"""ConvBNSpec: the static part of a Conv2D + BatchNorm, validated without arrays, with the pads
resolved in one place; ConvBNParams as a spec plus arrays."""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle

import numpy as np
import pytest

import convbn
from convbn import ConvBNError, ConvBNParams, ConvBNSpec, geometry
from convbn.params import with_arrays


def _tf_same(n: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TF's SAME split, written from its documented formula (not convbn's code)."""
    total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
    return (total // 2, total - total // 2)


def _params(spec_kw: dict, kh: int = 3, kw: int = 3, cin: int = 4, cout: int = 8) -> ConvBNParams:
    rng = np.random.default_rng(0)
    return ConvBNParams(
        kernel=rng.standard_normal((kh, kw, cin // spec_kw.get("groups", 1), cout)).astype(np.float32),
        moving_mean=np.zeros(cout, np.float32), moving_var=np.ones(cout, np.float32), **spec_kw,
    )


# -- validation without arrays ------------------------------------------------------------------

BAD = [
    (dict(stride=0), "stride must be >= 1. Received: stride=0"),
    (dict(stride=(1, 2, 3)), "stride must be an int or a pair of ints. Received: stride=(1, 2, 3)"),
    (dict(dilation="2"), "dilation must be an int or a pair of ints. Received: dilation='2'"),
    (dict(kernel_size=(3, 0)), "kernel_size must be >= 1. Received: kernel_size=(3, 0)"),
    (dict(kernel_size=True), "kernel_size must be an int or a pair of ints. Received: kernel_size=True"),
    (dict(padding="full"), "padding must be 'SAME', 'VALID', a non-negative int, a pair (ph, pw) or "
                           "((top, bottom), (left, right)). Received: padding='full'"),
    (dict(padding=-1), "padding must be 'SAME', 'VALID', a non-negative int, a pair (ph, pw) or "
                       "((top, bottom), (left, right)). Received: padding=-1"),
    (dict(groups=0), "groups must be a positive int. Received: groups=0"),
    (dict(groups=2.0), "groups must be a positive int. Received: groups=2.0"),
    (dict(in_channels=-1), "in_channels must be an int >= 0. Received: in_channels=-1"),
    (dict(groups=2, in_channels=3, out_channels=6),
     "groups must be a positive int dividing in_channels and out_channels. Received: groups=2, in_channels=3, "
     "out_channels=6"),
    (dict(groups=4, out_channels=6),
     "groups must be a positive int dividing out_channels. Received: groups=4, out_channels=6"),
    (dict(eps=-1e-3), "eps must be a finite number >= 0. Received: eps=-0.001"),
    (dict(eps=float("nan")), "eps must be a finite number >= 0. Received: eps=nan"),
    (dict(momentum=1.5), "momentum is the fraction of the old moving value kept and must be in [0, 1] (torch's "
                         "momentum=0.1 is 0.9 here; see convbn.conventions). Received: momentum=1.5"),
    (dict(var_update="n-1"), "var_update must be 'unbiased' or 'biased'. Received: var_update='n-1'"),
]


@pytest.mark.parametrize(("settings", "message"), BAD, ids=[m.split(" ")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_spec_refuses_bad_settings_without_arrays(settings, message):
    with pytest.raises(ConvBNError) as info:
        ConvBNSpec(**settings)
    assert str(info.value) == message


def test_params_report_the_same_errors_as_the_spec():
    """The params' settings are validated by the spec: the same message, arrays or not."""
    for settings, message in BAD:
        if set(settings) & {"kernel_size", "in_channels", "out_channels"}:
            continue  # these come from the kernel's shape in params
        with pytest.raises(ConvBNError) as info:
            ConvBNParams(kernel=np.ones((3, 3, 4, 8)), moving_mean=np.zeros(8), moving_var=np.ones(8), **settings)
        assert str(info.value) == message


def test_named_spec_errors_use_the_layer_arguments():
    names = {"stride": "strides", "out_channels": "filters", "eps": "epsilon"}
    with pytest.raises(ConvBNError) as info:
        ConvBNSpec.named(names, stride=(2, 0))
    assert str(info.value) == "strides must be >= 1. Received: strides=(2, 0)"
    with pytest.raises(ConvBNError) as info:
        ConvBNSpec.named(names, out_channels=6, groups=4)
    assert str(info.value) == "groups must be a positive int dividing filters. Received: groups=4, filters=6"
    with pytest.raises(ConvBNError) as info:
        ConvBNSpec.named(names, eps=-1.0)
    assert str(info.value) == "epsilon must be a finite number >= 0. Received: epsilon=-1.0"
    assert ConvBNSpec.named(names, stride=2, eps=1e-5) == ConvBNSpec(stride=2, eps=1e-5)
    with pytest.raises(TypeError, match=r"ConvBNSpec has no field \['strides'\]"):
        ConvBNSpec.named(names, strides=2)


def test_replace_revalidates():
    spec = ConvBNSpec(kernel_size=3, in_channels=4, out_channels=8)
    assert dataclasses.replace(spec, stride=2).stride == (2, 2)
    with pytest.raises(ConvBNError, match=r"^groups must be a positive int dividing in_channels and out_channels\. "
                                          r"Received: groups=3, in_channels=4, out_channels=8$"):
        dataclasses.replace(spec, groups=3)


# -- hashing, equality, pickling ----------------------------------------------------------------


def test_equal_settings_give_equal_hashable_specs():
    a = ConvBNSpec(kernel_size=3, in_channels=4, out_channels=8, stride=2, padding=1, dilation=1, eps=1e-5)
    b = ConvBNSpec(kernel_size=(3, 3), in_channels=np.int64(4), out_channels=8, stride=(2, 2),
                   padding=((1, 1), (1, 1)), dilation=(1, 1), eps=1e-5)
    assert a == b and hash(a) == hash(b)
    assert len({a, b, ConvBNSpec(kernel_size=3, in_channels=4, out_channels=8, stride=2, padding=1, eps=1e-5)}) == 1
    different = [dataclasses.replace(a, **change) for change in (
        dict(stride=1), dict(padding="SAME"), dict(padding=(1, 2)), dict(eps=1e-3), dict(momentum=0.9),
        dict(var_update="biased"), dict(groups=2), dict(kernel_size=5), dict(out_channels=16),
    )]
    assert all(d != a for d in different)
    assert len({a, *different}) == len(different) + 1
    assert ConvBNSpec(padding="same") == ConvBNSpec(padding="SAME")
    assert a.padding == ((1, 1), (1, 1)) and isinstance(a.in_channels, int) and type(b.in_channels) is int


def test_spec_pickles_and_stays_frozen():
    spec = ConvBNSpec(kernel_size=(3, 5), in_channels=6, out_channels=9, groups=3, padding=((0, 1), (2, 2)))
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and hash(back) == hash(spec) and back.settings() == spec.settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.stride = (2, 2)  # type: ignore[misc]


def test_params_hold_the_spec():
    p = _params(dict(stride=2, padding=1, eps=1e-5, momentum=0.9, var_update="biased"), kh=3, kw=5, cin=4, cout=8)
    assert p.spec == ConvBNSpec(kernel_size=(3, 5), in_channels=4, out_channels=8, stride=2, padding=1,
                                eps=1e-5, momentum=0.9, var_update="biased")
    assert (p.stride, p.padding, p.dilation, p.groups, p.eps, p.momentum, p.var_update) == (
        (2, 2), ((1, 1), (1, 1)), (1, 1), 1, 1e-5, 0.9, "biased")
    assert (p.kernel_size, p.in_channels, p.out_channels) == ((3, 5), 4, 8)
    q = dataclasses.replace(p, stride=1, padding="VALID")
    assert q.spec == dataclasses.replace(p.spec, stride=1, padding="VALID") and q.kernel is p.kernel
    r = dataclasses.replace(p, kernel=np.ones((1, 1, 2, 8), np.float32), groups=2)
    assert r.spec == dataclasses.replace(p.spec, kernel_size=1, groups=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.stride = 1  # type: ignore[misc]


def test_params_pickle_round_trip_and_old_pickles_load():
    p = _params(dict(stride=2, padding=((0, 1), (1, 0)), groups=2, eps=1e-4))
    back = pickle.loads(pickle.dumps(p))
    assert back.spec == p.spec
    assert all(np.array_equal(getattr(back, n), getattr(p, n)) for n in p.arrays())
    # Params pickled before the spec existed held the settings as attributes.
    old = {name: getattr(p, name) for name in ("kernel", "moving_mean", "moving_var", "bias", "gamma", "beta")}
    old.update(stride=(2, 2), padding=((0, 1), (1, 0)), dilation=(1, 1), groups=2, eps=1e-4, momentum=0.99,
               var_update="unbiased")
    restored = ConvBNParams.__new__(ConvBNParams)
    restored.__setstate__(old)
    assert restored.spec == p.spec and restored.kernel is p.kernel


def test_from_spec_fills_the_kernel_fields_and_checks_shapes():
    spec = ConvBNSpec(stride=2, groups=2, eps=1e-5, var_update="biased")
    kernel = np.ones((3, 3, 2, 6), np.float32)
    p = ConvBNParams.from_spec(spec, kernel, np.zeros(6), np.ones(6))
    assert p.spec == dataclasses.replace(spec, kernel_size=3, in_channels=4, out_channels=6)
    full = ConvBNSpec(kernel_size=3, in_channels=4, out_channels=6, groups=2)
    with pytest.raises(ConvBNError) as info:
        ConvBNParams.from_spec(full, np.ones((3, 3, 4, 6), np.float32), np.zeros(6), np.ones(6))
    assert str(info.value) == (
        f"kernel.shape must be (3, 3, 2, 6) (kh, kw, in_channels // groups, out_channels) to match params.spec. "
        f"Received: kernel.shape=(3, 3, 4, 6), spec={full}"
    )
    with pytest.raises(ConvBNError, match=r"^moving_var must have shape \(out_channels,\) = \(6,\)"):
        ConvBNParams.from_spec(full, kernel, np.zeros(6), np.ones(5))


def test_planning_checks_arrays_against_the_spec():
    """Params assembled without the constructor (pytree transforms, internal updates) are
    checked against their spec when planned: a swapped kernel is refused, not silently used."""
    p = _params({})
    swapped = with_arrays(p, kernel=np.ones((5, 5, 4, 8), np.float32))
    with pytest.raises(ConvBNError, match=r"^kernel\.shape must be \(3, 3, 4, 8\)"):
        convbn.conv_bn(np.ones((1, 8, 8, 4), np.float32), swapped, backend="numpy")


# -- pads in one place --------------------------------------------------------------------------

SWEEP = list(itertools.product(range(1, 11), range(1, 5), range(1, 4), range(1, 3)))


def test_same_pads_match_tf_formula_over_a_sweep():
    for n, k, s, d in SWEEP:
        spec = ConvBNSpec(kernel_size=(k, 2), stride=(s, 1), dilation=(d, 1))
        assert spec.pads(n, 7) == (_tf_same(n, k, s, d), _tf_same(7, 2, 1, 1)), (n, k, s, d)


def test_stride1_same_pads_do_not_depend_on_the_size():
    for k, d in itertools.product(range(1, 6), range(1, 4)):
        spec = ConvBNSpec(kernel_size=k, dilation=d)
        total = (k - 1) * d
        assert spec.pads() == ((total // 2, total - total // 2),) * 2
        assert all(spec.pads(n, n + 1) == spec.pads() for n in range(1, 12))
    assert ConvBNSpec(kernel_size=3, stride=(1, 2)).pads() is None  # W is strided
    assert ConvBNSpec(kernel_size=3, stride=(1, 2)).pads(None, 8) == ((1, 1), (0, 1))


def test_valid_and_explicit_pads_ignore_the_size():
    assert ConvBNSpec(padding="VALID", stride=2).pads() == ((0, 0), (0, 0))
    assert ConvBNSpec(padding=((0, 2), (1, 3)), stride=3).pads(5, 9) == ((0, 2), (1, 3))
    assert ConvBNSpec(padding=(1, 2)).pads() == ((1, 1), (2, 2))
    with pytest.raises(ConvBNError) as info:
        ConvBNSpec(padding="SAME").pads(8, 8)
    assert str(info.value) == "SAME padding needs the kernel size to resolve its pads. Received: kernel_size=None"


def test_plans_take_their_pads_from_the_spec():
    """The plan each backend gets: pads, output size and symmetry, against the TF formula."""
    for n, k, s, d in SWEEP:
        if (k - 1) * d + 1 > n + sum(_tf_same(n, k, s, d)):
            continue
        p = _params(dict(stride=s, dilation=d), kh=k, kw=k)
        plan = geometry.plan_for((2, n, n + 1, 4), p, "NHWC", False)
        pads = (_tf_same(n, k, s, d), _tf_same(n + 1, k, s, d))
        assert plan.pads == pads, (n, k, s, d)
        assert plan.out_hw == (math.ceil(n / s), math.ceil((n + 1) / s))
        assert plan.symmetric == all(a == b for a, b in pads)
    p = _params(dict(padding=((0, 1), (2, 2))))
    plan = geometry.plan_for((1, 4, 6, 6), p, "NCHW", True)
    assert (plan.pads, plan.symmetric, plan.out_hw) == (((0, 1), (2, 2)), False, (5, 8))


def test_plan_for_spec_matches_plan_for_params():
    p = _params(dict(stride=2, dilation=2), kh=3, kw=2)
    for shape in ((1, 9, 10, 4), (3, 16, 5, 4), (None, None, 7, 4)):
        assert geometry.plan_for_spec(shape, p.spec, "NHWC", False) == geometry.plan_for(shape, p, "NHWC", False)
    with pytest.raises(ConvBNError) as info:
        geometry.plan_for_spec((1, 8, 8, 4), ConvBNSpec(kernel_size=3), "NHWC", False)
    assert str(info.value) == ("the kernel size and channel counts must be known to plan a call. "
                               "Received: kernel_size=(3, 3), in_channels=None, out_channels=None")


@pytest.mark.needs("jax")
def test_same_pads_match_lax_over_a_sweep():
    from jax import lax

    for n, k, s, d in SWEEP:
        expected = lax.padtype_to_pads((n, n + 3), ((k - 1) * d + 1,) * 2, (s, s), "SAME")
        assert ConvBNSpec(kernel_size=k, stride=s, dilation=d).pads(n, n + 3) == tuple(map(tuple, expected))


# -- the JAX pytree -----------------------------------------------------------------------------


@pytest.mark.needs("jax")
def test_pytree_static_part_is_the_spec():
    import jax

    p = _params(dict(stride=2, padding="VALID", groups=2, eps=1e-4, var_update="biased"))
    leaves, treedef = jax.tree_util.tree_flatten(p)
    assert len(leaves) == 3  # kernel, moving mean, moving var; the None slots are empty subtrees
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.spec == p.spec and back.kernel is p.kernel and back.moving_var is p.moving_var
    assert back.bias is None and back.gamma is None
    doubled = jax.tree_util.tree_map(lambda a: a * 2, p)
    assert doubled.spec is p.spec and np.array_equal(doubled.kernel, p.kernel * 2)
    # Equal settings give equal tree structures (one jit cache entry); other settings do not.
    same = _params(dict(stride=(2, 2), padding="valid", groups=2, eps=1e-4, var_update="biased"))
    assert jax.tree_util.tree_structure(same) == treedef
    assert jax.tree_util.tree_structure(dataclasses.replace(p, eps=1e-3)) != treedef
    keys = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(p)[0]]
    assert keys == [".kernel", ".moving_mean", ".moving_var"]


# -- layers validate through the spec, before any weight exists ---------------------------------


@pytest.mark.needs("torch")
def test_torch_layer_errors_name_its_arguments():
    from convbn.torch import ConvBN2d

    for kwargs, message in (
        (dict(groups=3), "groups must be a positive int dividing in_channels and out_channels. "
                         "Received: groups=3, in_channels=4, out_channels=8"),
        (dict(dilation=0), "dilation must be >= 1. Received: dilation=0"),
        (dict(padding="full"), "padding must be 'SAME', 'VALID', a non-negative int, a pair (ph, pw) or "
                               "((top, bottom), (left, right)). Received: padding='full'"),
        (dict(data_format="NWHC"), "data_format must be 'NCHW' or 'NHWC'. Received: data_format='NWHC'"),
    ):
        with pytest.raises(ConvBNError) as info:
            ConvBN2d(4, 8, 3, **kwargs)
        assert str(info.value) == message


@pytest.mark.needs("keras")
def test_keras_layer_errors_name_its_arguments_and_shapes_come_before_build():
    from convbn.keras import ConvBN

    for kwargs, message in (
        (dict(strides=0), "strides must be >= 1. Received: strides=0"),
        (dict(dilation_rate=(1, 0)), "dilation_rate must be >= 1. Received: dilation_rate=(1, 0)"),
        (dict(epsilon=-1.0), "epsilon must be a finite number >= 0. Received: epsilon=-1.0"),
        (dict(groups=3), "groups must be a positive int dividing filters. Received: groups=3, filters=8"),
    ):
        with pytest.raises(ConvBNError) as info:
            ConvBN(8, 3, **kwargs)
        assert str(info.value) == message
    # Unbuilt, the output shape comes from the spec and the input's channels (the placeholder
    # params it came from before assumed one input channel per group and refused 4).
    layer = ConvBN(8, 3, strides=2, padding="same")
    assert layer.compute_output_shape((None, 16, 15, 4)) == (None, 8, 8, 8)
    layer.build((None, 16, 15, 4))
    y = layer(np.ones((1, 16, 15, 4), np.float32))
    assert tuple(y.shape) == (1, 8, 8, 8) == layer.compute_output_shape((1, 16, 15, 4))


@pytest.mark.needs("flax")
def test_flax_layer_errors_name_its_arguments():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from convbn.flax import ConvBN as LinenConvBN
    from convbn.flax.nnx import ConvBN

    for kwargs, message in (
        (dict(strides=0), "strides must be >= 1. Received: strides=0"),
        (dict(feature_group_count=3), "feature_group_count must be a positive int dividing in_features and "
                                      "out_features. Received: feature_group_count=3, in_features=4, out_features=8"),
        (dict(kernel_dilation="2"), "kernel_dilation must be an int or a pair of ints. Received: kernel_dilation='2'"),
    ):
        with pytest.raises(ConvBNError) as info:
            ConvBN(4, 8, 3, rngs=nnx.Rngs(0), **kwargs)
        assert str(info.value) == message
    with pytest.raises(ConvBNError) as info:
        LinenConvBN(8, 3, feature_group_count=3, use_running_average=True).init(jax.random.key(0), jnp.ones((1, 6, 6, 4)))
    assert str(info.value) == ("feature_group_count must be a positive int dividing x's channels and features. "
                               "Received: feature_group_count=3, x's channels=4, features=8")


@pytest.mark.needs("torch")
def test_stride1_same_pads_compute_torch_same():
    """At stride 1 torch's own padding='same' exists: a conv over the input padded by the spec's
    pads gives exactly its numbers (the extra row/column of an even kernel after, as TF)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    for n, k, d in itertools.product((5, 8), range(1, 5), range(1, 3)):
        x = torch.randn(1, 2, n, n + 1, generator=gen, dtype=torch.float64)
        w = torch.randn(3, 2, k, k, generator=gen, dtype=torch.float64)
        (top, bottom), (left, right) = ConvBNSpec(kernel_size=k, dilation=d).pads()  # type: ignore[misc]
        ours = F.conv2d(F.pad(x, (left, right, top, bottom)), w, dilation=d)
        assert torch.equal(ours, F.conv2d(x, w, padding="same", dilation=d)), (n, k, d)

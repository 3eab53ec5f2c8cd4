"""Property-based cases (hypothesis) over shapes and geometry, on top of the fixed matrix.

Each example draws a valid geometry (size, kernel, stride, dilation, padding spec, groups,
depthwise multiplier, which of bias/gamma/beta exist) and compares values: every backend against
the float64 reference, and the reference against the independent loop reference. The number of
examples is bounded (the ``ci`` profile in conftest) so the suite stays within its time budget.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from convbn.conformance import reference as oracle
from convbn.conformance.cases import Case, Task
from convbn.conformance.runner import Oracle, run_task
from convbn.conformance.tolerances import tolerance
from convbn.geometry import same_pads
from tests import reference
from tests.cases import reference_params
from tests.test_conformance import assert_passes

_pads = st.integers(0, 2)
_padding = st.one_of(
    st.just("SAME"),
    st.just("VALID"),
    _pads,
    st.tuples(_pads, _pads),
    st.tuples(st.tuples(_pads, _pads), st.tuples(_pads, _pads)),
)


def _dim_padding(padding, axis: int):
    """One spatial dim's padding: 'SAME', 'VALID', an int, or (before, after)."""
    return padding if isinstance(padding, (str, int)) else padding[axis]


def _reaches_input(n: int, k: int, s: int, d: int, padding, out: int) -> bool:
    """Whether some output position's window touches a real (not padded) input along one dim."""
    if padding == "SAME":
        before = same_pads(n, k, s, d)[0]
    else:
        before = 0 if padding == "VALID" else padding if isinstance(padding, int) else padding[0]
    return any(0 <= o * s - before + j * d < n for o in range(out) for j in range(k))


def _out_size(n: int, k: int, s: int, d: int, padding) -> int:
    """Output length for one dim; 0 where the padded input is smaller than the dilated kernel."""
    if padding == "SAME":
        return math.ceil(n / s)
    before, after = (0, 0) if padding == "VALID" else (padding, padding) if isinstance(padding, int) else padding
    k_eff = (k - 1) * d + 1
    return (n + before + after - k_eff) // s + 1 if n + before + after >= k_eff else 0


@st.composite
def geometries(draw) -> Case:
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    per_group = draw(st.integers(1, 2))
    in_channels = groups * per_group
    out_channels = groups * draw(st.integers(1, 3))  # groups == in_channels: depthwise, multiplier 1..3
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    padding = draw(_padding)
    ho = _out_size(h, kh, sh, dh, _dim_padding(padding, 0))
    wo = _out_size(w, kw, sw, dw, _dim_padding(padding, 1))
    assume(ho >= 1 and wo >= 1 and n * ho * wo >= 2)  # training needs two values per channel
    # Every output in the padding would make each channel constant: a zero batch variance, whose
    # normalized output is rounding noise amplified by 1/sqrt(eps), not a meaningful comparison.
    assume(_reaches_input(h, kh, sh, dh, _dim_padding(padding, 0), ho))
    assume(_reaches_input(w, kw, sw, dw, _dim_padding(padding, 1), wo))
    return Case(
        "hypothesis", (n, h, w, in_channels), (kh, kw), out_channels, stride=(sh, sw),
        padding=padding, dilation=(dh, dw), groups=groups, bias=draw(st.booleans()),
        gamma=draw(st.booleans()), beta=draw(st.booleans()),
    )


@pytest.mark.matrix
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=geometries(), layout=st.sampled_from(["NHWC", "NCHW"]),
       dtype=st.sampled_from(["float64", "float32"]))
def test_backend_matches_reference_on_any_geometry(backend, case, layout, dtype):
    if backend == "numpy" and dtype == "float64":
        dtype = "float32"  # float64 numpy is the reference; the next test checks it
    task = Task("forward", case, dtype, ("eval", "train_unbiased"), (layout,))
    results = run_task(backend, "cpu", task, Oracle())
    assert_passes(results)


@settings(max_examples=60)
@given(case=geometries(), training=st.booleans())
def test_reference_matches_loop_reference_on_any_geometry(case, training):
    x, params = case.params()
    got = oracle.forward(x, params, training)
    expected = reference.conv_bn(x, reference_params(params, case), training)
    y = expected[0] if training else expected
    err, where = oracle.output_error(got.y, y, y, -1, got.floor)
    assert err <= tolerance("train" if training else "eval", "float64"), where
    if training:
        assert oracle.var_error(got.moving_var, expected[2], expected[2])[0] <= tolerance("stats", "float64")


def test_strategy_reaches_every_padding_kind():
    """The geometry strategy is not stuck on one corner of the space."""
    from hypothesis import Phase, find

    for predicate in (
        lambda c: c.padding == "SAME" and c.stride != (1, 1),
        lambda c: isinstance(c.padding, tuple) and isinstance(c.padding[0], tuple),
        lambda c: c.groups > 1 and c.groups == c.x_shape[3] and c.out_channels > c.groups,
        lambda c: c.dilation != (1, 1) and c.stride != (1, 1),
    ):
        case = find(geometries(), predicate,
                    settings=settings(max_examples=2000, database=None, phases=[Phase.generate]))
        assert predicate(case)


pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")

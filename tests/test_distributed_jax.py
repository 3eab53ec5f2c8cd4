"""conv_bn(sync=axis_name) on JAX: shard_map/pmap replicas against one device on the whole batch.

Several devices on a CPU need ``--xla_force_host_platform_device_count``, read when JAX starts, so
those tests run in fresh processes with it set (this process keeps its one device); the refusals
need no second device and run here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _jax():
    need("jax")


def _child(code: str, devices: int) -> str:
    """Run ``code`` in a fresh interpreter with ``devices`` host CPU devices and x64 on; its stdout."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    prelude = "import jax\njax.config.update('jax_enable_x64', True)\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_conformance_group_passes(world):
    """The conformance driver (which reruns itself with ``world`` devices): every even split passes
    its checks, and the uneven ones, which shard_map cannot hold, are skipped saying so."""
    from convbn.conformance import _distributed_jax
    from convbn.conformance.distributed import tasks

    results = _distributed_jax.run(world, quick=True)
    failed = [r.message() for r in results if r.status not in ("pass", "skip")]
    assert not failed, failed
    uneven = {t.label for t in tasks(world, quick=True) if t.uneven}
    assert {r.case for r in results if "same number of images" in r.detail and r.status == "skip"} == uneven
    passed = {r.case for r in results if r.status == "pass"}
    assert passed == {t.label for t in tasks(world, quick=True) if not t.uneven}
    assert {r.device for r in results} == {f"cpu x{world}"}


_COMMON = """
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import convbn
    from convbn.conformance import reference

    def case(dt, loc=0.0, scale=1.0, n=4, bias=True, seed=0):
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal((n, 9, 8, 3)) * scale + loc).astype(dt)
        p = convbn.ConvBNParams(
            kernel=rng.standard_normal((3, 3, 3, 5)).astype(dt), bias=rng.standard_normal(5).astype(dt) if bias else None,
            gamma=rng.uniform(0.5, 2, 5).astype(dt), beta=rng.standard_normal(5).astype(dt),
            moving_mean=rng.standard_normal(5).astype(dt), moving_var=rng.uniform(0.5, 2, 5).astype(dt),
            stride=2, momentum=0.9, var_update="unbiased")
        dy = rng.standard_normal(reference.forward(x, p, False).y.shape).astype(dt)
        return x, p, dy

    from tests._support.assertions import rel_err

    def rel(a, b):
        return rel_err(a, b, floor=1e-300)

    def synced(mesh, axes, spec, layout="NHWC"):
        # Each device's y, new moving statistics and gradients of its own loss, params replicated:
        # JAX then returns the parameter gradients already summed over devices.
        def replica(x, dy, p):
            def loss(x, p):
                y, new = convbn.conv_bn(x, p, training=True, data_format=layout, sync=axes)
                return jnp.sum(y * dy), (y, new.moving_mean[None], new.moving_var[None])
            (gx, gp), (y, m, v) = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, p)
            return y, m, v, gx, gp
        return jax.jit(jax.shard_map(replica, mesh=mesh, in_specs=(spec, spec, P()),
                                     out_specs=(spec, spec, spec, spec, P())))
"""


def test_shard_map_with_axis_tuple_pmap_and_empty_batch():
    """sync over a tuple of mesh axes (float64, NCHW, with a conv bias) and under pmap (float32)
    equals the float64 oracle on the whole batch; a batch empty on every device returns an empty
    y and keeps the moving statistics (no 0/0)."""
    out = _child(_COMMON + """
    mesh = Mesh(np.array(jax.devices()).reshape(2, 1), ("a", "b"))
    x, p, dy = case(np.float64)
    ref, g = reference.forward(x, p, True), reference.gradients(x, p, dy, True)
    t = lambda a: a.transpose(0, 3, 1, 2)
    y, m, v, gx, gp = synced(mesh, ("a", "b"), P(("a", "b")), "NCHW")(t(x), t(dy), jax.tree.map(jnp.asarray, p))
    errs = [rel(np.asarray(y).transpose(0, 2, 3, 1), ref.y), rel(np.asarray(gx).transpose(0, 2, 3, 1), g["x"])]
    errs += [rel(m[i], ref.moving_mean) for i in range(2)] + [rel(v[i], ref.moving_var) for i in range(2)]
    errs += [rel(getattr(gp, k), g[k]) for k in ("kernel", "gamma", "beta")]
    assert max(errs) < 1e-12, errs
    # The conv bias cancels in training: its exact gradient is 0, its computed one rounding.
    assert np.max(np.abs(gp.bias)) < 1e-12 * np.max(np.abs(g["kernel"])), gp.bias

    x32, p32, dy32 = case(np.float32, bias=False, seed=1)
    ref = reference.forward(x32, p32, True)
    step = jax.pmap(lambda x: convbn.conv_bn(x, p32, training=True, sync="i"), axis_name="i")
    y, new = step(x32.reshape(2, 2, *x32.shape[1:]))
    assert rel(np.asarray(y).reshape(ref.y.shape), ref.y) < 1e-5
    assert max(rel(new.moving_mean[i], ref.moving_mean) for i in range(2)) < 1e-6
    assert max(rel(new.moving_var[i], ref.moving_var) for i in range(2)) < 1e-6

    flat = Mesh(np.array(jax.devices()), ("data",))
    empty = jax.jit(jax.shard_map(lambda x: convbn.conv_bn(x, p, training=True, sync="data"), mesh=flat,
                                  in_specs=P("data"), out_specs=(P("data"), P())))
    y, new = empty(x[:0])
    assert y.shape == (0, 5, 4, 5), y.shape
    assert np.array_equal(new.moving_mean, p.moving_mean) and np.array_equal(new.moving_var, p.moving_var)
    print("ok")
    """, devices=2)
    assert out.strip().endswith("ok")


def test_large_mean_combined_variance_is_within_float32_tolerance():
    """|mean| = 1e3, std = 1 in float32 on 2 devices, 512 values per channel on each: the combined
    variance is within the float32 tolerance of the float64 oracle, where E[x^2] - E[x]^2 of the
    same float32 values is not (so the comparison tells them apart). Regression: combining the
    devices' float32 means as they come was 1.7e-6 to 3.7e-6 off here (half an ulp of 1e3 in
    each local mean), over the 1e-6 tolerance."""
    out = _child(_COMMON + """
    from convbn.conformance.tolerances import tolerance
    tol = tolerance("stats", "float32")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    p = convbn.ConvBNParams(kernel=np.eye(2, dtype=np.float32)[None, None], moving_mean=np.zeros(2, np.float32),
                            moving_var=np.ones(2, np.float32), momentum=0.0, var_update="biased", padding="VALID")
    step = jax.jit(jax.shard_map(lambda x, p: convbn.conv_bn(x, p, training=True, sync="data")[1].moving_var[None],
                                 mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data")))
    errs = []
    for seed, sign in ((0, 1), (1, -1), (4, 1)):
        x = (np.random.default_rng(seed).standard_normal((4, 16, 16, 2)) + sign * 1e3).astype(np.float32)
        ref = reference.forward(x, p, True)
        var = np.asarray(step(x, p))
        errs.append(max(reference.var_error(var[i], ref.moving_var, ref.moving_var)[0] for i in range(2)))
        x32 = jnp.asarray(x)
        naive = jnp.mean(x32 * x32, axis=(0, 1, 2)) - jnp.mean(x32, axis=(0, 1, 2)) ** 2
        assert reference.var_error(np.asarray(naive), ref.moving_var, ref.moving_var)[0] > 10 * tol
    assert max(errs) <= tol, errs
    print("ok", errs)
    """, devices=2)
    assert out.strip().startswith("ok")


def test_jit_on_a_sharded_batch_has_global_statistics_without_sync():
    """The recommended JAX path: plain jax.jit on a batch sharded over 2 devices, no sync. The
    compiled program all-reduces (XLA's partitioner inserted the collectives), and y, the moving
    statistics and every gradient equal the single-device run on the whole batch."""
    out = _child(_COMMON + """
    x, p, dy = case(np.float64)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    jp = jax.tree.map(jnp.asarray, p)

    def step(x, dy, p):
        def loss(x, p):
            y, new = convbn.conv_bn(x, p, training=True)
            return jnp.sum(y * dy), (y, new.moving_mean, new.moving_var)
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, p)

    f = jax.jit(step)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    dys = jax.device_put(dy, NamedSharding(mesh, P("data")))
    assert len(xs.sharding.device_set) == 2
    assert "all-reduce" in f.lower(xs, dys, jp).compile().as_text()
    (gx, gp), (y, m, v) = f(xs, dys, jp)
    (gx1, gp1), (y1, m1, v1) = f(jnp.asarray(x), jnp.asarray(dy), jp)
    ref = reference.forward(x, p, True)
    errs = [rel(y, y1), rel(m, m1), rel(v, v1), rel(gx, gx1), rel(y, ref.y), rel(v, ref.moving_var)]
    errs += [rel(getattr(gp, k), getattr(gp1, k)) for k in ("kernel", "gamma", "beta")]
    assert max(errs) < 1e-12, errs
    print("ok")
    """, devices=2)
    assert out.strip() == "ok"


@pytest.mark.slow
def test_flax_layers_with_axis_name_under_shard_map():
    """linen ConvBN(axis_name=) matches nn.Conv + nn.BatchNorm(axis_name=) under shard_map (float32)
    and, trained 3 SGD steps under shard_map, ends with the params and moving statistics of a
    single-device run on the whole batch (float64); nnx ConvBN(axis_name=) updates bn.mean/bn.var
    to the whole batch's statistics."""
    need("flax")
    out = _child(_COMMON + """
    from flax import linen as nn, nnx
    from convbn.flax import ConvBN
    from convbn.flax.nnx import ConvBN as NnxConvBN
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)

    class Native(nn.Module):
        @nn.compact
        def __call__(self, x):
            z = nn.Conv(5, (3, 3), strides=2, use_bias=False, name="conv")(x)
            return nn.BatchNorm(use_running_average=False, momentum=0.9, axis_name="data", name="bn")(z)

    x32 = (rng.standard_normal((4, 9, 8, 3)) + 0.5).astype(np.float32)
    ours = ConvBN(5, 3, strides=2, momentum=0.9, use_running_average=False, axis_name="data")
    variables = ours.init(jax.random.key(0), jnp.asarray(x32[:1]))  # init needs no bound axis
    variables = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32), variables)
    def both(x, v):
        a, sa = ours.apply(v, x, mutable=["batch_stats"])
        b, sb = Native().apply(v, x, mutable=["batch_stats"])
        return a, b, sa, sb
    a, b, sa, sb = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=(P("data"), P()),
                                         out_specs=(P("data"), P("data"), P(), P())))(x32, variables)
    assert rel(a, b) < 5e-6, rel(a, b)
    assert max(rel(sa["batch_stats"]["bn"][k], sb["batch_stats"]["bn"][k]) for k in ("mean", "var")) < 5e-6

    x, p, dy = case(np.float64, bias=False)
    model, v0 = ConvBN.from_params(p, use_running_average=False, axis_name="data")
    single = ConvBN.from_params(p, use_running_average=False)[0]
    def train(module, v, x, dy):
        for _ in range(3):
            def loss(params):
                y, upd = module.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
                return jnp.sum(y * dy), upd
            g, upd = jax.grad(loss, has_aux=True)(v["params"])
            v = {"params": jax.tree.map(lambda w, d: w - 1e-3 * d, v["params"], g), **upd}
        return v
    got = jax.jit(jax.shard_map(lambda x, dy, v: train(model, v, x, dy), mesh=mesh,
                                in_specs=(P("data"), P("data"), P()), out_specs=P()))(x, dy, v0)
    want = jax.jit(lambda x, dy, v: train(single, v, x, dy))(x, dy, v0)
    diffs = jax.tree.leaves(jax.tree.map(rel, got, want))
    assert max(diffs) < 1e-10, diffs
    assert rel(got["batch_stats"]["bn"]["var"], v0["batch_stats"]["bn"]["var"]) > 1e-3  # it trained

    layer = NnxConvBN(3, 5, 3, strides=2, momentum=0.9, var_update="unbiased", axis_name="data",
                      param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    def apply(x, state):
        m = nnx.merge(graphdef, state)
        y = m(x)
        return y, nnx.state(m)
    y, new = jax.jit(jax.shard_map(apply, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P("data"), P())))(x, state)
    ref, trained = reference.forward(x, layer.params(), True), nnx.merge(graphdef, new).params()
    assert rel(y, ref.y) < 1e-12
    # nnx.BatchNorm keeps its statistics in float32 whatever the param dtype.
    assert rel(trained.moving_mean, ref.moving_mean) < 1e-6 and rel(trained.moving_var, ref.moving_var) < 1e-6
    print("ok")
    """, devices=2)
    assert out.strip() == "ok"


# -- refusals: one device is enough -----------------------------------------------------------


def _params():
    import convbn

    rng = np.random.default_rng(0)
    return convbn.ConvBNParams(kernel=rng.standard_normal((3, 3, 2, 4)), moving_mean=np.zeros(4),
                               moving_var=np.ones(4))


@pytest.mark.parametrize("sync", [True, 3, (), ["data"], ("data", 1)])
def test_sync_that_is_not_axis_names_is_refused(sync):
    import jax.numpy as jnp

    import convbn

    with pytest.raises(convbn.ConvBNError, match=r"axis name .*Received: sync="):
        convbn.conv_bn(jnp.ones((2, 5, 5, 2)), _params(), training=True, sync=sync)


def test_unbound_axis_is_refused_naming_it_eagerly_under_jit_and_in_shard_map():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import convbn

    x, params = jnp.ones((2, 5, 5, 2)), _params()
    with pytest.raises(convbn.ConvBNError, match=r"needs the axis 'data' bound by an enclosing shard_map"):
        convbn.conv_bn(x, params, training=True, sync="data")
    with pytest.raises(convbn.ConvBNError, match=r"axis 'data'.*plain jax.jit"):
        jax.jit(lambda x: convbn.conv_bn(x, params, training=True, sync="data"))(x)
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    step = jax.shard_map(lambda x: convbn.conv_bn(x, params, training=True, sync=("batch", "data"))[0],
                         mesh=mesh, in_specs=P("batch"), out_specs=P("batch"))
    with pytest.raises(convbn.ConvBNError, match=r"sync=\('batch', 'data'\) needs the axis 'data'"):
        jax.jit(step)(x)


def test_eval_ignores_sync_and_one_device_sync_equals_no_sync():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import convbn

    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 5, 2)))
    params = _params()
    np.testing.assert_array_equal(convbn.conv_bn(x, params, sync="nowhere"), convbn.conv_bn(x, params))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    y, new = jax.jit(jax.shard_map(lambda x: convbn.conv_bn(x, params, training=True, sync="data"), mesh=mesh,
                                   in_specs=P("data"), out_specs=(P("data"), P())))(x)
    y1, new1 = convbn.conv_bn(x, params, training=True)
    np.testing.assert_allclose(y, y1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(new.moving_var, new1.moving_var, rtol=1e-12)
    np.testing.assert_allclose(new.moving_mean, new1.moving_mean, rtol=0, atol=1e-12)


def test_flax_axis_name_outside_shard_map_is_refused_in_training_only():
    need("flax")
    import jax
    import jax.numpy as jnp

    import convbn
    from convbn.flax import ConvBN

    model = ConvBN(4, 3, axis_name="data")
    x = jnp.ones((2, 6, 6, 2))
    variables = model.init(jax.random.key(0), x, use_running_average=False)
    model.apply(variables, x, use_running_average=True)
    with pytest.raises(convbn.ConvBNError, match="axis 'data'"):
        model.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


def test_one_value_across_devices_is_refused():
    """shard_map splits evenly, so one value per channel in total is one device holding one; the
    count is known at trace time, so it is refused then (it was a NaN moving variance)."""
    out = _child(
        """
        import jax, jax.numpy as jnp, numpy as np, convbn
        from jax.sharding import Mesh, PartitionSpec as P
        from convbn.errors import ConvBNError
        mesh = Mesh(jax.devices()[:1], ("d",))
        p = convbn.ConvBNParams(kernel=np.ones((1, 1, 2, 2), np.float32), moving_mean=np.zeros(2, np.float32),
                                moving_var=np.ones(2, np.float32))
        f = jax.shard_map(lambda x: convbn.conv_bn(x, p, training=True, sync="d")[0], mesh=mesh,
                          in_specs=P("d"), out_specs=P("d"))
        try:
            f(jnp.ones((1, 1, 1, 2)))
        except ConvBNError as e:
            print("refused:", e)
        """,
        1,
    )
    assert "refused: training needs more than one value per channel across the replicas" in out, out


def test_the_interpreters_tests_start_share_the_persistent_compilation_cache():
    """tests/conftest.py hands the JAX compilation cache to child processes through the environment:
    a multi-device child compiles into, and loads from, the same directory as this process."""
    import jax

    out = _child("print(jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)", 2)
    directory, seconds = out.split()
    assert directory == jax.config.jax_compilation_cache_dir == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert float(seconds) == jax.config.jax_persistent_cache_min_compile_time_secs

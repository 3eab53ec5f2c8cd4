"""``conv_bn(sync=True)`` and ``ConvBN(synchronized=True)`` under ``tf.distribute``, on both TF CPU paths.

The replicas are logical CPU devices under ``MirroredStrategy``, which TF only makes before it first
uses its devices, so each check runs in a fresh process; ``TF_ENABLE_ONEDNN_OPTS`` is read when TF
loads, so both CPU paths get their own (see tests/test_tf_onednn.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.needs("tensorflow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONEDNN = pytest.mark.parametrize("onednn", ["0", "1"])


def _run(args: list[str], onednn: str = "0", **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="2", **env)
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, full.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], env=full, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def _script(body: str, world: int) -> str:
    """``body`` after making ``world`` logical CPUs and a MirroredStrategy ``strategy`` over them."""
    head = f"""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * {world})
        strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    """
    return textwrap.dedent(head) + textwrap.dedent(body)


@pytest.mark.slow
@ONEDNN
def test_distributed_conformance_on_three_replicas(onednn):
    # Quick: even shards (2+2+2) and uneven ones with an empty replica (5+0+1), traced strategy.run.
    proc = _run(["-m", "convbn.conformance._distributed_tensorflow", "--world", "3", "--quick"], onednn)
    results = json.loads(proc.stdout)
    assert results and {r["backend"] for r in results} == {"tensorflow"}, proc.stderr[-3000:]
    assert {r["device"] for r in results} == {"cpu x3"}
    assert {"5+0+1", "2+2+2"} <= {r["case"].rsplit(",", 1)[1].rstrip("]") for r in results}
    failed = [r for r in results if r["status"] == "fail"]
    assert failed == [] and any(r["status"] == "pass" for r in results), failed
    # The check skips only what no framework computes in float32 (the large-mean kernel gradient).
    skipped = {r["case"] for r in results if r["status"] == "skip"}
    assert all(case.startswith("dist_large_mean") for case in skipped), skipped


_TRAINING = """
    import keras, convbn
    from convbn.conformance import reference
    from convbn.errors import ConvBNError
    from convbn.keras import ConvBN

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 8, 8, 3)) + 3).astype("float32")
    dy = rng.standard_normal((5, 4, 4, 6)).astype("float32")
    split = [3, 2]

    def per_replica(a):
        cut = np.split(a, [split[0]])
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(cut[ctx.replica_id_in_sync_group]))

    # conv_bn(sync=True) eagerly (strategy.run without tf.function), uneven shards, NCHW.
    params = convbn.ConvBNParams(
        kernel=rng.standard_normal((3, 3, 3, 6)).astype("float32"), bias=rng.standard_normal(6).astype("float32"),
        gamma=rng.uniform(0.5, 2, 6).astype("float32"), beta=rng.standard_normal(6).astype("float32"),
        moving_mean=rng.standard_normal(6).astype("float32"), moving_var=rng.uniform(0.5, 2, 6).astype("float32"),
        stride=2, eps=1e-5, momentum=0.9)
    want = reference.forward(x, params, True)
    def eager(x):
        y, new = convbn.conv_bn(x, params, True, data_format="NCHW", sync=True)
        return tf.transpose(y, (0, 2, 3, 1)), new.moving_mean, new.moving_var
    y, mean, var = (strategy.experimental_local_results(v) for v in
                    strategy.run(eager, args=(per_replica(x.transpose(0, 3, 1, 2)),)))
    y = np.concatenate([a.numpy() for a in y])
    assert np.abs(y - want.y).max() < 1e-4 * np.abs(want.y).max(), np.abs(y - want.y).max()
    for m, v in zip(mean, var):
        assert np.abs(m.numpy() - want.moving_mean).max() < 1e-5 * np.abs(want.moving_mean).max()
        assert np.abs(v.numpy() - want.moving_var).max() < 1e-5 * want.moving_var.max()

    # Refusals: a sync that is not True, and a call in the strategy's cross-replica context.
    for sync, ctx in ((1, strategy.scope()), ("replicas", strategy.scope()), (True, strategy.scope())):
        with ctx:
            try:
                convbn.conv_bn(tf.constant(x), params, True, sync=sync)
            except ConvBNError as e:
                assert ("cross-replica" in str(e)) == (sync is True) and "\\n" not in str(e), e
            else:
                raise AssertionError(f"sync={sync!r} in cross-replica context was accepted")
    # No strategy: one replica, whose statistics are the batch's.
    y1, new1 = convbn.conv_bn(tf.constant(x), params, True, sync=True)
    y0, new0 = convbn.conv_bn(tf.constant(x), params, True)
    assert np.array_equal(y1.numpy(), y0.numpy()) and np.array_equal(new1.moving_var, new0.moving_var)
    # Eval ignores sync, in cross-replica context too.
    with strategy.scope():
        assert np.array_equal(convbn.conv_bn(tf.constant(x), params, sync=True).numpy(),
                              convbn.conv_bn(tf.constant(x), params).numpy())

    # ConvBN(synchronized=True) trains for 3 steps under MirroredStrategy (traced step, uneven
    # shards, SGD summing the replicas' gradients) as one process does on the whole batch, and as
    # Keras's Conv2D + BatchNormalization(synchronized=True) does under the same strategy.
    def ours(synchronized):
        return ConvBN(6, 3, strides=2, use_bias=True, momentum=0.9, synchronized=synchronized)

    def keras_layers():
        return keras.Sequential([keras.layers.Conv2D(6, 3, strides=2, padding="same"),
                                 keras.layers.BatchNormalization(momentum=0.9, synchronized=True)])

    def train(strategy, make, split):
        with strategy.scope():
            layer = make()
            layer.build((None, 8, 8, 3))
            init = np.random.default_rng(1)
            for w in layer.weights:  # kernel, bias, gamma, beta, moving mean and variance in both
                w.assign(init.uniform(0.5, 1.5, w.shape).astype("float32"))
            opt = keras.optimizers.SGD(0.01)
            opt.build(layer.trainable_variables)
        def step(x, dy):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, training=True) * dy)
            opt.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables))
        run = tf.function(lambda x, dy: strategy.run(step, args=(x, dy)))
        xs, dys = (per_replica(x), per_replica(dy)) if split else (tf.constant(x), tf.constant(dy))
        for _ in range(3):
            run(xs, dys)
        return [[np.asarray(v) for v in strategy.experimental_local_results(w.value)] for w in layer.weights]

    one = train(tf.distribute.get_strategy(), lambda: ours(True), False)
    synced = train(strategy, lambda: ours(True), True)
    native = train(strategy, keras_layers, True)
    local = train(strategy, lambda: ours(False), True)
    for i, values in enumerate(synced):
        assert len(values) == 2 and np.array_equal(values[0], values[1]), i
        scale = np.abs(one[i][0]).max()
        assert np.abs(values[0] - one[i][0]).max() < 1e-5 * scale, (i, np.abs(values[0] - one[i][0]).max())
        # Keras's E[x^2] - E[x]^2 loses a few more digits than (count, mean, M2).
        assert np.abs(values[0] - native[i][0]).max() < 1e-4 * scale, (i, np.abs(values[0] - native[i][0]).max())
    # Without synchronized, each replica's statistics are its own: the same check fails.
    assert np.abs(local[4][0] - one[4][0]).max() > 1e-2 * np.abs(one[4][0]).max()
    config = ConvBN(6, 3, synchronized=True).get_config()
    assert config["synchronized"] is True and ConvBN.from_config(config).synchronized is True
    print("ok")
"""


@ONEDNN
def test_sync_eager_layer_training_and_refusals_under_mirrored_strategy(onednn):
    proc = _run(["-c", _script(_TRAINING, 2)], onednn)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.needs("jax", "keras")
def test_synchronized_layer_is_refused_off_tensorflow_as_keras_refuses():
    script = textwrap.dedent("""
        import keras
        from convbn.errors import ConvBNError
        from convbn.keras import ConvBN
        try:
            keras.layers.BatchNormalization(synchronized=True)
        except ValueError as e:
            print("keras:", e)
        try:
            ConvBN(4, 3, synchronized=True)
        except ConvBNError as e:
            print("convbn:", e)
        ConvBN(4, 3, synchronized=False)
    """)
    proc = _run(["-c", script], KERAS_BACKEND="jax")
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and [line.split(":")[0] for line in lines] == ["keras", "convbn"], proc.stderr[-3000:]
    assert "TensorFlow backend" in lines[1] and "'jax'" in lines[1], lines


_LARGE_MEAN = """
    import convbn
    from convbn.conformance import reference
    from convbn.conformance.tolerances import tolerance
    rng = np.random.default_rng(0)
    c = 5
    x = (rng.standard_normal((700, 4, 4, c)) + 1e3).astype(np.float32)  # |mean| = 1e3, std = 1
    sizes = [400, 250, 50]
    starts = np.cumsum([0, *sizes])
    p = convbn.ConvBNParams(kernel=np.eye(c, dtype=np.float32).reshape(1, 1, c, c), padding="VALID",
                            moving_mean=np.zeros(c, np.float32), moving_var=np.ones(c, np.float32),
                            momentum=0.9, eps=1e-5)
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[starts[ctx.replica_id_in_sync_group]:starts[ctx.replica_id_in_sync_group + 1]]))

    @tf.function
    def step(xr):
        return convbn.conv_bn(xr, p, training=True, sync=True)[1].moving_var

    got = [v.numpy() for v in strategy.experimental_local_results(strategy.run(step, args=(xs,)))]
    ref = reference.forward(x.astype(np.float64), p, True).moving_var
    errors = [reference.var_error(v, ref, ref)[0] for v in got]
    assert max(errors) <= tolerance("stats", "float32"), errors
    print("ok", max(errors))
"""


def test_large_mean_combined_variance_is_within_float32_tolerance():
    # Measured 7.4e-8 (tolerance 1e-6); local float32 means combined without a common shift: 3.5e-6.
    proc = _run(["-c", _script(_LARGE_MEAN, 3)])
    assert proc.returncode == 0 and proc.stdout.strip().startswith("ok"), proc.stderr[-3000:]


_ONE_VALUE = """
    import convbn
    from convbn.errors import ConvBNError
    p = convbn.ConvBNParams(kernel=np.ones((1, 1, 2, 2), np.float32), moving_mean=np.zeros(2, np.float32),
                            moving_var=np.ones(2, np.float32))
    shards = [np.ones((1, 1, 1, 2), np.float32), np.ones((0, 1, 1, 2), np.float32)]  # 1 + 0 values
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group]))
    step = lambda xr: convbn.conv_bn(xr, p, training=True, sync=True)[1].moving_var
    try:
        strategy.run(step, args=(xs,))
    except ConvBNError as e:
        print("eager refused:", e)
    try:
        strategy.run(tf.function(step), args=(xs,))
    except tf.errors.InvalidArgumentError as e:
        print("graph refused:", "more than one value per channel across the replicas" in e.message)
"""


def test_one_value_across_replicas_is_refused_not_a_nan_moving_variance():
    proc = _run(["-c", _script(_ONE_VALUE, 2)])
    out = proc.stdout
    assert "eager refused: training needs more than one value per channel across the replicas" in out, proc.stderr[-3000:]
    assert "graph refused: True" in out, proc.stderr[-3000:]

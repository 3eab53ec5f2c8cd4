"""A synchronized training step on TensorFlow: ``ConvBN(synchronized=True)`` against Keras's
``Conv2D`` + ``BatchNormalization(synchronized=True)``, under ``MirroredStrategy``.

Both are the same Keras model shape with the same weights, stepped by one traced ``strategy.run``
(forward, loss, gradients of every trainable weight, moving statistics assigned) on each
replica's half of the batch. The unsynchronized ConvBN on the same step is timed too: the ratio
to it is the cost of the collectives. Timed interleaved (``benchmarks.common.interleaved``), the
median of per-pair ratios with its quartiles. Before timing, the outputs of one step are compared
(y, moving statistics, gradients), so the contenders compute the same thing.

Keras computes the synchronized variance as E[x^2] - E[x]^2 with three all-reduces; convbn sends
(count, mean, M2) in two. On CPU the replicas are logical devices that share the cores, which TF
must configure before it uses them, so this is a script of its own:

    python benchmarks/sync_tensorflow.py [--replicas 2] [--samples 15] [--min-time 0.3] [--clock wall]

The clock is this process's CPU time by default, which the other processes on a shared machine
barely move (``--clock wall`` for wall time).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: (name, global batch, height = width, in channels, out channels, kernel, stride): NHWC, SAME.
SHAPES = (
    ("small3x3", 8, 16, 16, 32, 3, 1),
    ("resnet3x3", 8, 56, 64, 64, 3, 1),
    ("down3x3s2", 8, 56, 64, 128, 3, 2),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--min-time", type=float, default=0.3)
    parser.add_argument("--clock", choices=("process", "wall"), default="process")
    args = parser.parse_args(argv)

    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    import keras

    from benchmarks.common import interleaved, rel_err
    from convbn.keras import ConvBN

    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, MirroredStrategy over {args.replicas} "
          f"logical CPUs, {args.clock} time; ratios are median per-pair time ratios (IQR)")

    def wait(out: Any) -> Any:  # a step is done when the first replica's y is on the host
        return strategy.experimental_local_results(out[0])[0].numpy()

    for name, n, hw, cin, cout, k, stride in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, hw, hw, cin)).astype(np.float32)
        dy = rng.standard_normal((n, -(-hw // stride), -(-hw // stride), cout)).astype(np.float32)
        kernel = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
        with strategy.scope():
            layers = {
                "convbn sync": ConvBN(cout, k, strides=stride, synchronized=True),
                "convbn local": ConvBN(cout, k, strides=stride),
                "keras sync": keras.Sequential([
                    keras.layers.Conv2D(cout, k, strides=stride, padding="same", use_bias=False),
                    keras.layers.BatchNormalization(synchronized=True),
                ]),
            }
            for layer in layers.values():
                layer.build((None, hw, hw, cin))
                layer.weights[0].assign(kernel)
        xs, dys = (strategy.experimental_distribute_values_from_function(
            lambda ctx, a=a: tf.constant(np.array_split(a, args.replicas)[ctx.replica_id_in_sync_group]))
            for a in (x, dy))
        steps = {label: _step(strategy, layer, xs, dys) for label, layer in layers.items()}
        out = {label: _outputs(strategy, step(), layers[label]) for label, step in steps.items()}
        diffs = ", ".join(f"{key} {rel_err(a, b):.1e}" for key, a, b in zip(
            ("y", "dkernel", "moving_mean", "moving_var"), out["convbn sync"], out["keras sync"], strict=True))
        print(f"{name} ({n}x{hw}x{hw}x{cin} -> {cout}, {k}x{k}, stride {stride}): convbn vs Keras {diffs}")
        for a, b in (("convbn sync", "keras sync"), ("convbn sync", "convbn local")):
            t = interleaved(steps[a], steps[b], wait, samples=args.samples, min_time=args.min_time,
                            clock=time.process_time if args.clock == "process" else time.perf_counter)
            print(f"  {a} / {b}: {t.ratio:.3f} ({t.ratio_q1:.3f}-{t.ratio_q3:.3f}); "
                  f"{t.convbn_s * 1e3:.2f} ms vs {t.native_s * 1e3:.2f} ms per step")


def _step(strategy: Any, model: Any, xs: Any, dys: Any) -> Callable[[], Any]:
    """One traced training step of ``model`` on the distributed batch: y and the kernel gradient."""
    import tensorflow as tf

    def replica(x: Any, dy: Any) -> Any:
        with tf.GradientTape() as tape:
            y = model(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return y, tape.gradient(loss, model.trainable_variables)[0]

    traced = tf.function(lambda: strategy.run(replica, args=(xs, dys)))
    return traced  # type: ignore[no-any-return]


def _outputs(strategy: Any, out: Any, model: Any) -> list[np.ndarray]:
    """The first replica's y and kernel gradient, then the moving statistics after the step."""
    stats = [v.value for v in model.non_trainable_variables]
    return [np.asarray(strategy.experimental_local_results(o)[0]) for o in (*out, *stats)]


if __name__ == "__main__":
    main()

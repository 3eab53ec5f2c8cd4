"""What a ``tf.function`` traced with an unknown batch size costs against one traced with a static
batch: the same conv_bn call, both traces timed interleaved, the median ratio and its IQR over 21
rounds.

With a ``None`` batch the TensorFlow backend guards the call with a ``tf.cond`` on the batch size
(a batch that is empty at run time must not reach TF's oneDNN conv, which gets its shape wrong);
this is where that guard shows. Run: ``python benchmarks/tf_unknown_batch.py``.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

import convbn

SHAPES = (((8, 16, 16, 16), 32), ((32, 56, 56, 64), 64))


def _traced(params: convbn.ConvBNParams, training: bool, batch: int | None, hwc: tuple[int, ...]) -> Callable[[Any], Any]:
    def call(t: Any) -> Any:
        return convbn.conv_bn(t, params, True)[0] if training else convbn.conv_bn(t, params)

    return tf.function(call, input_signature=[tf.TensorSpec([batch, *hwc], tf.float32)])


def main() -> None:
    rng = np.random.default_rng(0)
    for shape, cout in SHAPES:
        params = convbn.to_backend(convbn.ConvBNParams(
            kernel=rng.standard_normal((3, 3, shape[3], cout)).astype(np.float32),
            moving_mean=np.zeros(cout, np.float32), moving_var=np.ones(cout, np.float32)), "tensorflow")
        x = tf.constant(rng.standard_normal(shape).astype(np.float32))
        number = 50 if shape[0] == 8 else 3
        for training in (False, True):
            unknown = _traced(params, training, None, shape[1:])
            static = _traced(params, training, shape[0], shape[1:])
            unknown(x), static(x)
            ratios, base = [], 0.0
            for _ in range(21):
                a = timeit.timeit(lambda f=unknown, t=x: f(t), number=number)
                base = timeit.timeit(lambda f=static, t=x: f(t), number=number)
                ratios.append(a / base)
            q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
            print(f"{shape} -> {cout}, training={training}: unknown/static batch {q50:.3f} "
                  f"(IQR {q25:.3f}-{q75:.3f}), static {base / number * 1e6:.0f} us")


if __name__ == "__main__":
    main()

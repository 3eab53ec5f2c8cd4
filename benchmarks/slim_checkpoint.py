"""Time and peak memory of writing and reading a ResNet-50-sized slim checkpoint.

53 conv+BatchNorm layers with tf-slim's resnet_v1_50 names and shapes (23.5M conv parameters,
float32, synthetic values). TensorFlow is imported before timing starts, so its import is excluded.
Peak RSS is read from /proc (Linux): the peak is reset before each phase, and the report gives the
growth over the RSS at the phase's start, and that growth relative to the checkpoint's data size.

    python benchmarks/slim_checkpoint.py [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convbn.convert import Checkpoint
from convbn.formats import slim
from convbn.params import ConvBNParams

# (units, bottleneck depth, output depth) of resnet_v1_50's four blocks.
BLOCKS = [(3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048)]


def resnet50_layers() -> list[tuple[str, tuple[int, int, int, int]]]:
    """(slim scope, HWIO kernel shape) of every conv in resnet_v1_50."""
    layers = [("resnet_v1_50/conv1", (7, 7, 3, 64))]
    channels = 64
    for b, (units, depth, out) in enumerate(BLOCKS, start=1):
        for u in range(1, units + 1):
            scope = f"resnet_v1_50/block{b}/unit_{u}/bottleneck_v1"
            if u == 1:
                layers.append((f"{scope}/shortcut", (1, 1, channels, out)))
            layers += [
                (f"{scope}/conv1", (1, 1, channels, depth)),
                (f"{scope}/conv2", (3, 3, depth, depth)),
                (f"{scope}/conv3", (1, 1, depth, out)),
            ]
            channels = out
    return layers


def synthetic_checkpoint(seed: int = 0) -> Checkpoint:
    rng = np.random.default_rng(seed)
    ckpt = Checkpoint()
    for scope, shape in resnet50_layers():
        out = shape[3]
        ckpt.layers[scope] = ConvBNParams(
            kernel=rng.standard_normal(shape, dtype=np.float32),
            gamma=rng.uniform(0.5, 1.5, out).astype(np.float32),
            beta=rng.standard_normal(out, dtype=np.float32),
            moving_mean=rng.standard_normal(out, dtype=np.float32),
            moving_var=rng.uniform(0.5, 2.0, out).astype(np.float32),
            eps=1e-5, momentum=0.997,
        )
    return ckpt


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size in MiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _ = line.split()
                values[key] = int(amount) / 1024
    return values["VmRSS:"], values["VmHWM:"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    import tensorflow as tf  # noqa: F401  (imported before timing)

    ckpt = synthetic_checkpoint()
    conv_params = sum(p.kernel.size for p in ckpt.layers.values())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        prefix = Path(tmp) / "resnet_v1_50.ckpt"
        # First calls: TF sets up its eager context and op kernels once per process.
        start = time.perf_counter()
        slim.write(ckpt, prefix)
        first_write = time.perf_counter() - start
        start = time.perf_counter()
        slim.read(prefix)
        first_read = time.perf_counter() - start
        size_mb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
        print(f"{len(ckpt.layers)} conv+BN layers, {conv_params / 1e6:.2f}M conv params, "
              f"checkpoint {size_mb:.1f} MiB")
        print(f"first call in the process: write {first_write:.3f} s, read {first_read:.3f} s")
        for phase in ("write", "read"):
            times, growth = [], []
            for _ in range(args.repeat):
                gc.collect()
                _reset_peak()
                start_rss, _ = _rss_mb()
                start = time.perf_counter()
                if phase == "write":
                    slim.write(ckpt, prefix)
                else:
                    result = slim.read(prefix)
                times.append(time.perf_counter() - start)
                growth.append(_rss_mb()[1] - start_rss)
                if phase == "read":
                    del result
            print(f"{phase}: {min(times):.3f} s best of {args.repeat} (median {np.median(times):.3f} s); "
                  f"peak RSS growth {max(growth):.0f} MiB = {max(growth) / size_mb:.2f}x the checkpoint "
                  f"(process RSS {_rss_mb()[0]:.0f} MiB, TF included)")


if __name__ == "__main__":
    main()

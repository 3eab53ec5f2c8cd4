"""Time and peak memory of checkpoint conversion on a ResNet-50-sized checkpoint.

A whole ResNet-50: 53 conv+BatchNorm pairs with ResNet-50's shapes (23.5M conv parameters) and the
2048 -> 1000 classifier ``fc`` (2.05M parameters), float32, about 102 MB; ``--pairs-only`` leaves
``fc`` out (the figure before other layers converted).
Each sample of a route runs in a fresh process, measured as ``benchmarks/checkpoint_memory.py``
measures its routes (:func:`benchmarks.checkpoint_memory.measure`): the frameworks the two formats
need are imported first (timed as ``import``), then the peak-RSS counter is reset (Linux
``/proc/self/clear_refs``) and ``load_checkpoint`` + ``save_checkpoint`` are timed (``convert``,
wall and CPU seconds). Reported: the fastest of ``--samples`` conversions and their median, the
peak RSS during the conversion, and that peak minus the RSS before it (the memory the conversion
itself needed), each also as a multiple of the checkpoint's size.

``--against-pairs`` also converts the pairs-only checkpoint, its samples interleaved with the
whole model's so that both see the same machine, and prints whole / pairs-only of the fastest
wall and CPU times. The whole model holds 8.7% more bytes, so about 1.09 is what the data alone
costs. A single sample's wall time swings with the page cache and the other process on a shared
machine; the fastest of several, and CPU time, are the steadier figures.

    python benchmarks/checkpoint_conversion.py [--routes torch:safetensors ...] [--samples 5] [--against-pairs]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.checkpoint_memory import measure  # noqa: E402

SUFFIX = {"torch": "pt", "safetensors": "safetensors", "flax": "msgpack", "keras": "weights.h5", "slim": "ckpt"}
#: What each format's reader and writer import; TF checkpoints are read and written without
#: TensorFlow, so slim, like safetensors, needs nothing beyond numpy.
IMPORTS = {"torch": "torch", "keras": "h5py", "flax": "msgpack", "safetensors": "numpy", "slim": "numpy"}


def resnet50_shapes() -> list[tuple[int, int, int]]:
    """(kernel size, in, out) of ResNet-50's 53 convs, each followed by a BatchNorm."""
    shapes = [(7, 3, 64)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(1, cin, width), (3, width, width), (1, width, 4 * width)]
            if b == 0:
                shapes.append((1, cin, 4 * width))
            cin = 4 * width
    return shapes


def make_source(fmt: str, path: Path, whole: bool = True) -> None:
    import convbn
    from convbn.checkpoint import Layer
    from convbn.convert import Checkpoint

    rng = np.random.default_rng(0)
    ckpt = Checkpoint(format="torch", convention="torch")
    for i, (k, cin, cout) in enumerate(resnet50_shapes()):
        ckpt.layers[f"layer{i}"] = convbn.ConvBNParams(
            kernel=rng.standard_normal((k, k, cin, cout), np.float32),
            gamma=rng.uniform(0.5, 1.5, cout).astype(np.float32), beta=rng.standard_normal(cout, np.float32),
            moving_mean=rng.standard_normal(cout, np.float32), moving_var=rng.uniform(0.5, 2, cout).astype(np.float32),
            eps=1e-5, momentum=0.9,
        )
    if whole:
        features = resnet50_shapes()[-1][2]  # 2048: fc reads the pooled last block
        ckpt.others["fc"] = Layer("dense", kernel=rng.standard_normal((features, 1000), np.float32) * 0.02,
                                  bias=rng.standard_normal(1000, np.float32))
    convbn.save_checkpoint(ckpt, path, fmt)


def _files(path: Path) -> list[Path]:
    """The file, or for a TF checkpoint prefix its .index and .data-* files."""
    return [path] if path.is_file() else sorted(path.parent.glob(path.name + ".*"))


def run(route: str, workdir: Path, whole: bool = True) -> dict[str, Any]:
    """One sample of ``route`` in a fresh process: its result, with the source's size and the peak
    as multiples of that size."""
    src_fmt, dst_fmt = route.split(":")
    src = workdir / f"src{'' if whole else '_pairs'}.{SUFFIX[src_fmt]}"
    if not _files(src):
        make_source(src_fmt, src, whole)
    dst = workdir / f"dst_{src_fmt}.{SUFFIX[dst_fmt]}"
    # A TF checkpoint without its .meta graph cannot say whether fc reads a flattened map (2048 could
    # be 2x2x512): convert refuses until it is stated, as a user states it with --flatten fc=none.
    flatten = "fc=none" if whole and src_fmt == "slim" else ""
    result = measure(src, dst, dst_fmt, "", [IMPORTS[src_fmt], IMPORTS[dst_fmt]], route, flatten)
    size = sum(f.stat().st_size for f in _files(src))
    result.update(route=route, size=size, peak_x=result["peak"] / size,
                  extra_x=(result["peak"] - result["before"]) / size)
    for f in _files(dst):
        f.unlink()
    return result


def sampled(route: str, workdir: Path, samples: int, against_pairs: bool, whole: bool) -> dict[str, Any]:
    """``samples`` runs of ``route`` (interleaved with the pairs-only checkpoint's when
    ``against_pairs``): the first run's memory figures, the fastest and median wall and CPU times,
    and for ``against_pairs`` the whole / pairs-only ratios of the fastest times."""
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    kinds = (True, False) if against_pairs else (whole,)
    for _ in range(samples):
        for kind in kinds:
            runs[kind].append(run(route, workdir, kind))
    main = runs[kinds[0]]
    out = dict(main[0])
    for key in ("seconds", "cpu_s"):
        out[key] = min(r[key] for r in main)
        out[key + "_median"] = float(np.median([r[key] for r in main]))
        if against_pairs:
            out[key + "_ratio"] = out[key] / min(r[key] for r in runs[False])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", nargs="+", default=[
        "torch:safetensors", "torch:slim", "slim:torch", "torch:flax", "torch:keras",
        "keras:torch", "flax:torch", "safetensors:torch"])
    parser.add_argument("--pairs-only", action="store_true", help="leave out fc: conv+BatchNorm pairs only")
    parser.add_argument("--samples", type=int, default=1, help="fresh processes per route (default 1)")
    parser.add_argument("--against-pairs", action="store_true",
                        help="also time the pairs-only checkpoint, interleaved, and print whole / pairs-only")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error(f"--samples must be at least 1. Received: --samples {args.samples}")
    if args.against_pairs and args.pairs_only:
        parser.error("--against-pairs compares the whole model with --pairs-only's checkpoint; give one of them")
    params = sum(k * k * cin * cout for k, cin, cout in resnet50_shapes())
    print(f"ResNet-50 shapes: {len(resnet50_shapes())} conv+BN pairs, {params / 1e6:.2f}M conv parameters"
          + ("" if args.pairs_only else ", and fc (2048 -> 1000)")
          + f"; fastest of {args.samples} fresh process(es) per route, median after /")
    ratio = f" {'wall x pairs':>12} {'cpu x pairs':>11}" if args.against_pairs else ""
    print(f"{'route':<20} {'file MB':>8} {'import s':>9} {'convert s':>12} {'cpu s':>12} {'peak RSS MB':>12} "
          f"{'x file':>7} {'extra MB':>9} {'x file':>7}{ratio}")
    with tempfile.TemporaryDirectory() as tmp:
        for route in args.routes:
            r = sampled(route, Path(tmp), args.samples, args.against_pairs, whole=not args.pairs_only)
            mb = 1024 * 1024
            times = f"{r['seconds']:.2f}/{r['seconds_median']:.2f}"
            cpu = f"{r['cpu_s']:.2f}/{r['cpu_s_median']:.2f}"
            ratios = f" {r['seconds_ratio']:>12.2f} {r['cpu_s_ratio']:>11.2f}" if args.against_pairs else ""
            print(f"{r['route']:<20} {r['size'] / mb:>8.1f} {r['import_s']:>9.2f} {times:>12} {cpu:>12} "
                  f"{r['peak'] / mb:>12.0f} {r['peak_x']:>7.2f} {(r['peak'] - r['before']) / mb:>9.0f} "
                  f"{r['extra_x']:>7.2f}{ratios}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()

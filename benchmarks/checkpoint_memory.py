"""Peak memory over checkpoint size: reading and converting sharded, Orbax and TF checkpoints.

The checkpoint is ResNet-50-sized (53 conv+BatchNorm pairs, 23.5M float32 conv parameters, about
94 MB; ``benchmarks/checkpoint_conversion.py`` builds it), written as safetensors and torch shards
of at most ``--shard-size`` each (transformers' layout: ``*.index.json`` + shards), an Orbax
directory and a TF checkpoint (one ``.index`` + ``.data`` bundle). Each route runs in a fresh
process: the frameworks its formats need are imported first (torch, and orbax-checkpoint with
JAX for Orbax; nothing for TF checkpoints, whose reader and writer are pure Python), then the
peak-RSS counter is reset (Linux ``/proc/self/clear_refs``) and ``load_checkpoint`` (+
``save_checkpoint``) runs. Reported per route, as a markdown table: the source's size on disk, the
peak RSS during the route minus the RSS before it (what reading and writing needed), that growth
as a multiple of the checkpoint's size, the wall time, and whether TensorFlow was in
``sys.modules`` when the route ended (it must not be, for the slim routes).

    python benchmarks/checkpoint_memory.py [--shard-size 20MB] [--routes "read orbax" ...] [--dir DIR]

Linux only (``/proc``); needs torch, orbax-checkpoint (``convbn[orbax]``) for the Orbax routes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Source and destination names inside the work directory, by kind.
SOURCES = {
    "safetensors shards": ("st/model.safetensors", "safetensors"),
    "torch shards": ("pt/pytorch_model.bin", "torch"),
    "orbax": ("orbax", "flax"),
    "slim": ("slim/model.ckpt", "slim"),
    "torch": ("single.pt", "torch"),
}
#: route: (source kind, destination (path, format, sharded) or None to only read).
ROUTES: dict[str, tuple[str, tuple[str, str, bool] | None]] = {
    "read safetensors shards": ("safetensors shards", None),
    "read torch shards": ("torch shards", None),
    "torch shards -> safetensors shards": ("torch shards", ("o1/model.safetensors", "safetensors", True)),
    "safetensors shards -> torch shards": ("safetensors shards", ("o2/pytorch_model.bin", "torch", True)),
    "read orbax": ("orbax", None),
    "orbax -> torch": ("orbax", ("o3.pt", "torch", False)),
    "torch -> orbax": ("torch", ("o4", "flax", False)),
    "read slim": ("slim", None),
    "torch -> slim": ("torch", ("o5/model.ckpt", "slim", False)),
    "slim -> torch": ("slim", ("o6.pt", "torch", False)),
}
#: What a format's reader or writer imports, imported before measuring.
IMPORTS = {"torch": ["torch"], "flax": ["orbax.checkpoint"]}

#: One measured route, in a fresh process: ``root src dst format shard_size module...``. The modules
#: (the formats' frameworks) are imported first and timed; then the peak-RSS counter is reset and
#: ``load_checkpoint`` (+ ``save_checkpoint`` when a format is given) is timed, in wall and CPU
#: seconds. Prints one JSON line.
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
src, dst, to, shard = sys.argv[2:6]
t = time.perf_counter()
for name in sys.argv[6:]:
    __import__(name)
import convbn
import_s = time.perf_counter() - t

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t, cpu = time.perf_counter(), time.process_time()
ckpt = convbn.load_checkpoint(src)
flatten = os.environ.get("CONVBN_BENCH_FLATTEN")
if flatten:  # what `convert --flatten` states, where the source cannot say
    from convbn.checkpoint import parse_flatten
    ckpt = ckpt.with_flatten(parse_flatten(flatten.split(",")))
if to:
    convbn.save_checkpoint(ckpt, dst, to, max_shard_size=shard or None)
seconds, cpu_s = time.perf_counter() - t, time.process_time() - cpu
print(json.dumps({"before": before, "peak": status("VmHWM"), "seconds": seconds, "cpu_s": cpu_s, "import_s": import_s,
                  "layers": len(ckpt.layers), "tensorflow": "tensorflow" in sys.modules}))
"""


def measure(src: Path, dst: Path | None, to: str, shard_size: str, imports: list[str], what: str,
            flatten: str = "") -> dict[str, Any]:
    """Run :data:`CHILD` on one route (``to=""``: only read ``src``): its JSON result. torch is
    imported first where it is among ``imports``; ``what`` names the route if it fails; ``flatten``
    (``"fc=none"``, comma-separated) is stated after reading, as ``convert --flatten`` does."""
    modules = sorted(set(imports), key=lambda m: m != "torch")
    argv = [sys.executable, "-c", CHILD, str(ROOT), str(src), str(dst or ""), to, shard_size, *modules]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CONVBN_BENCH_FLATTEN": flatten}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{what} failed:\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def checkpoint_files(path: Path) -> list[Path]:
    """Every file of the checkpoint at ``path``: a directory's tree, a sharded file's index and
    shards, a TF prefix's ``.index`` and ``.data-*``, or the file."""
    if path.is_dir():
        return [f for f in path.rglob("*") if f.is_file()]
    if path.is_file():
        return [path]
    return sorted(f for f in path.parent.iterdir() if f.is_file() and f.name != "checkpoint")


def make_sources(work: Path, shard_size: str) -> None:
    """The ResNet-50-sized checkpoint in every source layout of :data:`SOURCES`."""
    import convbn
    from benchmarks.checkpoint_conversion import make_source

    make_source("torch", work / SOURCES["torch"][0])
    ckpt = convbn.load_checkpoint(work / SOURCES["torch"][0])
    for kind, (name, fmt) in SOURCES.items():
        if kind != "torch":
            convbn.save_checkpoint(ckpt, work / name, fmt, max_shard_size=shard_size if "shards" in kind else None)


def run(route: str, work: Path, shard_size: str) -> dict[str, Any]:
    """One route in a fresh process: its JSON result, with the source's size."""
    kind, target = ROUTES[route]
    src, src_fmt = SOURCES[kind]
    dst, to, sharded = target if target is not None else ("", "", False)
    imports = [m for f in (src_fmt, to) for m in IMPORTS.get(f, [])]
    result = measure(work / src, work / dst if dst else None, to, shard_size if sharded else "", imports, route)
    result["size"] = sum(f.stat().st_size for f in checkpoint_files(work / src))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=list(ROUTES), metavar="ROUTE",
                        help="routes to run (default: all)")
    parser.add_argument("--shard-size", default="20MB", help="max_shard_size of the sharded sources and outputs")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        make_sources(work, args.shard_size)
        mb = 1e6
        print("| route | checkpoint MB | extra peak RSS MB | x checkpoint | wall s | TensorFlow imported |")
        print("|---|---:|---:|---:|---:|---|")
        for route in args.routes:
            r = run(route, work, args.shard_size)
            size, extra = r["size"], r["peak"] - r["before"]
            print(f"| {route} | {size / mb:.1f} | {extra / mb:.1f} | {extra / size:.2f} | {r['seconds']:.2f} | "
                  f"{'yes' if r['tensorflow'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()

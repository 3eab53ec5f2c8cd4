"""``convbn convert`` between torch and TF checkpoints, end to end, against importing TensorFlow.

TF checkpoints are read and written without TensorFlow. What that buys a PyTorch user porting a
TF model is measured here, each command in a new process, as a user runs it:

- ``python -c "import tensorflow"``, what the conversion would cost before anything is converted
  if it needed TensorFlow;
- ``python -m convbn convert model.pt model.ckpt`` (torch -> TF);
- ``python -m convbn convert model.ckpt back.pt`` (TF -> torch),

on the ResNet-50-sized checkpoint of ``benchmarks/checkpoint_conversion.py`` (53 conv+BatchNorm
pairs, 94 MB). The three commands alternate (A B C, C B A, ...) for ``--samples`` rounds, so a
change in the machine's load hits all of them; reported are each one's median wall time and peak
RSS (the child's ``ru_maxrss``), and the ratios convert / import TensorFlow, per round, median
and range. The target is a conversion in under half the time of importing TensorFlow.

    python benchmarks/tf_free_conversion.py [--samples 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.checkpoint_conversion import make_source  # noqa: E402


def _timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``command`` in a new process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5, help="rounds of the three commands")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "model.pt"
        make_source("torch", source)
        size_mb = source.stat().st_size / 2**20
        commands = {
            "import tensorflow": [sys.executable, "-c", "import tensorflow"],
            "convert torch -> TF": [sys.executable, "-m", "convbn", "convert", str(source), str(work / "model.ckpt"),
                                    "--force"],
            "convert TF -> torch": [sys.executable, "-m", "convbn", "convert", str(work / "model.ckpt"),
                                    str(work / "back.pt"), "--force"],
        }
        _timed(commands["convert torch -> TF"])  # the TF checkpoint the third command reads
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        names = list(commands)
        for i in range(args.samples):
            for name in names if i % 2 == 0 else names[::-1]:
                results[name].append(_timed(commands[name]))
    tf_times = [t for t, _ in results["import tensorflow"]]
    print(f"ResNet-50-sized checkpoint, {size_mb:.1f} MB; {args.samples} rounds; {os.cpu_count()} CPUs\n")
    print("| command | median wall s | peak RSS MB | RSS / file | wall / import tensorflow (median, range) |")
    print("|---|---:|---:|---:|---|")
    for name, runs in results.items():
        times = [t for t, _ in runs]
        rss = statistics.median(r for _, r in runs)
        ratios = [t / base for t, base in zip(times, tf_times, strict=True)]
        ratio = "1" if name == "import tensorflow" else (
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        print(f"| `{name}` | {statistics.median(times):.2f} | {rss:.0f} | {rss / size_mb:.2f} | {ratio} |")


if __name__ == "__main__":
    main()

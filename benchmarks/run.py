"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [--backends ...] [--out DIR]``.

Each backend runs in its own subprocess (so one framework's thread pools and caches never touch
another's timings). Checkpoint conversion has its own benchmark, ``benchmarks/checkpoint_conversion.py``.
Writes ``DIR/results.md`` (the tables) and ``DIR/results.json`` (everything, including
per-contender medians, ratio quartiles, the machine and the library versions).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import SHAPES, Result, interleaved, rel_err

BACKENDS = ("torch", "tensorflow", "jax")
_FRAMEWORK = {"torch": "torch", "tensorflow": "tensorflow", "jax": "flax"}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Settings:
    samples: int
    min_time: float
    clock: str = "wall"

    @classmethod
    def of(cls, quick: bool, samples: int | None = None, clock: str = "wall") -> Settings:
        base = cls(samples=5, min_time=0.005) if quick else cls(samples=21, min_time=0.1)
        return dataclasses.replace(base, samples=samples or base.samples, clock=clock)

    @property
    def timer(self) -> Any:
        return time.process_time if self.clock == "cpu" else time.perf_counter


def installed(backend: str) -> bool:
    return importlib.util.find_spec(_FRAMEWORK[backend]) is not None and (
        importlib.util.find_spec(backend) is not None
    )


def run_backend(
    backend: str,
    shapes: list[str] | None = None,
    modes: tuple[str, ...] = ("eval", "train"),
    quick: bool = False,
    timed: bool = True,
    samples: int | None = None,
    clock: str = "wall",
) -> tuple[list[Result], dict[str, Any]]:
    """Every contest of one backend in this process; ``timed=False`` only compares outputs."""
    module = importlib.import_module(f"benchmarks.bench_{backend}")
    settings = Settings.of(quick, samples, clock)
    results: list[Result] = []
    for shape in SHAPES:
        if shapes is not None and shape.name not in shapes:
            continue
        for contest in module.contests(shape):
            if contest.mode not in modes:
                continue
            ours, theirs = contest.outputs()
            diffs = {k: rel_err(ours[k], theirs[k]) for k in ours}
            limit_diff = (
                None if contest.limit_outputs is None
                else max(rel_err(v, theirs[k]) for k, v in contest.limit_outputs().items())
            )
            timing = (
                interleaved(contest.convbn, contest.native, contest.sync,
                            samples=settings.samples, min_time=settings.min_time, clock=settings.timer,
                            limit=contest.limit)
                if timed
                else None
            )
            results.append(Result(backend, shape.name, shape.describe(), contest.mode, contest.variant,
                                  contest.native_name, timing, diffs, limit_rel_diff=limit_diff))
            if timed and timing is not None:
                limit = "" if timing.limit_ratio is None else f"  / limit {timing.limit_ratio:.3f}"
                print(f"  {backend:10s} {shape.name:14s} {contest.mode:5s} {contest.variant:22s} "
                      f"convbn {timing.convbn_s * 1e3:9.3f} ms  native {timing.native_s * 1e3:9.3f} ms  "
                      f"ratio {timing.ratio:.3f}{limit}", file=sys.stderr, flush=True)
    return results, module.environment()  # type: ignore[no-any-return]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def _worker(args: argparse.Namespace) -> None:
    if args.worker == "tensorflow":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.threads and hasattr(os, "sched_setaffinity"):
        # Before any framework is imported: torch, TF and XLA all size their thread pools from
        # the CPU affinity mask.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    results, env = run_backend(args.worker, args.shapes, tuple(args.modes), args.quick,
                               samples=args.samples, clock=args.clock)
    if hasattr(os, "sched_getaffinity"):
        env["cores_used"] = len(os.sched_getaffinity(0))
    Path(args.json).write_text(json.dumps({"environment": env, "results": [dataclasses.asdict(r) for r in results]}))


def _spawn(argv: list[str]) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        proc = subprocess.run([sys.executable, "-m", "benchmarks.run", *argv, "--json", str(out)],
                              cwd=Path(__file__).resolve().parent.parent)
        if proc.returncode != 0 or not out.exists():
            return None
        return json.loads(out.read_text())  # type: ignore[no-any-return]


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def layers_markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| backend | shape | mode | variant | convbn | native | ratio | ratio IQR | max rel diff "
        "| limit | convbn / limit | its IQR |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        t = r["timing"]
        diff = max(r["max_rel_diff"].values()) if r["max_rel_diff"] else 0.0
        limit = (
            f" {_fmt_time(t['limit_s'])} | **{t['limit_ratio']:.2f}** | {t['limit_q1']:.2f}-{t['limit_q3']:.2f} |"
            if t.get("limit_s") is not None else " | | |"
        )
        lines.append(
            f"| {r['backend']} | {r['shape']} | {r['mode']} | {r['variant']} | {_fmt_time(t['convbn_s'])} | "
            f"{_fmt_time(t['native_s'])} | **{t['ratio']:.2f}** | {t['ratio_q1']:.2f}-{t['ratio_q3']:.2f} | "
            f"{diff:.1e} |{limit}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few short samples: a smoke run, not a measurement")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--shapes", nargs="+", choices=[s.name for s in SHAPES], default=None)
    parser.add_argument("--modes", nargs="+", choices=("eval", "train"), default=["eval", "train"])
    parser.add_argument("--samples", type=int, help="timed samples per contender (default 21; 5 with --quick)")
    parser.add_argument("--threads", type=int, help="pin each backend's process to this many cores "
                        "(default: all; every framework then uses that many threads)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (default) or this process's CPU time, which other processes "
                        "on a busy machine disturb far less")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/results)")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": dataclasses.asdict(Settings.of(args.quick, args.samples, args.clock))
        | {"quick": args.quick, "threads": args.threads or os.cpu_count()},
        "environment": {},
        "layers": [],
        "skipped": [],
    }
    common = (["--quick"] if args.quick else []) + ["--modes", *args.modes]
    if args.samples:
        common += ["--samples", str(args.samples)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    common += ["--clock", args.clock]
    if args.shapes:
        common += ["--shapes", *args.shapes]
    for backend in args.backends:
        if not installed(backend):
            report["skipped"].append(f"{backend}: not installed")
            print(f"skipping {backend}: not installed", file=sys.stderr)
            continue
        print(f"{backend}:", file=sys.stderr, flush=True)
        out = _spawn(["--worker", backend, *common])
        if out is None:
            report["skipped"].append(f"{backend}: the benchmark process failed")
            continue
        report["environment"][backend] = out["environment"]
        report["layers"].extend(out["results"])
    if hasattr(os, "getloadavg"):
        report["machine"]["loadavg_end"] = list(os.getloadavg())

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    (args.out / "results.md").write_text(markdown(report))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}", file=sys.stderr)
    return 0


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    env = "; ".join(f"{b}: " + ", ".join(f"{k} {v}" for k, v in e.items()) for b, e in report["environment"].items())
    parts = [
        "# convbn benchmarks",
        "",
        f"{report['date']}, {m['cpu']} ({m['cores']} cores), Python {m['python']}; {env}.",
        f"Load average at start/end: {m.get('loadavg_start')} / {m.get('loadavg_end')}.",
        f"Medians of {report['settings']['samples']} interleaved samples of at least "
        f"{report['settings']['min_time']} s each ({report['settings']['clock']} clock, "
        f"{report['settings']['threads']} thread(s) per framework). convbn and native are median "
        "per-call times; ratio is the median of the ratios of back-to-back samples, convbn / native "
        "(below 1: convbn is faster), with their interquartile range. limit, where a contest has one, "
        "is the physical limit timed in the same rotation (torch eval: one F.conv2d with BatchNorm "
        "folded into the weight and bias and the padding resolved), and convbn / limit the median "
        "of the per-sample ratios.",
        "",
        "## Layers",
        "",
        layers_markdown(report["layers"]),
    ]
    if report["skipped"]:
        parts += ["", "Skipped: " + "; ".join(report["skipped"])]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())

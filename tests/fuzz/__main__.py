"""Mutation fuzzing of the checkpoint readers.

Builds small real checkpoints per format (``tests/fuzz/seeds.py``: single and sharded files, TF
checkpoints in one or several data files, Orbax directories as ``orbax``, Keras 2 ``.h5`` weights
as ``keras2``), damages them with seeded
mutations (``tests/fuzz/mutate.py``) and runs each mutant through ``convbn.load_checkpoint``,
``convbn inspect`` and ``convbn convert`` in worker processes under a memory limit and a timeout.
Every outcome that is not a clean load or a one-line ``ConvBNError`` (exit 2, nothing written) is
grouped by signature, printed with one example, and saved as a reproducer under ``--out``
(``reproducers/<signature>/``: the mutant's files and ``mutant.json`` with the command to replay).
The exit status is 1 when anything was not clean.

The test suite runs a few hundred mutants per format (``tests/fuzz/test_fuzz_readers.py``). The
longer run, for a reader change or before a release (about 6 minutes on 2 cores without orbax and
keras2, not timed with them)::

    python -m tests.fuzz --formats torch,safetensors,flax,orbax,keras,keras2,slim --mutants 2000 --seed 0 --out fuzz-out

A different ``--seed`` gives a fresh set of mutants; the same seed gives the same bytes everywhere.
``--replay DIR`` runs one saved reproducer in this process (a crash then kills it, with the
traceback in view) and prints what is still not clean::

    python -m tests.fuzz --replay fuzz-out/reproducers/<signature>
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz import runner, seeds

FORMATS = ("torch", "safetensors", "flax", "orbax", "keras", "keras2", "slim")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma list (default: all)")
    parser.add_argument("--mutants", type=int, default=300, help="mutants per format (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="selects the mutants (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="where reproducers go (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per mutant (default 20)")
    parser.add_argument("--memory", type=float, default=2.0, help="GiB a worker may grow by (default 2)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--replay", type=Path, default=None, metavar="DIR",
                        help="run one reproducer directory (with its mutant.json) in this process")
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args.replay)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"unknown formats {unknown}; known: {list(FORMATS)}")
    missing = [f for f in formats if not seeds.available(f)]
    if missing:
        parser.error(f"formats {missing} need {[seeds.REQUIRES[f] for f in missing]}, not all installed")
    out = args.out or Path(tempfile.mkdtemp(prefix="convbn-fuzz-"))
    t0 = time.monotonic()
    built = seeds.build(formats)
    print(f"seeds built in {time.monotonic() - t0:.0f} s: {sum(len(b) for b in built.values())} files", flush=True)
    targets = runner.default_targets(formats, runner.enabled_by_install)
    t0 = time.monotonic()
    report = runner.run(built, targets, args.mutants, seed=args.seed, jobs=args.jobs, timeout=args.timeout,
                        memory=int(args.memory * 2**30), out=out, log=lambda s: print(s, flush=True))
    print(f"{sum(report.mutants.values())} mutants in {time.monotonic() - t0:.0f} s with {args.jobs} workers")
    print(report.summary())
    print(f"reproducers under {out / 'reproducers'}" if report.count else "all clean")
    return 1 if report.count or report.unclean_seeds else 0


def replay(directory: Path) -> int:
    """Run a saved reproducer through the three stages in this process; 1 if still not clean."""
    meta = json.loads((directory / "mutant.json").read_text())
    from convbn.formats import import_frameworks

    import_frameworks(meta["format"], meta["convert_to"])
    work = Path(tempfile.mkdtemp(prefix="convbn-replay-"))
    try:
        shutil.copytree(directory, work / "src", ignore=shutil.ignore_patterns("mutant.json"))
        # An "equivalent file" finding needs the seed, which is rebuilt from its name.
        seed = None
        if meta.get("expect") == "same":
            bundle = next(b for b in seeds.BUILDERS[meta["format"]]() if b.name == meta["seed_file"])
            (work / "seed").mkdir()
            seed = bundle.write(work / "seed")
        found, refused = runner.run_stages(meta["format"], work / "src" / meta["entry"], meta["convert_to"], work,
                                           meta.get("expect", ""), seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{meta['format']} mutant {meta['index']} (seed {meta['seed']}, {meta['mutation']}): "
          f"{'refused: ' + refused if refused else 'loaded and converted'}")
    for stage, kind, where, message in found:
        print(f"  {stage} | {kind} | {where}\n    {message.strip()[:2000]}")
    print("not clean" if found else "clean")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

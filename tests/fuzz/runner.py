"""Run mutants through the readers and the CLI in worker processes, and group what is not clean.

A clean outcome is a load that succeeds (and a convert that exits 0 with DST written), or a
``ConvBNError`` with a one-line message (the CLI: exit 2, one line on stderr, nothing at DST and
nothing else in its directory). Anything else is recorded under a signature: format, stage, kind
(exception type, ``exit N``, ``signal SIGABRT``, ``timeout``, ...) and where (the innermost convbn
frame, or the message's start). Workers are spawned processes that each handle many mutants under an
address-space limit; a worker that dies or hangs is replaced, and the mutant it was on is recorded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import shutil
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.fuzz import mutate as mutation
from tests.fuzz.seeds import Bundle

#: The suffix each format's files get as a convert destination.
SUFFIX = {"torch": ".pt", "safetensors": ".safetensors", "flax": ".msgpack", "keras": ".weights.h5"}

#: The files of a multi-file seed more worth damaging (a TF index and graph, a shard index and
#: Orbax's metadata hold the structure).
_WEIGHT = {".index": 5, ".index.json": 5, "_METADATA": 3, ".meta": 3, ".data-00000-of-00001": 3, "checkpoint": 1}


@dataclasses.dataclass
class Mutant:
    fmt: str
    index: int  # -1: the unmutated seed
    seed_name: str
    how: str
    bundle: Bundle
    expect: str = ""  # "refused": hostile; "same": must read as the seed does (see mutate.mutate)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One stage of one mutant that was not clean."""

    fmt: str
    stage: str
    kind: str
    where: str
    message: str

    @property
    def signature(self) -> tuple[str, str, str, str]:
        return (self.fmt, self.stage, self.kind, self.where)


def make_mutant(fmt: str, seeds: list[Bundle], index: int, seed: int) -> Mutant:
    """Mutant ``index`` of ``fmt`` for ``seed``: the same bytes on every machine and run."""
    rng = random.Random(f"{seed}/{fmt}/{index}")
    base = rng.choice(seeds)
    files = dict(base.files)
    names = sorted(files)
    if len(names) > 1 and rng.random() < 0.05:
        victim = rng.choice([n for n in names if not n.endswith(".index")])
        del files[victim]
        return Mutant(fmt, index, base.name, f"{victim}:removed", Bundle(base.name, files, base.entry))
    victim = rng.choices(names, [next((w for s, w in _WEIGHT.items() if n.endswith(s)), 1) for n in names])[0]
    files[victim], how, expect = mutation.mutate(rng, victim, files[victim])
    return Mutant(fmt, index, base.name, f"{victim}:{how}", Bundle(base.name, files, base.entry), expect)


# ---------------------------------------------------------------------------------------- worker


def _vm_size() -> int:
    """This process's current address-space size in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _where(exc: BaseException) -> str:
    """The innermost frame inside the convbn package, as ``convbn/formats/torch.py:_load``."""
    where = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        parts = Path(frame.filename).parts
        if "convbn" in parts and "tests" not in parts:
            where = "/".join(parts[parts.index("convbn"):]) + f":{frame.name}"
    return where


def _prefix(message: str) -> str:
    """A message's first line with paths and numbers blanked, so one defect groups under one signature."""
    first = message.strip().splitlines()[0] if message.strip() else "<empty>"
    first = re.sub(r"(/[^\s'\"]+)+", "<path>", first)
    return re.sub(r"\d+", "N", first)[:70]


#: How allocation failures read once a reader has wrapped them (NumPy, h5py, torch, TF, Python).
_ALLOCATION_FAILED = re.compile(r"MemoryError|Unable to allocate|[Cc]annot allocate|[Oo]ut of memory|bad_alloc")


def _unclean_error(exc: BaseException) -> tuple[str, str, str] | None:
    """None for a one-line ConvBNError; else (kind, where, message)."""
    from convbn.errors import ConvBNError

    message = str(exc)
    if isinstance(exc, ConvBNError):
        if _ALLOCATION_FAILED.search(message) or isinstance(exc.__context__, MemoryError):
            # A reader that caught the failed allocation still tried to materialize more than the file holds.
            return ("ConvBNError after a failed allocation", _where(exc), message)
        if message.strip() and "\n" not in message.strip():
            return None
        return ("multi-line ConvBNError" if message.strip() else "empty ConvBNError", _prefix(message), message)
    kind = "MemoryError" if isinstance(exc, MemoryError) else type(exc).__name__
    return (kind, _where(exc), f"{type(exc).__name__}: {message}"[:2000])


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _run_cli(argv: list[str]) -> tuple[int | None, str, BaseException | None]:
    from convbn import cli

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            return cli.main(argv), err.getvalue(), None
        except BaseException as exc:  # a finding, whatever it is
            return None, err.getvalue(), exc


def _check_cli(stage: str, rc: int | None, err: str, exc: BaseException | None) -> tuple[str, str, str] | None:
    if exc is not None:
        return _unclean_error(exc) or ("ConvBNError escaped the CLI", _where(exc), str(exc))
    lines = err.strip().splitlines()
    if rc == 2 and len(lines) != 1:
        return ("exit 2, stderr not one line", _prefix(err), err[:2000])
    if rc not in (0, 2):
        return (f"exit {rc}", _prefix(err), err[:2000])
    return None


_SEED_LAYERS: dict[Path, dict[str, dict[str, Any]]] = {}


def _layers(ckpt: Any) -> dict[str, dict[str, Any]]:
    from convbn.params import ARRAY_FIELDS

    return {name: {f: getattr(p, f) for f in ARRAY_FIELDS} for name, p in ckpt.layers.items()}


def _differs(got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]]) -> str:
    """The first layer field where two checkpoints' values differ ("" when none does)."""
    import numpy as np

    if list(got) != list(want):
        return f"layers {list(got)[:4]} instead of {list(want)[:4]}"
    for name, fields in want.items():
        for field, value in fields.items():
            other = got[name][field]
            if value is None or other is None:
                same = value is None and other is None
            else:
                a, b = np.asarray(value), np.asarray(other)
                same = a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
            if not same:
                return f"{name}.{field}"
    return ""


def run_stages(fmt: str, src: Path, target: str, work: Path, expect: str = "",
               seed: Path | None = None) -> tuple[list[tuple[str, str, str, str]], str]:
    """The three stages on one mutant: (stage, kind, where, message) of each that was not clean, and
    why it was refused ("" when it loaded and converted: a seed must; a mutant that always does shows
    a weak mutator). ``expect`` "refused": loading or converting it is a finding; "same": it must
    read as ``seed`` does, or be refused."""
    import convbn

    found: list[tuple[str, str, str, str]] = []
    before = _listing(src.parent)
    loaded = ""
    try:
        ckpt = convbn.load_checkpoint(src)
        if expect == "refused":
            found.append(("load", "hostile input accepted", "-", f"{src.name} loaded"))
        elif expect == "same" and seed is not None:
            if seed not in _SEED_LAYERS:
                _SEED_LAYERS[seed] = _layers(convbn.load_checkpoint(seed))
            where = _differs(_layers(ckpt), _SEED_LAYERS[seed])
            if where:
                found.append(("load", "equivalent file read differently", where, f"{src.name}: {where} differs"))
    except BaseException as error:  # a finding, whatever it is
        loaded = f"{type(error).__name__}: {error}"
        bad = _unclean_error(error)
        if bad:
            found.append(("load", *bad))
    rc, err, exc = _run_cli(["inspect", str(src)])
    bad = _check_cli("inspect", rc, err, exc)
    if bad:
        found.append(("inspect", *bad))
    out = work / "out"
    out.mkdir()
    dst = out / f"model{SUFFIX[target]}"
    rc, err, exc = _run_cli(["convert", str(src), str(dst)])
    bad = _check_cli("convert", rc, err, exc)
    left = _listing(out)
    if bad:
        found.append(("convert", *bad))
    elif rc == 0 and left != [dst.name]:
        found.append(("convert", "exit 0, DST missing or litter", str(left)[:70], str(left)))
    elif rc == 2 and left:
        found.append(("convert", "exit 2, output left behind", str(left)[:70], str(left)))
    if rc == 0 and expect == "refused":
        found.append(("convert", "hostile input accepted", "-", f"{src.name} converted"))
    after = _listing(src.parent)
    if after != before:
        found.append(("convert", "source directory changed", str(sorted(set(after) ^ set(before)))[:70], ""))
    return found, loaded or ("" if rc == 0 else f"convert exit {rc}: {err.strip()}")


def worker_main(conn: multiprocessing.connection.Connection, frameworks: list[str], memory: int) -> None:
    """A worker: import the frameworks once (torch first), bound memory, then run mutants until told to stop."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(var, "1")
    # Frameworks' own C++ logs and crash dumps would bury the report; outcomes come back by the pipe.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import importlib

    for name in ("torch", "tensorflow", "h5py", "msgpack", "orbax.checkpoint"):
        if name in frameworks:
            importlib.import_module(name)
    import convbn
    import convbn.cli  # noqa: F401

    if memory > 0:
        import resource

        limit = _vm_size() + memory
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.simplefilter("ignore")
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        fmt, src, target, work, expect, seed = job
        try:
            result = run_stages(fmt, Path(src), target, Path(work), expect, Path(seed))
        except BaseException as exc:  # a finding, whatever it is
            result = ([("fuzzer", type(exc).__name__, _where(exc), traceback.format_exc()[-2000:])], str(exc))
        conn.send(result)


# ---------------------------------------------------------------------------------------- parent


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: multiprocessing.connection.Connection
    born: float = dataclasses.field(default_factory=time.monotonic)
    ready: bool = False
    job: tuple[Mutant, Path, float] | None = None


@dataclasses.dataclass
class Report:
    """What a run found: outcomes by signature, with the first mutant of each kept as a reproducer."""

    mutants: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    accepted: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    seconds: collections.defaultdict[str, float] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(float))
    by_signature: dict[tuple[str, str, str, str], list[tuple[Mutant, Outcome]]] = dataclasses.field(
        default_factory=dict)
    unclean_seeds: list[tuple[Mutant, Outcome]] = dataclasses.field(default_factory=list)
    reproducers: dict[tuple[str, str, str, str], Path] = dataclasses.field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_signature.values())

    def counts(self, fmt: str) -> int:
        return sum(len(v) for k, v in self.by_signature.items() if k[0] == fmt)

    def summary(self) -> str:
        lines = []
        for fmt, n in self.mutants.items():
            rate = n / self.seconds[fmt] if self.seconds[fmt] else float("nan")
            bad = {m.index for k, v in self.by_signature.items() if k[0] == fmt for m, _ in v}
            lines.append(f"{fmt}: {n} mutants ({self.accepted[fmt]} loaded and converted), {len(bad)} not clean, "
                         f"{self.counts(fmt)} outcomes in "
                         f"{sum(1 for k in self.by_signature if k[0] == fmt)} signatures; "
                         f"{rate:.1f} mutants/s per worker")
        for mutant, outcome in self.unclean_seeds:
            lines.append(f"SEED {mutant.seed_name} is not clean: {outcome.stage} {outcome.kind}: {outcome.message[:300]}")
        for sig, hits in sorted(self.by_signature.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
            mutant, outcome = hits[0]
            repro = self.reproducers.get(sig)
            lines.append(f"  {len(hits):4d}  {' | '.join(sig)}")
            lines.append(f"        e.g. mutant {mutant.index} of {mutant.seed_name} ({mutant.how}): "
                         f"{outcome.message.strip().splitlines()[0][:200] if outcome.message.strip() else ''}")
            if repro:
                lines.append(f"        reproducer: {repro}")
        return "\n".join(lines)


def _slug(sig: tuple[str, ...]) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(sig))[:120]


def _needed_frameworks(formats: Iterable[str], targets: dict[str, str]) -> list[str]:
    needed = {"torch": "torch", "slim": "tensorflow", "keras": "h5py", "keras2": "h5py", "flax": "msgpack",
              "orbax": "orbax.checkpoint"}
    return sorted({needed[f] for f in [*formats, *targets.values()] if f in needed})


def run(
    seeds: dict[str, list[Bundle]],
    targets: dict[str, str],
    mutants: int | dict[str, int],
    *,
    seed: int = 0,
    jobs: int = 2,
    timeout: float = 20.0,
    memory: int = 2 << 30,
    out: Path,
    log: Any = None,
) -> Report:
    """Fuzz every format in ``seeds`` (``mutants`` per format, plus each seed unmutated) and report."""
    counts = mutants if isinstance(mutants, dict) else {fmt: mutants for fmt in seeds}
    queue: collections.deque[Mutant] = collections.deque()
    for fmt, bundles in seeds.items():
        for b in bundles:
            queue.append(Mutant(fmt, -1, b.name, "unmutated", b))
        queue.extend(make_mutant(fmt, bundles, i, seed) for i in range(counts[fmt]))
    report = Report()
    scratch = out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    frameworks = _needed_frameworks(seeds, targets)

    def start() -> _Worker:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=worker_main, args=(child, frameworks, memory), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    def record(mutant: Mutant, found: list[tuple[str, str, str, str]], refused: str, work: Path,
               elapsed: float) -> None:
        report.seconds[mutant.fmt] += elapsed
        if mutant.index >= 0:
            report.mutants[mutant.fmt] += 1
            report.accepted[mutant.fmt] += not refused
        elif refused and not found:
            found = [("load", "seed refused", "-", refused)]
        for stage, kind, where, message in found:
            outcome = Outcome(mutant.fmt, stage, kind, where, message)
            if mutant.index < 0:
                report.unclean_seeds.append((mutant, outcome))
                continue
            hits = report.by_signature.setdefault(outcome.signature, [])
            hits.append((mutant, outcome))
            if len(hits) == 1:
                keep = out / "reproducers" / _slug(outcome.signature)
                shutil.rmtree(keep, ignore_errors=True)
                keep.mkdir(parents=True)
                mutant.bundle.write(keep)
                (keep / "mutant.json").write_text(json.dumps({
                    "format": mutant.fmt, "seed": seed, "index": mutant.index, "seed_file": mutant.seed_name,
                    "mutation": mutant.how, "expect": mutant.expect, "signature": outcome.signature, "message": message,
                    "entry": mutant.bundle.entry, "convert_to": targets[mutant.fmt],
                    "reproduce": f"convbn convert {keep / mutant.bundle.entry} /tmp/out{SUFFIX[targets[mutant.fmt]]}",
                }, indent=1))
                report.reproducers[outcome.signature] = keep
        shutil.rmtree(work, ignore_errors=True)

    seed_paths: dict[str, Path] = {}
    for bundles in seeds.values():
        for b in bundles:
            (scratch / "seeds" / b.name).mkdir(parents=True, exist_ok=True)
            seed_paths[b.name] = b.write(scratch / "seeds" / b.name)
    workers = [start() for _ in range(max(1, jobs))]
    serial = 0
    try:
        while queue or any(w.job for w in workers):
            for w in workers:
                if w.ready and w.job is None and queue:
                    mutant = queue.popleft()
                    serial += 1
                    work = scratch / f"{serial}-{mutant.fmt}"
                    shutil.rmtree(work, ignore_errors=True)
                    (work / "src").mkdir(parents=True)
                    src = mutant.bundle.write(work / "src")
                    w.conn.send((mutant.fmt, str(src), targets[mutant.fmt], str(work), mutant.expect,
                                 str(seed_paths[mutant.seed_name])))
                    w.job = (mutant, work, time.monotonic())
            waitables: list[Any] = [w.conn for w in workers] + [w.process.sentinel for w in workers]
            multiprocessing.connection.wait(waitables, timeout=0.5)
            now = time.monotonic()
            for i, w in enumerate(workers):
                dead = False
                if w.conn.poll():
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        dead = True
                    else:
                        if msg == "ready":
                            w.ready = True
                        elif w.job is not None:
                            mutant, work, t0 = w.job
                            found, refused = msg
                            record(mutant, found, refused, work, now - t0)
                            w.job = None
                            if log and mutant.index >= 0 and sum(report.mutants.values()) % 100 == 0:
                                log(f"... {sum(report.mutants.values())} mutants, {report.count} not clean")
                elif not w.process.is_alive():
                    dead = True
                hung = w.job is not None and now - w.job[2] > timeout
                if not w.ready and not dead and now - w.born > 600:
                    raise RuntimeError("a fuzz worker did not start within 600 s")
                if dead or hung:
                    if hung:
                        w.process.kill()
                    w.process.join(5)
                    code = w.process.exitcode
                    if w.job is not None:
                        mutant, work, t0 = w.job
                        if hung:
                            kind = f"timeout > {timeout:g} s"
                        elif code is not None and code < 0:
                            kind = f"signal {signal.Signals(-code).name}"
                        else:
                            kind = f"worker exit {code}"
                        record(mutant, [("process", kind, "-", f"{kind} while reading {mutant.how}")], kind,
                               work, now - t0)
                    elif not w.ready:
                        raise RuntimeError(f"a fuzz worker died while starting (exit {code})")
                    w.conn.close()
                    workers[i] = start()
    finally:
        for w in workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                w.conn.send(None)
        for w in workers:
            w.process.join(5)
            if w.process.is_alive():
                w.process.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def default_targets(formats: Iterable[str], enabled: Any) -> dict[str, str]:
    """The convert destination per source: safetensors, and for safetensors the first writable other format."""
    targets = {}
    for fmt in formats:
        if fmt != "safetensors":
            targets[fmt] = "safetensors"
            continue
        for name, module in (("torch", "torch"), ("keras", "h5py"), ("flax", "msgpack")):
            if enabled(name, module):
                targets[fmt] = name
                break
        else:
            targets[fmt] = "safetensors"
    return targets


def enabled_by_install(name: str, module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run python -m tests.fuzz")

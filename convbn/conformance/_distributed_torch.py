"""The torch driver of the ``distributed`` group: replicas are ``torch.distributed`` processes.

Every rank calls ``conv_bn(x_slice, params, training=True, sync=True)`` on its slice of the batch
and differentiates its own loss ``sum(y_slice * dy_slice)`` with autograd, so the backward's
all-reduce runs as it does in training. The ranks' :class:`~convbn.conformance.distributed.Piece`
objects are checked against one process on the whole batch. torch shards unevenly, so every split
runs, including a rank with no images.

Where no process group exists, :func:`run` makes one: ``world`` processes started with
``torch.multiprocessing`` (spawn) joined by gloo over a file store, on CPU, with the CPU threads
shared between them. Under a launcher (``torchrun --nproc-per-node K -m convbn.conformance
--distributed``) it runs on the launched processes instead: the group is initialized from the
launcher's environment if it is not yet (NCCL on a GPU per rank where CUDA is visible, else gloo),
and rank 0 gathers every rank's pieces (``all_gather_object``) and returns the results.

Example (2 processes on CPU; float32 only, one mode per case):
    >>> from convbn.conformance import _distributed_torch
    >>> results = _distributed_torch.run(2, quick=True)  # doctest: +SKIP
    >>> sorted({r.status for r in results})  # doctest: +SKIP
    ['pass']
"""

from __future__ import annotations

import os
import queue as queue_module
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from convbn.conformance.distributed import (
    GROUP,
    DistTask,
    Piece,
    check,
    from_layout,
    inputs,
    shard,
    tasks,
    to_layout,
)
from convbn.conformance.results import Result
from convbn.errors import ConvBNError

__all__ = ["run", "run_here", "spawn"]

BACKEND = "torch"
#: Parameter gradients a Piece carries, when the params have them.
_PARAM_GRADS = ("kernel", "bias", "gamma", "beta")
#: Seconds a spawned group may take before it is stopped (a rank stuck in a collective).
TIMEOUT = 300.0


def run(world: int, quick: bool = False) -> list[Result]:
    """The ``distributed`` group on ``world`` torch ranks.

    Inside an initialized process group, or a process a launcher started (``RANK`` and
    ``WORLD_SIZE`` set), it runs on that group, whose size must be ``world``; otherwise it spawns
    ``world`` CPU processes joined by gloo.

    Returns:
        One :class:`~convbn.conformance.runner.Result` per check and task; under a launcher only
        rank 0 returns them (the others return ``[]``).

    Raises:
        ConvBNError: when the launched group's size is not ``world``.
    """
    import torch.distributed as dist

    if dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return run_here(world, quick)
    device = f"cpu x{world}"
    selected = tasks(world, quick)
    try:
        per_rank = spawn(world, _rank_pieces, selected, "cpu")
    except Exception as exc:  # a crashed or stuck group fails every task, naming why
        crash = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return [_failed(device, task, crash) for task in selected]
    return _check_all(device, selected, per_rank)


def run_here(world: int, quick: bool = False) -> list[Result]:
    """The ``distributed`` group on this process's group (initialized from a launcher's
    environment if it is not yet); rank 0 returns the results, the other ranks ``[]``."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    size, rank = dist.get_world_size(), dist.get_rank()
    if size != world:
        raise ConvBNError(
            f"the process group has {size} ranks, so the distributed group runs for world={size}. "
            f"Received: world={world}"
        )
    device = _device()
    where = f"{device.type} x{world}"
    selected = tasks(world, quick)
    mine = _rank_pieces(rank, world, selected, str(device))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return []
    return _check_all(where, selected, gathered)


def spawn(world: int, fn: Callable[..., Any], *args: Any, timeout: float = TIMEOUT) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` new processes joined by a gloo process group;
    their return values, by rank.

    ``fn`` must be importable by name (a module-level function); its arguments and result travel
    between processes pickled, as ``torch.multiprocessing`` sends them. Each process gets an equal
    share of this machine's CPU threads. A process that raises, or a group still running after
    ``timeout`` seconds, stops every process and raises here.
    """
    import torch.multiprocessing as mp

    store = tempfile.mkdtemp(prefix="convbn-gloo-")
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // world)
    procs = mp.start_processes(
        _spawned, args=(world, os.path.join(store, "store"), threads, results, fn, args),
        nprocs=world, join=False, start_method="spawn",
    )
    out: dict[int, Any] = {}
    try:
        waited = 0.0
        while len(out) < world:
            try:
                rank, value = results.get(timeout=0.2)
                out[rank] = value
            except queue_module.Empty:
                waited += 0.2
                # Raises with the child's traceback when one failed; True when all ended.
                if procs.join(timeout=0) or waited > timeout:
                    break
        if len(out) < world:
            raise RuntimeError(
                f"the {world} spawned ranks returned {len(out)} results within {timeout:.0f} s"
            )
        procs.join()
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
        shutil.rmtree(store, ignore_errors=True)
    return [out[r] for r in range(world)]


def _spawned(rank: int, world: int, store: str, threads: int, results: Any,
             fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """One spawned rank: join the gloo group, run ``fn``, send its result back, leave the group."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results.put((rank, fn(rank, world, *args)))
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def _device() -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank_pieces(rank: int, world: int, selected: list[DistTask], device: str) -> list[Piece | str]:
    """This rank's piece of every task, or the ``"Type: message"`` of what it raised: a task that
    fails on one rank fails on every rank (they raise at the same collective), and the next
    task still runs."""
    out: list[Piece | str] = []
    for task in selected:
        try:
            out.append(_piece(rank, task, device))
        except Exception as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def _piece(rank: int, task: DistTask, device: str) -> Piece:
    """One rank's training step on its slice of ``task``'s batch, and its gradients."""
    import torch

    from convbn.api import conv_bn, to_backend
    from convbn.params import with_arrays
    from convbn.testing import as_numpy

    x, params, dy = inputs(task)
    dev = torch.device(device)
    native = to_backend(params, "torch", dev)
    fields = [f for f in _PARAM_GRADS if getattr(native, f) is not None]
    leaves = {f: getattr(native, f).clone().requires_grad_(True) for f in fields}
    xs = torch.from_numpy(to_layout(shard(task, x, rank), task.layout)).to(dev).requires_grad_(True)
    dys = torch.from_numpy(to_layout(shard(task, dy, rank), task.layout)).to(dev)
    y, new = conv_bn(xs, with_arrays(native, **leaves), training=True, data_format=task.layout, sync=True)
    (y * dys).sum().backward()
    grads = {"x": from_layout(as_numpy("torch", _grad(xs)), task.layout)}
    grads.update({f: as_numpy("torch", _grad(leaves[f])) for f in fields})
    return Piece(rank, from_layout(as_numpy("torch", y), task.layout), as_numpy("torch", new.moving_mean),
                 as_numpy("torch", new.moving_var), grads)


def _grad(t: Any) -> Any:
    """``t``'s gradient; zeros where autograd left none (nothing of ``t`` reached the loss)."""
    import torch

    return t.grad if t.grad is not None else torch.zeros_like(t)


def _check_all(device: str, selected: list[DistTask], per_rank: list[list[Piece | str]]) -> list[Result]:
    results: list[Result] = []
    for i, task in enumerate(selected):
        got = [pieces[i] for pieces in per_rank]
        crashes = [g for g in got if isinstance(g, str)]
        if crashes:
            results.append(_failed(device, task, crashes[0]))
        else:
            results += check(BACKEND, device, task, [g for g in got if isinstance(g, Piece)])
    return results


def _failed(device: str, task: DistTask, crash: str) -> Result:
    return Result(BACKEND, device, GROUP, task.dtype, task.label, "fail", detail=f"raised {crash}",
                  exception=crash)


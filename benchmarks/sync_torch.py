"""ConvBN2d(sync=True) against the nearest synchronized BatchNorm torch runs on CPU: 2 gloo ranks.

``nn.SyncBatchNorm`` refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU"),
and the fused statistics ops it is built on (``torch.batch_norm_stats``,
``batch_norm_gather_stats_with_counts``, ...) have no CPU kernels in torch 2.13. So the contenders
for one training step (forward, then backward of ``sum(y * dy)``) on each of 2 ranks are:

- ``convbn sync``: ``ConvBN2d(..., sync=True)``;
- ``naive sync``: ``nn.Conv2d`` + the synchronized BatchNorm people write for CPU/gloo from torch
  ops and the differentiable ``torch.distributed.nn.functional.all_reduce`` (detectron2's
  ``NaiveSyncBatchNorm``: per-channel ``E[x]`` and ``E[x^2]`` averaged over ranks, one
  all-reduce each way). It assumes equal batches and its ``E[x^2] - E[x]^2`` loses float32 at
  large means, so it is a speed reference, not a correct alternative;
- ``torch unsync``: ``nn.Conv2d`` + ``nn.BatchNorm2d``, each rank on its own batch, the step
  without collectives; ``convbn / torch unsync`` is the price of synchronizing.

Collectives need every rank to make the same calls, so a sample is a fixed number of steps (chosen
on rank 0 to last about ``--min-time`` seconds and broadcast), timed by wall clock; a step's time
is the slowest rank's. The contenders are interleaved (A B C, then C B A, ...) and each figure is
the median of ``--samples`` samples. Each rank gets half the machine's CPU threads.

Run: ``python -m benchmarks.sync_torch [--samples 7] [--min-time 0.5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORLD = 2
SHAPES = {  # name: per-rank (N, C, H, W), out channels, kernel, stride
    "8x32x28x28 -> 32, 3x3": ((8, 32, 28, 28), 32, 3, 1),
    "8x64x56x56 -> 64, 3x3": ((8, 64, 56, 56), 64, 3, 1),
    "16x128x14x14 -> 256, 3x3 s2": ((16, 128, 14, 14), 256, 3, 2),
}
CONTENDERS = ("convbn sync", "naive sync", "torch unsync")


def _naive_sync_bn(z: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any,
                   momentum: float, eps: float) -> Any:
    """detectron2-style synchronized BatchNorm from torch ops (training mode)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    c = z.shape[1]
    world = dist.get_world_size()
    mean = z.mean(dim=(0, 2, 3))
    meansqr = (z * z).mean(dim=(0, 2, 3))
    both = all_reduce(torch.cat([mean, meansqr])) / world
    mean, meansqr = both.split(c)
    var = meansqr - mean * mean
    with torch.no_grad():
        n = z.numel() // c * world
        running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)), alpha=momentum)
    scale = weight * torch.rsqrt(var + eps)
    shift = bias - mean * scale
    return z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def _steps(shape: tuple[Any, ...]) -> dict[str, Callable[[], None]]:
    """Each contender's training step on this rank, with the same weights and data."""
    import warnings

    import torch
    from torch import nn

    from convbn.torch import ConvBN2d

    (n, c, h, w), out, k, stride = shape
    torch.manual_seed(0)
    layer = ConvBN2d(c, out, k, stride, k // 2, sync=True)  # symmetric padding: nn.Conv2d's too
    conv = nn.Conv2d(c, out, k, stride, k // 2, bias=False)
    conv.load_state_dict(layer.conv.state_dict())
    bn = nn.BatchNorm2d(out)
    naive_bn = nn.BatchNorm2d(out)
    x = torch.randn(n, c, h, w)
    dy = torch.randn_like(layer(x))
    warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_reduce")

    def convbn_sync() -> None:
        (layer(x) * dy).sum().backward()

    def naive_sync() -> None:
        z = conv(x)
        y = _naive_sync_bn(z, naive_bn.weight, naive_bn.bias, naive_bn.running_mean, naive_bn.running_var,
                           0.1, naive_bn.eps)
        (y * dy).sum().backward()

    def torch_unsync() -> None:
        (bn(conv(x)) * dy).sum().backward()

    # The same numbers before timing (up to E[x^2] - E[x]^2 rounding), so the race is fair.
    with torch.no_grad():
        z = conv(x)
        ours = layer(x)
        stats = (torch.zeros(out), torch.ones(out))
        theirs = _naive_sync_bn(z, naive_bn.weight, naive_bn.bias, *stats, 0.1, naive_bn.eps)
    diff = float((ours - theirs).abs().max())
    assert diff < 1e-3, f"convbn sync and naive sync disagree by {diff}"
    return dict(zip(CONTENDERS, (convbn_sync, naive_sync, torch_unsync), strict=True))


def _bench(rank: int, world: int, samples: int, min_time: float) -> dict[str, dict[str, list[float]]]:
    """Per shape and contender, this rank's seconds per step in each sample."""
    import torch.distributed as dist

    out: dict[str, dict[str, list[float]]] = {}
    for name, shape in SHAPES.items():
        steps = _steps(shape)
        for fn in steps.values():  # warm-up
            fn()
            fn()
        start = time.perf_counter()
        for fn in steps.values():
            fn()
        per_round = time.perf_counter() - start
        calls = [max(1, round(min_time / (per_round / len(steps))))]
        dist.broadcast_object_list(calls, src=0)  # every rank makes the same number of calls
        times: dict[str, list[float]] = {c: [] for c in steps}
        for i in range(samples):
            order = list(steps.items()) if i % 2 == 0 else list(steps.items())[::-1]
            for contender, fn in order:
                dist.barrier()
                start = time.perf_counter()
                for _ in range(calls[0]):
                    fn()
                times[contender].append((time.perf_counter() - start) / calls[0])
        out[name] = times
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per sample and contender")
    args = parser.parse_args(argv)

    import torch

    from convbn.conformance._distributed_torch import spawn

    per_rank = spawn(WORLD, _bench, args.samples, args.min_time, timeout=3600)
    print(f"torch {torch.__version__}, {WORLD} gloo ranks on CPU, training step (forward + backward), "
          f"ms per step (slowest rank, median of {args.samples}; ratios: median of per-sample ratios)")
    print(f"| shape | {' | '.join(CONTENDERS)} | convbn / naive sync | convbn / torch unsync |")
    print("|---|" + "---|" * (len(CONTENDERS) + 2))
    for name in SHAPES:
        # Per sample, the slowest rank; ratios per sample, so load that drifts between samples
        # cancels out of them.
        slowest = {c: [max(r[name][c][i] for r in per_rank) for i in range(args.samples)] for c in CONTENDERS}
        ms = {c: 1e3 * statistics.median(v) for c, v in slowest.items()}
        cells = " | ".join(f"{ms[c]:.2f}" for c in CONTENDERS)
        ratios = [statistics.median(a / b for a, b in zip(slowest["convbn sync"], slowest[c], strict=True))
                  for c in ("naive sync", "torch unsync")]
        print(f"| {name} | {cells} | {ratios[0]:.3f} | {ratios[1]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

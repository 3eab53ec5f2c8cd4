"""convbn.torch.ConvBN2d against nn.Sequential(nn.Conv2d, nn.BatchNorm2d): time per call.

Both contenders hold the same weights and compute the same thing (symmetric padding, so torch's
own modules express it; TF-SAME at stride 2 gets ``nn.ZeroPad2d`` in front of the native stack, as
torch ports of TF models do). Each is warmed up, then timed in alternating order so load from other
processes hits both alike; a sample is the mean over enough calls to last ``--min-time`` seconds and
the figure is the median of ``--samples`` samples. On CPU the clock is the process's CPU time by
default (``--clock wall`` for wall time), which other processes on a shared machine barely move.

Run: ``python benchmarks/torch_layer.py [--device cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convbn.geometry import same_pads
from convbn.torch import ConvBN2d

SHAPES = {  # name: (N, C, H, W, out, k, stride)
    "tiny 1x16x8x8 3x3": (1, 16, 8, 8, 16, 3, 1),
    "resnet 8x64x56x56 3x3": (8, 64, 56, 56, 64, 3, 1),
    "down 8x64x56x56 3x3 s2 SAME": (8, 64, 56, 56, 128, 3, 2),
}


def contenders(shape: tuple[int, ...], device: str) -> tuple[ConvBN2d, nn.Sequential, torch.Tensor]:
    n, c, h, w, out, k, stride = shape
    torch.manual_seed(0)
    layer = ConvBN2d(c, out, k, stride, "SAME").to(device)
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.normal_()
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2.0)
    (pt, pb), (pl, pr) = same_pads(h, k, stride, 1), same_pads(w, k, stride, 1)
    pad = [] if (pt, pl) == (pb, pr) else [nn.ZeroPad2d((pl, pr, pt, pb))]
    conv = nn.Conv2d(c, out, k, stride, (pt, pl) if not pad else 0, bias=False)
    native = nn.Sequential(*pad, conv, nn.BatchNorm2d(out)).to(device)
    native[-2].load_state_dict(layer.conv.state_dict())
    native[-1].load_state_dict(layer.bn.state_dict())
    return layer, native, torch.randn(n, c, h, w, device=device)


def timed(fn: Callable[[], object], sync: Callable[[], None], min_time: float, clock: Callable[[], float]) -> float:
    calls, start = 0, clock()
    while True:
        fn()
        calls += 1
        if calls % 4 == 0:
            sync()
            elapsed = clock() - start
            if elapsed >= min_time:
                return elapsed / calls


def interleaved(a: Callable[[], object], b: Callable[[], object], sync: Callable[[], None],
                samples: int, min_time: float, clock: Callable[[], float]) -> tuple[float, float]:
    for _ in range(5):
        a(), b()
    sync()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(samples):
        order = [(a, ta), (b, tb)] if i % 2 == 0 else [(b, tb), (a, ta)]
        for fn, out in order:
            out.append(timed(fn, sync, min_time, clock))
    return statistics.median(ta), statistics.median(tb)


def step(module: nn.Module, x: torch.Tensor, ctx: Callable[[], Any], training: bool) -> torch.Tensor:
    with ctx():
        y = module(x)
        if training:
            y.sum().backward()
    return y  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.2)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="on CPU: time the process's CPU time (default) or wall time")
    parser.add_argument("--shape", action="append", choices=[label.split()[0] for label in SHAPES],
                        help="only these shapes (repeatable); default all")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # On a CPU shared with other work, the process's own CPU time is far steadier than wall time.
    clock = time.perf_counter if cuda or args.clock == "wall" else time.process_time
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, {'wall' if clock is time.perf_counter else 'process CPU'} time")
    print(f"{'shape':30s} {'mode':15s} {'nn.Sequential':>14s} {'ConvBN2d':>12s} {'ratio':>6s}")
    for label, shape in SHAPES.items():
        if args.shape and label.split()[0] not in args.shape:
            continue
        layer, native, x = contenders(shape, args.device)
        for mode in ("eval no_grad", "eval inference", "eval grad", "train fwd+bwd"):
            training = mode.startswith("train")
            layer.train(training)
            native.train(training)
            if mode == "eval inference":
                ctx: Callable[[], Any] = torch.inference_mode
            elif mode == "eval no_grad":
                ctx = torch.no_grad
            else:
                ctx = torch.enable_grad

            a = functools.partial(step, native, x, ctx, training)
            b = functools.partial(step, layer, x, ctx, training)
            t_native, t_layer = interleaved(a, b, sync, args.samples, args.min_time, clock)
            print(f"{label:30s} {mode:15s} {t_native * 1e6:11.1f} us {t_layer * 1e6:9.1f} us {t_layer / t_native:6.2f}")


if __name__ == "__main__":
    main()

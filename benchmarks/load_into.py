"""``convbn.load_into`` against ``load_state_dict`` on a torchvision-style ResNet-50 (torch).

The model is ResNet-50 written with torch's ordinary layers (53 conv+BatchNorm pairs, bottleneck
blocks with a residual add, a ``fc`` head; 23.5M conv parameters). A random instance's state_dict is
saved once; then, interleaved, a fresh model loads it with ``model.load_state_dict(torch.load(...))``
and another with ``convbn.load_into(model, path)`` (torch.fx tracing, matching, staging, the
rollback copy and the writes). Reported: the median and minimum process CPU time of each, and that
the loaded models compute the source's outputs (``load_into`` fills the ``fc`` head too).

    python benchmarks/load_into.py [--repeats 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def resnet50() -> object:
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int, down: bool) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = (
                nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width))
                if down else None
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + identity)

    class ResNet50(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
            stages, cin = [], 64
            for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                stage = []
                for i in range(blocks):
                    stage.append(Bottleneck(cin, width, stride if i == 0 else 1, i == 0))
                    cin = 4 * width
                stages.append(nn.Sequential(*stage))
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.fc = nn.Linear(2048, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(x.mean((2, 3)))

    return ResNet50().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    import torch

    import convbn

    torch.manual_seed(0)
    source = resnet50()
    with torch.no_grad():
        for module in source.modules():  # statistics that differ from a fresh model's
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    path = Path(tempfile.mkdtemp()) / "resnet50.pt"
    torch.save(source.state_dict(), path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = source(x)
    times: dict[str, list[float]] = {"load_state_dict": [], "load_into": []}
    for _ in range(args.repeats):
        model = resnet50()
        start = time.process_time()
        model.load_state_dict(torch.load(path, weights_only=True))
        times["load_state_dict"].append(time.process_time() - start)
        model = resnet50()
        start = time.process_time()
        report = convbn.load_into(model, path)
        times["load_into"].append(time.process_time() - start)
        with torch.no_grad():
            error = float((model(x) - want).abs().max() / want.abs().max())
        assert report.ok and len(report.matched) == 54 and report.parts == {"fc": "dense"} and error == 0.0, (
            report.summary(), error)
    for name, values in times.items():
        print(f"{name:16s} CPU time: median {statistics.median(values):.2f} s, min {min(values):.2f} s")
    print(f"torch {torch.__version__}, {args.repeats} repeats, outputs identical to the source's")


if __name__ == "__main__":
    main()

"""Whole conv nets built the way torchvision and timm build them, small enough for CPU tests.

Each has every layer kind a real model brings: a ResNet with basic and bottleneck blocks
(``downsample`` after ``conv3``, as torchvision lists it) and a classifier ``fc``; a MobileNetV2
with depthwise convs and a ``Dropout`` + ``Linear`` classifier; an EfficientNet-style block with
squeeze-excite convs (a conv with bias and no BatchNorm), a ``BatchNorm1d`` after a ``Linear`` and
a classifier. :func:`randomize` gives every parameter and BatchNorm statistic random values, so a
conversion that drops, swaps or mis-lays any tensor changes the output.

Importing this module imports torch: only tests that need torch may import it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else None
        )

    def forward(self, x: Any) -> Any:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int = 1, expansion: int = 4) -> None:
        super().__init__()
        cout = width * expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else None
        )

    def forward(self, x: Any) -> Any:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """A stem, one stage of basic blocks, one of bottlenecks (its first ``conv3`` and
    ``downsample.0`` both 1x1 16->32: same-shaped), global pooling and ``fc``."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.layer2 = nn.Sequential(Bottleneck(16, 8, stride=1), Bottleneck(32, 8))
        self.fc = nn.Linear(32, classes)

    def forward(self, x: Any) -> Any:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(x.mean((2, 3)), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Any) -> Any:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's layout: ``features.N`` (conv, BN, ReLU6 triples and inverted residuals with
    depthwise convs) and ``classifier = Sequential(Dropout, Linear)``."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
            nn.Sequential(nn.Conv2d(12, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6()),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, classes))

    def forward(self, x: Any) -> Any:
        return self.classifier(torch.flatten(self.features(x).mean((2, 3)), 1))


class SqueezeExcite(nn.Module):
    """timm's ``SqueezeExcite``: two 1x1 convs with bias and no BatchNorm."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: Any) -> Any:
        s = self.conv_expand(torch.relu(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class EfficientBlock(nn.Module):
    """An EfficientNet-style net: a stem conv with bias (no BatchNorm), an MBConv (expand,
    depthwise, squeeze-excite, project), a head conv, and a classifier ``Linear`` ->
    ``BatchNorm1d`` -> ``Linear``."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=True)
        self.conv_pw = nn.Conv2d(8, 16, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv_dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.se = SqueezeExcite(16, 4)
        self.conv_pwl = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.pre_logits = nn.Linear(8, 12)
        self.head_bn = nn.BatchNorm1d(12)
        self.classifier = nn.Linear(12, classes)

    def forward(self, x: Any) -> Any:
        x = torch.relu(self.conv_stem(x))
        y = torch.relu(self.bn1(self.conv_pw(x)))
        y = torch.relu(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(self.se(y)))
        x = (x + y).mean((2, 3))
        return self.classifier(torch.relu(self.head_bn(self.pre_logits(x))))


class Decoder(nn.Module):
    """A DCGAN-style upsampler: a conv + BatchNorm, a ``ConvTranspose2d`` without bias + BatchNorm
    (stride 2, TF's SAME window for k=4), and a last ``ConvTranspose2d`` with its bias."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, bias=False)
        self.up_bn = nn.BatchNorm2d(6)
        self.head = nn.ConvTranspose2d(6, 3, 3, stride=1, padding=1)

    def forward(self, x: Any) -> Any:
        x = torch.relu(self.stem_bn(self.stem(x)))
        return torch.tanh(self.head(torch.relu(self.up_bn(self.up(x)))))


NETS = {"resnet": ResNet, "mobilenet_v2": MobileNetV2, "efficient": EfficientBlock, "decoder": Decoder}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with every parameter and BatchNorm statistic drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                tensor.fill_(7)  # num_batches_tracked: a value a writer's default 0 would not give
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return model.eval()


def build(name: str, seed: int = 0) -> nn.Module:
    """The net ``name`` of :data:`NETS`, randomized."""
    return randomize(NETS[name](), seed)

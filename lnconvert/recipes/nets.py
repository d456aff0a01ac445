"""Networks the recipes train: a small BN ResNet and the Linked Neurons depth-experiment net."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from ..nn import LinkedActivation
from .config import RecipeError


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block (conv-BN-ReLU-conv-BN + shortcut, ReLU), own ReLUs."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1, self.relu1 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small ResNet with BatchNorm: 3x3 stem, one stage per width (stride 2 after the first)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
                 blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, width in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if i > 0 and b == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


# --- the depth experiment (Linked Neurons, section 4) ----------------------------------
def _act(base: Callable[[int], nn.Module], linked: bool) -> Callable[[int], tuple[nn.Module, int]]:
    """Activation factory: (module, output channels) for ``c`` input channels."""
    def make(c: int) -> tuple[nn.Module, int]:
        return (LinkedActivation(base(c)), 2 * c) if linked else (base(c), c)
    return make


VARIANTS: dict[str, tuple[Callable[[int], tuple[nn.Module, int]], bool]] = {  # name -> (activation, BN)
    "relu": (_act(lambda c: nn.ReLU(), False), False),
    "prelu": (_act(lambda c: nn.PReLU(c), False), False),
    "silu": (_act(lambda c: nn.SiLU(), False), False),
    "selu": (_act(lambda c: nn.SELU(), False), False),
    "linked_relu": (_act(lambda c: nn.ReLU(), True), False),
    "linked_selu": (_act(lambda c: nn.SELU(), True), False),
    "relu_bn": (_act(lambda c: nn.ReLU(), False), True),
}
# Normalisation strategies of papers.md built in another branch: reported as pending here.
PENDING = {"normprop": "NormProp", "deep_control": "Deep Control", "lcw_sigmoid": "LCW + sigmoid"}


def plain_deep_net(variant: str, depth: int = 50, width: int = 4, in_channels: int = 1, num_classes: int = 10,
                   input_size: int = 32, stem_kernel: int = 7, stem_stride: int = 2) -> nn.Sequential:
    """The paper's plain net: a ``stem_kernel`` / ``stem_stride`` conv, ``depth`` 3x3 convs of
    ``width`` filters, each followed by the activation (BN before it for ``relu_bn``), then a
    dense layer on the flattened maps. Glorot-uniform weights, zero biases (Keras defaults,
    as in the paper). Linked variants double the channels each consumer reads."""
    if variant not in VARIANTS:
        raise RecipeError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    act, bn = VARIANTS[variant]
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    cin = in_channels
    for i in range(depth + 1):
        kernel, stride = (stem_kernel, stem_stride) if i == 0 else (3, 1)
        layers[f"conv{i}"] = nn.Conv2d(cin, width, kernel, stride, kernel // 2, bias=not bn)
        if bn:
            layers[f"bn{i}"] = nn.BatchNorm2d(width)
        layers[f"act{i}"], cin = act(width)
    side = (input_size + 2 * (stem_kernel // 2) - stem_kernel) // stem_stride + 1
    layers["flatten"] = nn.Flatten()
    layers["dense"] = nn.Linear(cin * side * side, num_classes)
    net = nn.Sequential(layers)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return net

"""Networks the recipes train: a small BN ResNet and the Linked Neurons depth-experiment net."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

from ..nn import DeepControl2d, LinkedActivation, NormPropConv2d, ReLURenorm, lcw
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


_RELU = _act(lambda c: nn.ReLU(), False)
# name -> (activation, normalisation: None | "bn" | "normprop" | "deep_control" | "lcw"; docs/strategies.md)
VARIANTS: dict[str, tuple[Callable[[int], tuple[nn.Module, int]], str | None]] = {
    "relu": (_RELU, None),
    "prelu": (_act(lambda c: nn.PReLU(c), False), None),
    "silu": (_act(lambda c: nn.SiLU(), False), None),
    "selu": (_act(lambda c: nn.SELU(), False), None),
    "linked_relu": (_act(lambda c: nn.ReLU(), True), None),
    "linked_selu": (_act(lambda c: nn.SELU(), True), None),
    "relu_bn": (_RELU, "bn"),
    "normprop": (_RELU, "normprop"),          # NormPropConv2d -> ReLU -> ReLURenorm, inputs standardised once
    "deep_control": (_RELU, "deep_control"),  # conv -> DeepControl2d -> ReLU
    "lcw_sigmoid": (_act(lambda c: nn.Sigmoid(), False), "lcw"),  # zero-sum (LCW) convs, sigmoid
}


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed training-set statistics (NormProp standardises its
    inputs once; the other variants see the data as it is)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def plain_deep_net(variant: str, depth: int = 50, width: int = 4, in_channels: int = 1, num_classes: int = 10,
                   input_size: int = 32, stem_kernel: int = 7, stem_stride: int = 2,
                   input_stats: tuple[float, float] = (0.0, 1.0)) -> nn.Sequential:
    """The paper's plain net: a ``stem_kernel`` / ``stem_stride`` conv, ``depth`` 3x3 convs of
    ``width`` filters, each followed by the activation, then a dense layer on the flattened
    maps. Glorot-uniform weights, zero biases (Keras defaults, as in the paper). Linked
    variants double the channels each consumer reads. The normalisation variants: ``relu_bn``
    puts a BatchNorm before each activation, ``deep_control`` a DeepControl2d; ``normprop``
    uses NormPropConv2d layers, re-normalises after each ReLU and standardises the input
    with ``input_stats`` (mean, std); ``lcw_sigmoid`` constrains every conv to zero-sum
    weights per filter (the dense layer stays free)."""
    if variant not in VARIANTS:
        raise RecipeError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    act, norm = VARIANTS[variant]
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if norm == "normprop":
        layers["standardize"] = Standardize(*input_stats)
    conv_type = NormPropConv2d if norm == "normprop" else nn.Conv2d
    cin = in_channels
    for i in range(depth + 1):
        kernel, stride = (stem_kernel, stem_stride) if i == 0 else (3, 1)
        layers[f"conv{i}"] = conv_type(cin, width, kernel, stride, kernel // 2, bias=norm != "bn")
        if norm == "bn":
            layers[f"bn{i}"] = nn.BatchNorm2d(width)
        elif norm == "deep_control":
            layers[f"dc{i}"] = DeepControl2d(width)
        layers[f"act{i}"], cin = act(width)
        if norm == "normprop":
            layers[f"renorm{i}"] = ReLURenorm()
    side = (input_size + 2 * (stem_kernel // 2) - stem_kernel) // stem_stride + 1
    layers["flatten"] = nn.Flatten()
    layers["dense"] = nn.Linear(cin * side * side, num_classes)
    net = nn.Sequential(layers)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):  # this recipe builds the net: its own layer types
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    if norm == "lcw":
        for module in net.modules():
            if isinstance(module, nn.Conv2d):  # the recipe's own convs (its dense head stays free)
                lcw(module)
    return net

"""Normalization Propagation (Arpit et al., ICML 2016): weight-normalised conv / linear
layers and the ReLU re-normalisation that keeps pre-activations unit Gaussian without
batch statistics (formulas in ``docs/strategies.md``)."""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import CONV, LINEAR, add_forms, layer_spec, register_layer

NORMPROP_C = 1.21  # the co-authors' code divides every dense and conv pre-activation by it
RELU_MEAN = math.sqrt(1 / (2 * math.pi))             # E[relu(u)] for u ~ N(0, 1)
RELU_STD = math.sqrt(0.5 - 1 / (2 * math.pi))        # std[relu(u)] for u ~ N(0, 1)
_EPS = 1e-12  # an all-zero filter (pruned) yields its bias instead of 0/0


class _NormProp:
    """``u_j = gamma_j * (W_j . x) / (c * ||W_j||_2) + b_j``, the norm over all of unit j's
    weights (C_in/groups * prod(kernel) for a conv), computed as an effective weight so
    the layer is one ordinary conv / matmul (and exports as one)."""

    weight: torch.Tensor
    gamma: nn.Parameter
    c: float

    def _init_normprop(self, c: float) -> None:
        self.c = c
        self.gamma = nn.Parameter(torch.ones(self.weight.shape[0], dtype=self.weight.dtype,
                                             device=self.weight.device))

    def weight_norm(self) -> torch.Tensor:
        """``||W_j||_2`` per output unit."""
        return self.weight.flatten(1).norm(dim=1)

    def effective_weight(self) -> torch.Tensor:
        scale = self.gamma / (self.c * self.weight_norm().clamp(min=_EPS))
        return self.weight * scale.view(-1, *([1] * (self.weight.dim() - 1)))


class NormPropLinear(_NormProp, nn.Linear):
    """NormProp dense layer: ``gamma * (W x) / (c ||W_j||) + b`` (``gamma`` initialised to 1)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, c: float = NORMPROP_C, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, bias, **kwargs)
        self._init_normprop(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    @classmethod
    def from_layer(cls, module: nn.Module, c: float = NORMPROP_C) -> "NormPropLinear":
        """The NormProp layer computing what the linear ``module`` computes (:func:`normprop_from`)."""
        weight = module.weight.detach()
        layer = cls(module.in_features, module.out_features, True, c, device=weight.device, dtype=weight.dtype)
        return _copy_exactly(module, layer, c)


class _NormPropConv(_NormProp):
    def __init__(self, *args, c: float = NORMPROP_C, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_normprop(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    @classmethod
    def from_layer(cls, module: nn.Module, c: float = NORMPROP_C) -> "_NormPropConv":
        """The NormProp layer computing what the conv ``module`` computes (:func:`normprop_from`)."""
        weight = module.weight.detach()
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, True, module.padding_mode, c=c, device=weight.device,
                    dtype=weight.dtype)
        return _copy_exactly(module, layer, c)


class NormPropConv1d(_NormPropConv, nn.Conv1d):
    """NormProp Conv1d (same arguments as ``nn.Conv1d`` plus ``c``)."""


class NormPropConv2d(_NormPropConv, nn.Conv2d):
    """NormProp Conv2d (same arguments as ``nn.Conv2d`` plus ``c``): per output filter,
    ``gamma * conv(x, W) / (c ||W_j||) + b``."""


class NormPropConv3d(_NormPropConv, nn.Conv3d):
    """NormProp Conv3d (same arguments as ``nn.Conv3d`` plus ``c``)."""


def _copy_exactly(module: nn.Module, layer: nn.Module, c: float) -> nn.Module:
    """``layer`` given ``module``'s weight, ``gamma_j = c * ||W_j||`` and its bias (zero when it had
    none), so it computes exactly what ``module`` computes; buffers (the widen pass's twin marks) are kept."""
    weight = module.weight.detach()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(module.bias.detach() if module.bias is not None else torch.zeros_like(layer.bias))
        layer.gamma.copy_(c * weight.double().flatten(1).norm(dim=1))
    layer.weight.requires_grad_(module.weight.requires_grad)
    for name, buffer in module.named_buffers(recurse=False):
        layer.register_buffer(name, buffer.clone(), persistent=name not in module._non_persistent_buffers_set)
    return layer


def normprop_from(module: nn.Module, c: float = NORMPROP_C) -> nn.Module:
    """The NormProp layer computing exactly what ``module`` (conv / linear) computes: same
    weight, ``gamma_j = c * ||W_j||``, same bias (zero when it had none); buffers (e.g. the
    widen pass's twin marks) are kept. Which NormProp class fits is the layer registry's answer."""
    spec = layer_spec(module)
    if spec is None or spec.normprop is None:
        raise TypeError(f"no NormProp form for {type(module).__name__}")
    return spec.normprop.from_layer(module, c)


# NormProp layers compute through an effective weight and absorb like their family; no BN is ever
# folded into one (fold_bn runs before the NormProp pass creates them)
for _layer, _base in ((NormPropConv1d, nn.Conv1d), (NormPropConv2d, nn.Conv2d), (NormPropConv3d, nn.Conv3d),
                      (NormPropLinear, nn.Linear)):
    register_layer(_layer, replace(LINEAR if _base is nn.Linear else CONV, folds_bn=False))
    add_forms(_base, normprop=_layer)


class ReLURenorm(nn.Module):
    """NormProp's re-normalisation after a ReLU: ``(x - sqrt(1/2pi)) / sqrt(1/2 - 1/2pi)``,
    so a ReLU of a unit Gaussian is zero-mean and unit-variance again. Constant (no
    parameters); use it right after ``nn.ReLU`` (or a linked ReLU: it is elementwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - RELU_MEAN) / RELU_STD

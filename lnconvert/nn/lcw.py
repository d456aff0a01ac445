"""Linearly Constrained Weights (Kutsuna, 2019): every output unit's weights sum to zero.

``lcw(module)`` reparametrises a Conv1d/2d/3d or Linear weight with
``torch.nn.utils.parametrize`` as ``w = v - mean(v)`` over each output unit's fan-in
(C_in/groups * prod(kernel): a grouped conv's filter only spans its own group, so the
constraint holds per group), which is the orthogonal projection onto ``w . 1 = 0``.
Gradients flow through the projection, so the constraint holds after any optimiser step.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layers import layer_spec


class ZeroSumFanIn(nn.Module):
    """Parametrization ``w -> w - mean(w)`` over every axis but the first (output units)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)


def is_lcw(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, ZeroSumFanIn) for p in module.parametrizations["weight"])  # ours, not a layer type


def lcw(module: nn.Module) -> nn.Module:
    """Constrain ``module.weight`` (a registered layer with an LCW form: Conv1d/2d/3d, Linear,
    the NormProp layers, timm's Conv2dSame) to zero sum per output unit, in place; returns the
    module. The stored
    ``parametrizations.weight.original`` keeps the current values, so a weight that already
    sums to zero is unchanged."""
    spec = layer_spec(module)
    if spec is None or not spec.lcw:
        raise TypeError(f"lcw supports Conv1d/2d/3d and Linear (layers registered with an LCW form), "
                        f"got {type(module).__name__}")
    if not is_lcw(module):
        parametrize.register_parametrization(module, "weight", ZeroSumFanIn())
    return module

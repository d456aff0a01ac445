"""A per-channel affine: what an eval-mode BatchNorm becomes where it cannot be folded."""
from __future__ import annotations

import torch
from torch import nn


def broadcast_shape(dim: int, ndim: int) -> list[int]:
    """The shape that broadcasts a per-channel vector along axis ``dim`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return shape


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel: an eval-mode BatchNorm without batch statistics."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, dim: int = 1):
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = broadcast_shape(self.dim, x.dim())
        return x * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, dim={self.dim}"

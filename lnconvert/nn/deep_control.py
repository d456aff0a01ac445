"""Deep Control (Ruff, 2017): a per-sample, per-map gain control after a convolution."""
from __future__ import annotations

import torch
from torch import nn


class DeepControl2d(nn.Module):
    """``y = weight_c * (z - alpha_c * mean_{spatial}(z)) + bias_c`` for every sample and
    channel c (docs/strategies.md). The mean is over every axis after the channel axis, so
    the layer also serves 1D and 3D maps; it never mixes samples, so its output for a
    sample is the same alone or inside any batch, in training and in eval.

    From scratch the defaults subtract the whole map mean (``alpha = 1``) and leave the
    scale to learning; a converted BatchNorm starts at ``alpha = 0`` with the BN's
    eval-mode scale and shift, which is exactly the BN (:meth:`from_scale_shift`).
    """

    def __init__(self, channels: int, alpha: float = 1.0, **factory):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((channels,), float(alpha), **factory))
        self.weight = nn.Parameter(torch.ones(channels, **factory))
        self.bias = nn.Parameter(torch.zeros(channels, **factory))

    @classmethod
    def from_scale_shift(cls, scale: torch.Tensor, shift: torch.Tensor) -> "DeepControl2d":
        layer = cls(scale.numel(), alpha=0.0, dtype=scale.dtype, device=scale.device)
        with torch.no_grad():
            layer.weight.copy_(scale)
            layer.bias.copy_(shift)
        return layer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        mean = z.mean(dim=tuple(range(2, z.dim())), keepdim=True)
        return self.weight.view(shape) * (z - self.alpha.view(shape) * mean) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.alpha.numel()}"

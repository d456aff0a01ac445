"""Helpers for parity tests and benchmarks: non-trivial BatchNorm statistics."""
from __future__ import annotations

import torch
from torch import nn

from .rules import is_frozen_batchnorm
from .tasks import task_of


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, example: torch.Tensor | tuple, seed: int = 0) -> nn.Module:
    """Give every BatchNorm realistic, non-trivial eval statistics, in place.

    Default statistics (mean 0, var 1, weight 1, bias 0) make folding trivially exact.
    Here affine weights and biases are drawn at random, running statistics are measured on
    ``example`` (a batch, or a tuple of the model's arguments; cumulative average, train mode)
    and then perturbed, so folding and affine
    conversion are exercised with values like a trained network's, and activations stay
    well scaled (no chaotic growth that float32 cannot compare).
    """
    generator = torch.Generator().manual_seed(seed)
    # torch's trainable BatchNorms (timm's BN-act subclasses too): statistics measured in train mode;
    # frozen ones (no training mode) are handled below
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def uniform(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype).uniform_(low, high, generator=generator)

    for m in norms:  # affine first, so the measured statistics match what flows in eval
        if m.affine:
            m.weight.copy_(uniform(m.weight, 0.5, 1.5))
            m.bias.copy_(torch.randn(m.bias.shape, generator=generator, dtype=m.bias.dtype) * 0.3)
    saved = [(m, m.momentum) for m in norms]
    flags = [(m, m.training) for m in model.modules()]
    for m in norms:
        if m.track_running_stats:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the example
    # detection models need targets in training mode: there only the BatchNorms train
    for module in norms if task_of(model) == "detection" else model.modules():
        module.train()
    model(*(example if isinstance(example, tuple) else (example,)))
    for module, flag in flags:
        module.training = flag
    for m, momentum in saved:
        m.momentum = momentum
    for m in norms:  # then move the statistics off the measured values
        if m.track_running_stats:
            noise = torch.randn(m.running_mean.shape, generator=generator, dtype=m.running_mean.dtype)
            m.running_mean.add_(noise * 0.1 * m.running_var.sqrt())
            m.running_var.mul_(uniform(m.running_var, 0.8, 1.25))
    for m in model.modules():  # frozen BNs have no batch statistics to measure: near-identity values
        if is_frozen_batchnorm(m):
            m.weight.copy_(uniform(m.weight, 0.5, 1.5))
            m.bias.copy_(torch.randn(m.bias.shape, generator=generator, dtype=m.bias.dtype) * 0.3)
            mean = m.running_mean
            mean.copy_(torch.randn(mean.shape, generator=generator, dtype=mean.dtype) * 0.3)
            m.running_var.copy_(uniform(m.running_var, 0.5, 2.0))
    return model

"""Running statistics for BatchNorm layers that have none (``track_running_stats=False``).

Such a BN normalises every batch with that batch's own statistics, even in eval mode, so it
is a function of the batch and cannot be folded. Calibration gives it fixed statistics
estimated on user data; the calibrated model (not the batch-dependent original) is then
what the conversion reproduces exactly.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from .errors import UsageError, one_line
from .options import renamed_argument
from .rules import is_batchnorm_like


def batchnorm_without_stats(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules that normalise with batch statistics in eval mode."""
    return [name for name, m in model.named_modules() if is_batchnorm_like(m) and m.running_mean is None]


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, data: Iterable[torch.Tensor] | None = None, *,
                        batches: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode in which every BatchNorm without running statistics
    has them: the mean and variance of its inputs over all ``data`` batches (a cumulative
    average, as ``momentum=None`` gives). Everything else runs in eval mode meanwhile, so BNs
    that have statistics, dropout etc. are untouched. ``model`` itself is not modified.
    ``batches`` is the deprecated name of ``data``."""
    data = renamed_argument(data, batches, "batches", "data", "calibrate_batchnorm")
    if data is None:
        raise UsageError("calibrate_batchnorm needs data (batches of inputs)")
    calibrated = copy.deepcopy(model).eval()
    names = batchnorm_without_stats(calibrated)
    momenta = {}
    for name in names:
        bn = calibrated.get_submodule(name)
        like = bn.weight if bn.weight is not None else next(calibrated.parameters())
        bn.register_buffer("running_mean", torch.zeros(bn.num_features, dtype=like.dtype, device=like.device))
        bn.register_buffer("running_var", torch.ones(bn.num_features, dtype=like.dtype, device=like.device))
        bn.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=like.device))
        bn.track_running_stats, momenta[name], bn.momentum = True, bn.momentum, None
        bn.train()
    samples = 0
    for batch in data:
        try:
            calibrated(batch)
        except Exception as exc:
            raise UsageError(f"the model does not run on calibration data of shape {tuple(batch.shape)}: "
                             f"{one_line(exc)}") from exc
        samples += batch.shape[0]
    if names and samples == 0:
        raise UsageError("calibration data is empty")
    for name in names:
        bn = calibrated.get_submodule(name)
        bn.momentum = momenta[name]
        bn.eval()
    return calibrated

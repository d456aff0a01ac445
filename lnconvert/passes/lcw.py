"""LCW strategy: project every conv / linear weight onto zero sum per output unit."""
from __future__ import annotations

import torch
from torch import fx, nn

from ..finetune import twin_masks
from ..layers import layer_spec
from ..nn import lcw
from ..options import PassContext


def _twin_entries(module: nn.Module) -> torch.Tensor:
    """Boolean mask over ``module.weight``: the twin columns set by the widen pass."""
    weight = module.weight
    masks = twin_masks(module)
    if "weight" not in masks:
        return torch.zeros_like(weight, dtype=torch.bool)
    mask, start = masks["weight"]
    shape = (1,) * start + tuple(mask.shape) + (1,) * (weight.dim() - start - mask.dim())
    return mask.view(shape).expand_as(weight)


def project(module: nn.Module) -> float:
    """Subtract, per output unit, the mean of its primary weights from them (twin columns,
    zero at conversion, stay zero), so every unit's fan-in sums to 0; then constrain the
    weight with :func:`lnconvert.nn.lcw`. Returns ``||W_new - W|| / ||W||``."""
    weight = module.weight.detach()
    twins = _twin_entries(module)
    dims = tuple(range(1, weight.dim()))
    primaries = (~twins).to(weight.dtype)
    mean = (weight * primaries).sum(dims, keepdim=True) / primaries.sum(dims, keepdim=True).clamp(min=1)
    projected = torch.where(twins, weight, weight - mean)
    change = float((projected - weight).norm() / weight.norm().clamp(min=1e-30))
    with torch.no_grad():
        module.weight.copy_(projected)
    lcw(module)
    return change


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Every Conv1d/2d/3d and Linear (NormProp layers included) gets its weights projected
    onto the zero-sum subspace of each output unit's fan-in and keeps that constraint while
    training (``torch.nn.utils.parametrize``). Transposed convs are left as they are.
    Changes the function by design (Kutsuna's LCW is a retraining strategy): records each
    layer's relative weight change; the caller measures the output deviation.
    """
    for name, module in list(gm.named_modules()):  # lcw() adds parametrization submodules
        spec = layer_spec(module)
        if spec is not None and not spec.lcw:
            ctx.report.norm_layer(name, "lcw", "not applied", f"no LCW form for {type(module).__name__}")
        elif spec is not None:
            ctx.report.lcw_layers.append({"layer": name, "rel_weight_change": project(module)})
    return gm

"""Fine-tuning helpers: give the twin half of a converted model its own parameter group.

A widened consumer holds primary and twin input columns in *one* weight tensor, and an
optimiser's parameter group is a set of whole tensors. Scaling gradients per element with
hooks would not give twins their own learning rate under Adam (which divides the scale
out) nor their own weight decay, so :func:`split_twins` separates them instead: each such
weight becomes two leaf parameters, primaries and twins, recombined on every forward by
``torch.nn.utils.parametrize`` (one ``cat`` + ``index_select``). :func:`merge_twins`
turns them back into plain weights; :func:`lnconvert.save` stores plain weights either way.

Which entries are twins comes from the widen pass: every widened module carries the
physical twin channels of its input (``layers.TWIN_BUFFER``).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import UsageError
from .layers import TWIN_BUFFER, layer_spec
from .nn import GatedMerge, LinkedActivation


class TwinSplit(nn.Module):
    """Parametrization ``weight = merge(primary, twin)``.

    Twins are the entries whose index over dims ``[start, start + mask.ndim)`` is True in
    ``mask``; those dims are flattened into one axis of the stored parts, so each part is
    ``shape[:start] + (n,) + shape[start + mask.ndim:]`` (for a conv whose twin columns are
    the same in every row: ``(out, n_primary | n_twin, kh, kw)``).
    """

    def __init__(self, shape: torch.Size, mask: torch.Tensor, start: int):
        super().__init__()
        self.shape, self.start, self.span = tuple(shape), start, mask.ndim
        flat = mask.reshape(-1)
        primary, twin = (~flat).nonzero().squeeze(1), flat.nonzero().squeeze(1)
        self.register_buffer("primary_index", primary, persistent=False)
        self.register_buffer("twin_index", twin, persistent=False)
        self.register_buffer("inverse", torch.argsort(torch.cat([primary, twin])), persistent=False)

    def _flat(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(self.start, self.start + self.span - 1)

    def forward(self, primary: torch.Tensor, twin: torch.Tensor) -> torch.Tensor:
        merged = torch.cat([primary, twin], dim=self.start).index_select(self.start, self.inverse)
        return merged.reshape(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self._flat(weight)
        return flat.index_select(self.start, self.primary_index), flat.index_select(self.start, self.twin_index)


def _isin(size: int, twins: torch.Tensor) -> torch.Tensor:
    """Boolean mask of length ``size``, True at ``twins`` (a lookup table: ``torch.isin`` over
    every weight entry took 0.1 s per resnet18 conv)."""
    mask = torch.zeros(size, dtype=torch.bool, device=twins.device)
    mask[twins] = True
    return mask


def twin_masks(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """``{param name: (mask, start dim)}`` of a module marked by the widen pass; empty otherwise."""
    twins = getattr(module, TWIN_BUFFER, None)
    if twins is None:
        return {}
    spec = layer_spec(module)
    if spec is not None and not spec.grouped_input:  # linear (out, in), transposed conv (in, out/groups, *k)
        return {"weight": (_isin(spec.in_channels(module), twins), spec.weight_in_axis)}
    if spec is not None:  # conv weight (out, in/groups, *k): a column is local to its row's group
        out, per_group = module.weight.shape[:2]
        group_of_row = torch.arange(out) // (out // module.groups)
        physical = group_of_row[:, None] * per_group + torch.arange(per_group)[None, :]
        mask = _isin(spec.in_channels(module), twins.cpu())[physical]
        if (mask == mask[:1]).all():  # the usual case: every row has the same twin columns
            return {"weight": (mask[0], 1)}
        return {"weight": (mask, 0)}
    # per-channel module (ChannelAffine, BatchNorm kept): every 1-D parameter is indexed by channel
    return {name: (_isin(p.shape[0], twins), 0) for name, p in module.named_parameters(recurse=False)
            if p.dim() == 1}


def _is_split(module: nn.Module, name: str) -> bool:
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, TwinSplit) for p in module.parametrizations[name])  # ours, not a layer type


def split_twins(model: nn.Module) -> nn.Module:
    """Split every twin-carrying parameter into primary and twin leaves, in place; idempotent.

    Parameter names change to ``<module>.parametrizations.<name>.original0`` (primaries) and
    ``original1`` (twins); build optimisers after splitting.
    """
    for qualified, module in model.named_modules():
        for name, (mask, start) in twin_masks(module).items():
            if _is_split(module, name):
                continue
            if parametrize.is_parametrized(module, name):
                raise UsageError(f"{qualified}.{name} already has a parametrization; cannot split its twins")
            param = getattr(module, name)
            mask = mask.to(param.device)
            parametrize.register_parametrization(module, name, TwinSplit(param.shape, mask, start))
    return model


def unparametrize(module: nn.Module, names: list[str]) -> None:
    """Remove the parametrizations of ``names`` from ``module``, leaving plain weights with the
    current values, without touching any other model.

    ``copy.deepcopy`` shares torch's generated ``Parametrized<X>`` class between a model and its
    copies, and ``remove_parametrizations`` deletes the weight's property from that class: done
    on a copy it would break the original ("'ParametrizedConv2d' object has no attribute
    'weight'"). So ``module`` first gets a private copy of its class.
    """
    if not names:
        return
    cls = module.__class__
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    for name in names:
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def merge_twins(model: nn.Module) -> nn.Module:
    """Undo :func:`split_twins` in place: plain weights holding the current values. Safe on a
    deep copy of a split model (the original stays split and working)."""
    for module in model.modules():
        unparametrize(module, [n for n in list(getattr(module, "parametrizations", {}) or {}) if _is_split(module, n)])
    return model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with split weights merged back under their plain names (no mutation)."""
    state = model.state_dict()
    for qualified, module in model.named_modules():
        for name in list(getattr(module, "parametrizations", {}) or {}):
            if not _is_split(module, name):
                continue
            prefix = f"{qualified}." if qualified else ""
            for key in [k for k in state if k.startswith(f"{prefix}parametrizations.{name}.")]:
                del state[key]
            state[f"{prefix}{name}"] = getattr(module, name).detach()
    return state


def _twin_only(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters acting on twins alone: a mirrored activation's own twin copy (PReLU slopes)
    and the ``gate`` of residual GatedMerge boundaries."""
    for module in model.modules():  # lnconvert's own modules, any subclass included
        if isinstance(module, LinkedActivation) and module.twin_act is not None:  # ours
            yield from module.twin_act.parameters()
        elif isinstance(module, GatedMerge):  # ours
            yield module.gate


def twin_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The twin half of a split model (see :func:`split_twins`), plus twin-only parameters."""
    found = [module.parametrizations[name].original1 for module in model.modules()
             for name in list(getattr(module, "parametrizations", {}) or {}) if _is_split(module, name)]
    return found + list(_twin_only(model))


def param_groups(model: nn.Module, *, base_lr: float, twin_lr: float, weight_decay: float = 0.0,
                 twin_weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Optimiser parameter groups ``[base, twin]`` for a converted model.

    Splits twin weights into their own tensors first (:func:`split_twins`, in place). The
    ``twin`` group holds exactly the twin-half entries of widened consumers and of duplicated
    per-channel parameters, plus twin-only parameters (twin PReLU slopes, residual gates);
    ``base`` holds every other trainable parameter. ``twin_lr=0`` (with no weight decay) keeps
    the model's function that of the original while the primaries train.
    """
    split_twins(model)
    twins = [p for p in twin_parameters(model) if p.requires_grad]
    ids = {id(p) for p in twins}
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [
        {"params": base, "lr": base_lr, "weight_decay": weight_decay, "name": "base"},
        {"params": twins, "lr": twin_lr, "name": "twin",
         "weight_decay": weight_decay if twin_weight_decay is None else twin_weight_decay},
    ]


__all__ = ["TwinSplit", "merge_twins", "param_groups", "plain_state_dict", "split_twins", "twin_masks",
           "twin_parameters"]

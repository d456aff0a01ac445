"""Widen every consumer of a linked tensor so the function is unchanged at conversion."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..analysis import insert_module_after, own_module
from ..layout import Layout
from ..nn import ChannelAffine, ChannelExpand
from ..options import PassContext
from ..plan import LinkPlan
from ..rules import CONV_TRANSPOSE_MODULES


def mark_twins(module: nn.Module, layout: Layout) -> nn.Module:
    """Record on ``module`` which physical input channels hold twins (non-persistent buffer
    ``lnc_twin_channels``), so fine-tuning can give twin weights their own parameter group
    (:func:`lnconvert.finetune.param_groups`) without re-deriving the layout."""
    twins = [t for t in layout.twin if t >= 0]
    module.register_buffer("lnc_twin_channels", torch.tensor(twins, dtype=torch.long), persistent=False)
    return module


def widen_input(module: nn.Module, layout: Layout) -> nn.Module:
    """Copy of a conv / transposed conv / linear reading ``layout``: each primary's weights
    are the original ones, every twin's weights are zero."""
    weight = module.weight.detach()
    primary = torch.tensor(layout.primary, dtype=torch.long)
    wide = copy.deepcopy(module)
    if isinstance(module, nn.Linear):
        new = weight.new_zeros(weight.shape[0], layout.width)
        new[:, primary] = weight
        wide.in_features = layout.width
    elif isinstance(module, CONV_TRANSPOSE_MODULES):  # weight: (in, out/groups, *k)
        new = weight.new_zeros(layout.width, *weight.shape[1:])
        new[primary] = weight
        wide.in_channels = layout.width
    else:  # conv, weight: (out, in/groups, *k); fits_groups() guaranteed the grouping
        groups, out = module.groups, weight.shape[0]
        per_log, per_phys, per_out = layout.channels // groups, layout.width // groups, out // groups
        group_of = torch.arange(groups).repeat_interleave(per_log)
        local = (primary - group_of * per_phys).view(groups, per_log)  # column inside its group
        rows = torch.arange(out)
        new = weight.new_zeros(out, per_phys, *weight.shape[2:])
        new[rows[:, None], local[rows // per_out]] = weight
        wide.in_channels = layout.width
    wide.weight = nn.Parameter(new, requires_grad=module.weight.requires_grad)
    return mark_twins(wide, layout)


def widen_channel_params(module: nn.Module, layout: Layout) -> nn.Module:
    """Copy of a per-channel module (BN kept, ChannelAffine) applying each channel's
    parameters to its primary and to its twin."""
    index = torch.tensor(layout.logical_of_physical(), dtype=torch.long)
    wide = copy.deepcopy(module)
    names = ("scale", "shift") if isinstance(module, ChannelAffine) else ("weight", "bias", "running_mean", "running_var")
    for name in names:
        value = getattr(module, name, None)
        if value is None:
            continue
        widened = value.detach()[index].clone()
        if isinstance(value, nn.Parameter):
            setattr(wide, name, nn.Parameter(widened, requires_grad=value.requires_grad))
        else:
            setattr(wide, name, widened)
    if hasattr(wide, "num_features"):
        wide.num_features = layout.width
    return mark_twins(wide, layout)


def run(gm: fx.GraphModule, ctx: PassContext, plan: LinkPlan) -> fx.GraphModule:
    """Absorbing consumers get zero twin weights (per call site); per-channel modules get
    duplicated parameters; an ordinary operand multiplied into a linked tensor (SE gate) is
    repeated into the layout; flattens/views of a linked tensor are rewritten to
    ``torch.flatten`` so no hard-coded channel count survives.
    Preserves: every consumer's output (absorbers) or primary half (others) exactly.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, layout in plan.absorbers.items():
        node = nodes[name]
        module = gm.get_submodule(node.target)
        before = layout.channels
        own_module(gm, node, widen_input(module, layout), "widened")
        ctx.report.consumers.append({"node": name, "type": type(module).__name__, "in_before": before,
                                     "in_after": layout.width, "groups": getattr(module, "groups", 1)})
    for name, layout in plan.channel_params.items():
        node = nodes[name]
        own_module(gm, node, widen_channel_params(gm.get_submodule(node.target), layout), "widened")
    for name, (operand, layout) in plan.expands.items():
        node, other = nodes[name], nodes[operand]
        expand = ChannelExpand(layout.logical_of_physical(), dim=layout.dim - len(node.meta["tensor_meta"].shape)
                               + len(other.meta["tensor_meta"].shape))
        expanded = insert_module_after(gm, other, expand, f"{operand}_expand", (other,))
        node.replace_input_with(other, expanded)
    for name, start_dim in plan.flattens.items():
        node = nodes[name]
        if start_dim is None:
            node.replace_all_uses_with(node.args[0])
        else:
            with gm.graph.inserting_before(node):
                flat = gm.graph.call_function(torch.flatten, (node.args[0], start_dim))
            flat.meta = dict(node.meta)
            node.replace_all_uses_with(flat)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm

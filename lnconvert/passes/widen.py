"""Widen every consumer of a linked tensor so the function is unchanged at conversion."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..layers import IN_LAYOUT, TWIN_BUFFER, LayerSpec, layer_spec
from ..layout import Layout
from ..nn import ChannelExpand
from ..options import PassContext
from ..plan import LinkPlan
from ..rewrite import copy_module, insert_module_after, own_module


def mark_twins(module: nn.Module, layout: Layout) -> nn.Module:
    """Record on ``module`` which physical input channels hold twins (non-persistent buffer
    ``layers.TWIN_BUFFER``), so fine-tuning can give twin weights their own parameter group
    (:func:`lnconvert.finetune.param_groups`) without re-deriving the layout."""
    twins = [t for t in layout.twin if t >= 0]
    module.register_buffer(TWIN_BUFFER, torch.tensor(twins, dtype=torch.long), persistent=False)
    return module


def _spec(module: nn.Module) -> LayerSpec:
    spec = layer_spec(module)
    if spec is None:
        raise TypeError(f"{type(module).__name__} is not in the layer registry (lnconvert.layers.register_layer)")
    return spec


def read_columns(module: nn.Module, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights that read each logical channel's primary and twin, in the layout of the
    unwidened module's weight (a twin's are zero where the channel has none)."""
    spec, weight = _spec(module), module.weight.detach()
    primary = _column_index(spec, module, layout, layout.primary)
    twin = _column_index(spec, module, layout, layout.twin)
    return _gather(spec, weight, primary), _gather(spec, weight, twin)


def write_columns(module: nn.Module, layout: Layout, primary_w: torch.Tensor,
                  twin_w: torch.Tensor | None) -> nn.Module:
    """Copy of a registered layer (conv / transposed conv / linear) reading ``layout``, whose
    columns for each logical channel's primary and twin are ``primary_w`` and ``twin_w`` (None: zero)."""
    spec, weight = _spec(module), module.weight.detach()
    wide = copy_module(module, (module.weight,))
    shape = list(weight.shape)
    shape[spec.weight_in_axis] = layout.width // (module.groups if spec.grouped_input else 1)
    new = weight.new_zeros(shape)
    spec.set_in_channels(wide, layout.width)
    for index, values in ((layout.primary, primary_w), (layout.twin, twin_w)):
        if values is None:  # the new weight is already zero
            continue
        _scatter(spec, new, _column_index(spec, module, layout, index), values)
    wide.weight = nn.Parameter(new, requires_grad=module.weight.requires_grad)
    return wide


def _column_index(spec: LayerSpec, module: nn.Module, layout: Layout, physical: tuple[int, ...]):
    """Where logical channel c's value at physical position ``physical[c]`` sits in the
    weight: an index along the weight's input axis (-1: none), or, when that axis is per group
    (grouped convs), (rows, local column), as each group sees only its own physical range."""
    index = torch.tensor(physical, dtype=torch.long)
    if not spec.grouped_input or module.groups == 1:
        return index
    groups, out = module.groups, module.weight.shape[0]
    per_log, per_phys, per_out = layout.channels // groups, layout.width // groups, out // groups
    group_of = torch.arange(groups).repeat_interleave(per_log)
    local = index - group_of * per_phys
    # a twin outside its channel's group range (mixed layouts) has no column in that group
    local = torch.where((index >= 0) & (local >= 0) & (local < per_phys), local, -1).view(groups, per_log)
    rows = torch.arange(out)
    return rows[:, None], local[rows // per_out]


def foreign_twins(module: nn.Module, layout: Layout) -> list[int]:
    """Logical channels whose twin sits in another group's physical range of a grouped conv:
    other groups' weights read it, so it is never removed by compaction."""
    spec, groups = _spec(module), getattr(module, "groups", 1)
    if groups == 1 or not spec.grouped_input:
        return []
    per_log, per_phys = layout.channels // groups, layout.width // groups
    return [c for c, t in enumerate(layout.twin) if t >= 0 and t // per_phys != c // per_log]


def _axis_view(mask: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return mask.view(shape)


def _gather(spec: LayerSpec, weight: torch.Tensor, columns) -> torch.Tensor:
    if not isinstance(columns, tuple):
        axis = spec.weight_in_axis
        picked = weight.index_select(axis, columns.clamp(min=0))
        return torch.where(_axis_view(columns >= 0, weight.dim(), axis), picked, 0.0)
    rows, local = columns
    mask = (local >= 0).view(*local.shape, *([1] * (weight.dim() - 2)))
    return torch.where(mask, weight[rows, local.clamp(min=0)], 0.0)


def _scatter(spec: LayerSpec, new: torch.Tensor, columns, values: torch.Tensor) -> None:
    """Write ``values`` (in the unwidened weight's layout) into ``new`` at ``columns``."""
    if isinstance(columns, tuple):
        rows, local = columns
        keep = local >= 0
        new[rows.expand_as(local)[keep], local[keep]] = values[keep]
        return
    axis, keep = spec.weight_in_axis, columns >= 0
    if not keep.all():
        columns, values = columns[keep], values.index_select(axis, keep.nonzero().squeeze(1))
    start = int(columns[0]) if len(columns) else 0
    if torch.equal(columns, torch.arange(start, start + len(columns))):  # a run: one strided copy
        new.narrow(axis, start, len(columns)).copy_(values)
    else:
        new.index_copy_(axis, columns, values)


def widen_input(module: nn.Module, layout: Layout) -> nn.Module:
    """Copy of a conv / transposed conv / linear reading ``layout``: each primary's weights
    are the original ones, every twin's weights are zero."""
    original = module.weight.detach()
    return mark_twins(write_columns(module, layout, original, None), layout)


def widen_channel_params(module: nn.Module, layout: Layout) -> nn.Module:
    """Copy of a per-channel module (BN kept, ChannelAffine) applying each channel's
    parameters to its primary and to its twin: every 1-D parameter or buffer of the module's
    own whose length is the channel count is indexed by channel."""
    index = torch.tensor(layout.logical_of_physical(), dtype=torch.long)
    wide = copy.deepcopy(module)
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    for name, value in own:
        if value.dim() != 1 or value.numel() != layout.channels:
            continue
        widened = value.detach()[index].clone()
        if isinstance(value, nn.Parameter):  # keep parameters parameters (not a layer-type test)
            setattr(wide, name, nn.Parameter(widened, requires_grad=value.requires_grad))
        else:
            setattr(wide, name, widened)
    if hasattr(wide, "num_features"):
        wide.num_features = layout.width
    return mark_twins(wide, layout)


def run(gm: fx.GraphModule, ctx: PassContext, plan: LinkPlan) -> fx.GraphModule:
    """Absorbing consumers get zero twin weights (per call site); per-channel modules get
    duplicated parameters; an ordinary operand multiplied into a linked tensor (SE gate) is
    repeated into the layout.
    Preserves: every consumer's output (absorbers) or primary half (others) exactly.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, layout in plan.absorbers.items():
        node = nodes[name]
        module = gm.get_submodule(node.target)
        before = layout.channels
        own_module(gm, node, widen_input(module, layout), "widened")
        node.meta[IN_LAYOUT] = layout  # compaction and param_groups read the twins' columns
        ctx.report.consumers.append({"node": name, "type": type(module).__name__, "in_before": before,
                                     "in_after": layout.width, "groups": getattr(module, "groups", 1)})
    for name, layout in plan.channel_params.items():
        node = nodes[name]
        own_module(gm, node, widen_channel_params(gm.get_submodule(node.target), layout), "widened")
        node.meta[IN_LAYOUT] = layout
    for name, (operand, layout) in plan.expands.items():
        node, other = nodes[name], nodes[operand]
        expand = ChannelExpand(layout.logical_of_physical(), dim=layout.dim - len(node.meta["tensor_meta"].shape)
                               + len(other.meta["tensor_meta"].shape))
        expanded = insert_module_after(gm, other, expand, f"{operand}_expand", (other,))
        node.replace_input_with(other, expanded)
    gm.recompile()
    return gm

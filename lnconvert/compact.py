"""Compaction: give back the width that linking costs.

Linking doubles the input width of every absorbing consumer. After fine-tuning, many twins
still cannot influence the output: every weight that reads them is exactly zero (always
true right after conversion) or, on calibration data, the twin never fires (a dead unit).
The *exact stage* removes those; the *budgeted stage* then removes the least salient twins
(outgoing weight norm x mean activation magnitude) until a MAC budget is met.

A compacted model is rebuilt by converting the source architecture again with a twin
subset per activation (the same passes, so it keeps every guarantee of a converted model),
then each weight is moved column by column from the uncompacted model.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from .analysis import shape_of
from .convert import ConversionResult, as_result, convert
from .errors import UsageError
from .finetune import merge_twins
from .layers import IN_LAYOUT, LAYOUT, LayerSpec, layer_spec
from .layout import Layout
from .nn import GatedMerge, LinkedActivation
from .passes.widen import foreign_twins, read_columns, write_columns
from .report import DEFAULT_TOLERANCE
from .verify import compare

Twin = tuple[str, int]  # (activation node name, channel)


@dataclass
class CompactReport:
    layers: list[dict[str, Any]] = field(default_factory=list)  # activation, channels, twins before/after
    removed: dict[str, int] = field(default_factory=dict)        # zero-weight / dead / budget
    macs_original: int = 0
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    max_rel_deviation: float | None = None  # compacted vs uncompacted, on the checked inputs
    notes: list[str] = field(default_factory=list)


@dataclass
class CompactResult:
    model: fx.GraphModule
    report: CompactReport
    twins: dict[str, list[int]]
    conversion: ConversionResult


# ------------------------------------------------------------------ what reads each twin
def _absorber_nodes(gm: fx.GraphModule) -> Iterable[tuple[fx.Node, nn.Module, LayerSpec, Layout]]:
    for node in gm.graph.nodes:
        layout = node.meta.get(IN_LAYOUT)
        if node.op == "call_module" and layout is not None:
            module = gm.get_submodule(node.target)
            spec = layer_spec(module)
            if spec is not None:
                yield node, module, spec, layout


def twin_weight_norms(gm: fx.GraphModule) -> dict[Twin, float]:
    """Per twin, the L2 norm of every weight that reads it (absorbers) plus its residual gates."""
    sq: dict[Twin, float] = defaultdict(float)
    for node, module, spec, layout in _absorber_nodes(gm):
        _, twin_w = read_columns(module, layout)
        if spec.grouped_input and module.groups > 1:
            per_channel = _per_logical_grouped(twin_w, module, layout)
        else:  # every entry along the input axis is one logical channel's
            per_channel = twin_w.double().pow(2).movedim(spec.weight_in_axis, 0).flatten(1).sum(1)
        for c, value in enumerate(per_channel.tolist()):
            for origin in layout.origin(c):
                sq[origin] += value
        for c in foreign_twins(module, layout):
            for origin in layout.origin(c):
                sq[origin] = math.inf
    for node in gm.graph.nodes:  # GatedMerge, LinkedActivation: lnconvert's own modules
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), GatedMerge):  # ours
            gate, layout = gm.get_submodule(node.target).gate.detach(), node.meta[IN_LAYOUT]
            for c, value in enumerate(gate.double().pow(2).tolist()):
                for origin in layout.origin(c):
                    sq[origin] += value
    return {twin: math.sqrt(v) for twin, v in sq.items()}


def _per_logical_grouped(twin_w: torch.Tensor, module: nn.Module, layout: Layout) -> torch.Tensor:
    """Grouped conv: ``twin_w`` is (out, C/groups, *k); logical channel c = g*C/G + j is read
    by the rows of group g at column j."""
    groups, per_log, per_out = module.groups, layout.channels // module.groups, twin_w.shape[0] // module.groups
    sq = twin_w.double().pow(2).flatten(2).sum(2).view(groups, per_out, per_log).sum(1)
    return sq.flatten()


def twin_macs(gm: fx.GraphModule) -> dict[Twin, int]:
    """MACs per sample that each twin costs in the absorbers that read it."""
    cost: dict[Twin, int] = defaultdict(int)
    for node, module, spec, layout in _absorber_nodes(gm):
        per_column = spec.macs_per_input_channel(module, shape_of(node.args[0]), shape_of(node))
        for c in range(layout.channels):
            for origin in layout.origin(c):
                cost[origin] += per_column
    return cost


def _linked_nodes(gm: fx.GraphModule) -> Iterable[tuple[fx.Node, Layout]]:
    """The linked activations (the link pass records their output layout) with that layout."""
    return [(node, node.meta[LAYOUT]) for node in gm.graph.nodes if node.op == "call_module" and LAYOUT in node.meta]


@torch.no_grad()
def twin_activity(gm: fx.GraphModule, batches: Iterable[tuple[torch.Tensor, ...]]) -> dict[Twin, float]:
    """Mean |twin output| per twin over ``batches`` (0.0: dead on this data)."""
    total: dict[Twin, float] = defaultdict(float)
    count = [0]
    hooks = []
    for node, layout in _linked_nodes(gm):
        def hook(module, args, output, layout=layout, name=node.name):
            moved = output.detach().movedim(layout.dim, 0).abs().flatten(1).mean(1).double()
            for c, t in enumerate(layout.twin):
                if t >= 0:
                    total[(name, c)] += float(moved[t])

        hooks.append(gm.get_submodule(node.target).register_forward_hook(hook))
    try:
        gm.eval()
        for batch in batches:
            gm(*batch)
            count[0] += 1
    finally:
        for handle in hooks:
            handle.remove()
    return {twin: value / max(count[0], 1) for twin, value in total.items()}


# ------------------------------------------------------------------ rebuilding
def _linked_twins(gm: fx.GraphModule) -> dict[str, tuple[int, int, list[int]]]:
    """Per linked activation: (channels, groups, channels that have a twin)."""
    return {node.name: (layout.channels, gm.get_submodule(node.target).groups,
                        [c for c, t in enumerate(layout.twin) if t >= 0]) for node, layout in _linked_nodes(gm)}


def _move_weights(old: fx.GraphModule, new: fx.GraphModule) -> None:
    """Copy every parameter and buffer of ``old`` into ``new``, mapping layout-dependent
    ones (absorbers' columns, per-channel params of linked tensors, twin PReLU slopes)
    through each node's old and new layouts."""
    old_nodes = {n.name: n for n in old.graph.nodes}
    state = {k: v.detach().clone() for k, v in old.state_dict().items()}
    targets = {}
    for node in new.graph.nodes:
        previous = old_nodes.get(node.name)
        if node.op != "call_module" or previous is None or previous.op != "call_module":
            continue
        targets[node.target] = previous.target
        old_module, new_module = old.get_submodule(previous.target), new.get_submodule(node.target)
        old_layout = previous.meta.get(IN_LAYOUT)
        if old_layout is not None and layer_spec(old_module) is not None:
            new_layout = node.meta.get(IN_LAYOUT) or Layout.plain(old_layout.channels, old_layout.dim)
            rebuilt = write_columns(old_module, new_layout, *read_columns(old_module, old_layout))
            state[f"{previous.target}.weight"] = rebuilt.weight.detach()
        # GatedMerge, LinkedActivation: lnconvert's own modules, whose parameters it lays out itself
        elif old_layout is not None and not isinstance(old_module, GatedMerge):  # per-channel params
            new_layout = node.meta.get(IN_LAYOUT) or Layout.plain(old_layout.channels, old_layout.dim)
            for name, value in old_module.state_dict().items():
                if value.dim() == 1 and value.numel() == old_layout.width:
                    state[f"{previous.target}.{name}"] = _remap_channels(value, old_layout, new_layout)
        elif isinstance(new_module, LinkedActivation) and new_module.subset and new_module.twin_act is not None:  # ours
            kept = new_module.twin_index
            for name, value in new_module.twin_act.named_parameters():
                full = state[f"{previous.target}.twin_act.{name}"]
                if full.dim() == 1 and full.numel() > value.numel():
                    state[f"{previous.target}.twin_act.{name}"] = full[kept]
    renamed = {}
    for key in new.state_dict():
        module, _, leaf = key.rpartition(".")
        source = targets.get(module, module)
        renamed[key] = state[f"{source}.{leaf}" if source else leaf]
    new.load_state_dict(renamed, strict=True)


def _remap_channels(value: torch.Tensor, old: Layout, new: Layout) -> torch.Tensor:
    out = value.new_zeros(new.width)
    for c in range(old.channels):
        out[new.primary[c]] = value[old.primary[c]]
        if new.twin[c] >= 0:
            out[new.twin[c]] = value[old.twin[c]]
    return out


def rebuild(conversion: ConversionResult, twins: dict[str, list[int]]) -> fx.GraphModule:
    """Convert the source again keeping only ``twins``, then move the weights over."""
    kwargs = conversion.options.graph_kwargs() | {"twins": twins}  # every option, so no strategy is dropped
    new = convert(conversion.source, example_inputs=conversion.example_inputs, verify=False, **kwargs).model
    _move_weights(conversion.model, new)
    return new.train(conversion.model.training)


def _parse_budget(target: float | str | None, original: int) -> int | None:
    if target is None:
        return None
    text = str(target).strip().lower()
    try:
        factor = float(text[:-1] if text.endswith("x") else text)
    except ValueError:
        raise UsageError(f"--target-macs must look like 1.2x, got {target!r}") from None
    if factor <= 0:
        raise UsageError(f"--target-macs must be positive, got {target!r}")
    return int(factor * original)


def compact(conversion: ConversionResult | fx.GraphModule | str | Path, *, data: Iterable[Any] | None = None,
            target_macs: float | str | None = None, tolerance: float = DEFAULT_TOLERANCE) -> CompactResult:
    """Remove twins that cannot change the output, then (with ``target_macs``, e.g. ``"1.2x"``
    of the original model's MACs) the least salient ones until the budget is met.

    ``conversion`` is a :class:`ConversionResult` or the model it holds (either may have been
    fine-tuned), or a saved model path (read as :func:`lnconvert.load_result` does).
    ``data`` (an iterable of input tensors or ``(inputs, ...)`` tuples) enables dead-unit
    removal and activity-weighted saliency. The exact stage keeps the
    output within ``tolerance`` of the uncompacted model, which is checked; the budgeted
    stage reports its deviation instead.
    """
    if isinstance(conversion, (str, Path)):
        from .io import load_result

        conversion = load_result(conversion)
    conversion = as_result(conversion, "compact")
    if any(parametrize.is_parametrized(m) for m in conversion.model.modules()):
        # fine-tuned with param_groups: compaction reads and writes plain weights, so work on a
        # merged copy (the caller's split model keeps training as it was)
        conversion = replace(conversion, model=merge_twins(copy.deepcopy(conversion.model)))
    if conversion.options.lcw:
        raise UsageError("compaction does not support LCW models: the zero-sum constraint couples every weight of "
                         "a unit, so removing twin columns changes the kept ones; compact before applying LCW")
    gm = conversion.model
    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in data] if data is not None else []
    batches = [tuple(t for t in b if isinstance(t, torch.Tensor) and t.is_floating_point())[:1] for b in batches]
    report = CompactReport(macs_original=conversion.report.macs_before, macs_before=conversion.report.macs_after,
                           params_before=conversion.report.params_after)
    linked = _linked_twins(gm)
    norms = twin_weight_norms(gm)
    activity = twin_activity(gm, batches) if batches else {}
    removed: dict[str, int] = defaultdict(int)
    keep: dict[str, list[int]] = {}
    for name, (_, _, channels) in linked.items():
        kept = []
        for c in channels:
            if norms.get((name, c), 0.0) == 0.0:
                removed["zero-weight"] += 1
            elif batches and activity.get((name, c), 0.0) == 0.0:
                removed["dead"] += 1
            else:
                kept.append(c)
        keep[name] = kept
    budget = _parse_budget(target_macs, report.macs_original)
    if budget is not None:
        cost = twin_macs(gm)
        macs = report.macs_before - sum(cost.get((n, c), 0) for n, (_, _, ch) in linked.items() for c in ch
                                        if c not in keep[n])
        ranked = sorted(((norms[(n, c)] * activity.get((n, c), 1.0), n, c) for n, kept in keep.items() for c in kept))
        for _, name, c in ranked:
            if macs <= budget:
                break
            keep[name].remove(c)
            macs -= cost.get((name, c), 0)
            removed["budget"] += 1
        if macs > budget:
            report.notes.append(f"budget {budget:,} MACs not reachable by removing twins (at {macs:,})")
    for name, (width, groups, channels) in linked.items():  # a grouped layout keeps all twins or none
        if groups > 1 and keep[name] and len(keep[name]) < len(channels):
            report.notes.append(f"{name}: grouped layout keeps all {len(channels)} twins (some were removable)")
            for c in channels:
                if c not in keep[name]:
                    removed["zero-weight" if norms.get((name, c), 0.0) == 0.0 else "budget"] -= 1
            keep[name] = list(channels)
        report.layers.append({"activation": name, "channels": width, "twins_before": len(channels),
                              "twins_after": len(keep[name])})
    report.removed = dict(removed)
    model = rebuild(conversion, keep)
    from .analysis import count_macs, count_params, propagate_shapes

    propagate_shapes(model, conversion.example_inputs)
    report.macs_after, report.params_after = count_macs(model), count_params(model)
    checks = [("example", conversion.example_inputs)] + [(f"data[{i}]", b) for i, b in enumerate(batches[:4])]
    rows = compare(gm, model, checks, tolerance)
    report.max_rel_deviation = max(r.max_rel for r in rows)
    result_conversion = copy.copy(conversion)
    result_conversion.model = model
    return CompactResult(model, report, keep, result_conversion)

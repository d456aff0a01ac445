"""Remove eval-mode BatchNorm: fold into the producing conv/linear, else a per-channel affine."""
from __future__ import annotations

import torch
from torch import fx, nn

from ..analysis import all_finite, reads_input, shape_of
from ..errors import UnsupportedModelError
from ..layers import FOLDED_BN, layer_spec
from ..nn import ChannelAffine
from ..options import PassContext
from ..rewrite import call_site_counts, copy_module, own_module
from ..rules import CAT_FUNCTIONS, batchnorm_channels, is_batchnorm


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``x * scale + shift``, computed in float64 for folding precision."""
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


def fold_into(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """A copy of ``module`` (a registered conv / linear) whose output equals ``module(x) * scale + shift``."""
    folded = copy_module(module, (module.weight, module.bias))
    weight = module.weight.detach()
    new_weight = _times_in_float64(weight, layer_spec(module).out_channel_view(module, scale))
    old_bias = module.bias.detach().double() if module.bias is not None else torch.zeros_like(shift)
    folded.weight = nn.Parameter(new_weight, requires_grad=module.weight.requires_grad)
    folded.bias = nn.Parameter((old_bias * scale + shift).to(weight.dtype))
    return folded


_BLOCK = 1 << 18  # elements of the float64 temporary in _times_in_float64


def _times_in_float64(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``weight * factor`` (``factor`` broadcasts to ``weight``) computed in float64 and rounded
    once to ``weight``'s dtype: blocks of rows at a time, so the float64 temporary stays small
    and reused (allocating and touching fresh memory costs more than the arithmetic)."""
    out = torch.empty_like(weight)
    step = max(1, _BLOCK // max(1, weight[0].numel()))
    buffer = torch.empty((min(step, len(weight)), *weight.shape[1:]), dtype=torch.float64)
    for start in range(0, len(weight), step):
        rows = slice(start, start + step)
        block = buffer[:len(weight[rows])].copy_(weight[rows])
        out[rows] = block.mul_(factor[rows] if len(factor) > 1 else factor)
    return out


def _require_finite(bn_name: str, module: nn.Module) -> nn.Module:
    """A zero ``running_var + eps``, or a scale beyond the weights' dtype, folds into Inf/NaN."""
    for name, value in module.named_parameters():
        if not all_finite(value):
            raise UnsupportedModelError(f"folding BatchNorm '{bn_name}' gives a non-finite {name} (running_var + eps "
                                        f"is 0 or the scale overflows {str(value.dtype).removeprefix('torch.')}); "
                                        f"fix its statistics or keep it (--keep-bn)")
    return module


def _foldable_module(gm: fx.GraphModule, producer: fx.Node, channels: int) -> nn.Module | None:
    """The registered layer computing ``producer`` that a BN folds into, when its output
    (``channels`` wide, on the axis a BN normalises) feeds one user."""
    if not isinstance(producer, fx.Node) or producer.op != "call_module" or len(producer.users) != 1:
        return None
    module = gm.get_submodule(producer.target)
    spec = layer_spec(module)
    if spec is None or not spec.folds_bn or spec.out_channels(module) != channels:
        return None
    out = shape_of(producer)
    # a BN normalises axis 1: a linear layer's output features must be that axis
    return module if spec.feature_maps or (out is not None and len(out) == 2) else None


def _foldable_producers(gm: fx.GraphModule, bn_node: fx.Node, bn: nn.Module) -> list[tuple[fx.Node, nn.Module, int]]:
    """(producer node, module, first BN channel it computes) for every conv the BN can fold
    into: its direct producer, or each input of a channel ``cat`` of single-use convs
    (MixNet's mixed convolutions). Empty when the BN cannot be folded."""
    producer = bn_node.args[0]
    channels = batchnorm_channels(bn)
    module = _foldable_module(gm, producer, channels)
    if module is not None:
        return [(producer, module, 0)]
    if not (isinstance(producer, fx.Node) and producer.target in CAT_FUNCTIONS and len(producer.users) == 1):
        return []
    parts, dim = producer.args[0], producer.args[1] if len(producer.args) > 1 else producer.kwargs.get("dim", 0)
    shapes = [shape_of(p) for p in parts]
    if any(s is None for s in shapes) or dim not in (1, 1 - len(shapes[0])) or len(set(parts)) != len(parts):
        return []
    found, start = [], 0
    for part, shape in zip(parts, shapes):
        module = _foldable_module(gm, part, shape[1])
        if module is None:
            return []
        found.append((part, module, start))
        start += shape[1]
    return found if start == channels else []


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Remove every eval-mode BatchNorm module (``rules.is_batchnorm``: the exact nn types and
    frozen BatchNorms of any class):

    1. fold into the conv/linear producing its input when that output feeds only the BN, or
       into each conv of a channel concatenation of such convs;
    2. otherwise replace it by an equivalent :class:`ChannelAffine` (no batch statistics);
    3. keep a BN without running statistics (it uses batch statistics even in eval) and
       report it, as well as functional ``batch_norm`` calls on activations (one on a weight,
       timm's weight standardisation, is no BatchNorm of activations: left alone, unreported).

    Preserves: eval-mode outputs up to float rounding (scale and shift in float64).
    """
    sites = call_site_counts(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.nn.functional.batch_norm:
            if reads_input(node):  # else it standardises a weight: not a BatchNorm of activations
                ctx.report.bn(node.name, "kept", "functional batch_norm call (not a module)")
            continue
        if node.op != "call_module" or not is_batchnorm(gm.get_submodule(node.target)):
            continue
        bn = gm.get_submodule(node.target)
        if bn.running_mean is None or bn.running_var is None:
            ctx.report.bn(node.target, "kept", "no running statistics (track_running_stats=False)")
            continue
        scale, shift = bn_scale_shift(bn)
        producers = _foldable_producers(gm, node, bn)
        if producers:
            for producer, module, start in producers:
                width = layer_spec(module).out_channels(module)
                folded = fold_into(module, scale[start:start + width], shift[start:start + width])
                own_module(gm, producer, _require_finite(node.target, folded), "folded")
                producer.meta[FOLDED_BN] = node.target
            ctx.report.bn(node.target, "folded", "into " + ", ".join(p.target for p, _, _ in producers))
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        else:
            affine = ChannelAffine(scale.to(bn.running_var.dtype), shift.to(bn.running_var.dtype))
            ctx.report.bn(node.target, "affine", "producer is not a conv/linear used only here"
                          if sites[node.target] == 1 else "shared BN module, per call site")
            own_module(gm, node, _require_finite(node.target, affine), "affine")
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm

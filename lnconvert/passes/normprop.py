"""NormProp strategy: layers that had a BatchNorm become NormProp layers; ReLUs between two
of them get NormProp's re-normalisation, with its constants absorbed exactly."""
from __future__ import annotations

import torch
from torch import fx, nn

from ..layers import FOLDED_BN, IN_LAYOUT, LAYOUT, layer_spec
from ..nn import ChannelAffine, LinkedActivation, ReLURenorm
from ..nn.normprop import RELU_MEAN, RELU_STD
from ..options import PassContext
from ..rewrite import insert_module_after, own_module
from ..rules import ACTIVATION_MODULES, layer_type
from .widen import mark_twins


def _to_normprop(gm: fx.GraphModule, ctx: PassContext) -> set[fx.Node]:
    """Replace every conv / linear carrying a folded BN by its exact NormProp form."""
    converted = set()
    for node in list(gm.graph.nodes):
        bn = node.meta.get(FOLDED_BN)
        if bn is None or node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        form = layer_spec(module).normprop
        if form is None:
            ctx.report.norm_layer(node.target, "normprop", "kept folded",
                                  f"no NormProp form for {type(module).__name__}")
            continue
        layer = form.from_layer(module)
        with torch.no_grad():  # what weight normalisation's rounding moves, relative to the largest weight
            error = float((layer.effective_weight() - module.weight).abs().max() / module.weight.abs().max().clamp(
                min=1e-30))
        own_module(gm, node, layer, "normprop")
        converted.add(node)
        ctx.report.norm_layer(node.target, "normprop", "normprop",
                              f"BN {bn}; gamma = c*||W_j||; weight rounding {error:.1e}")
    return converted


def _is_relu(module: nn.Module) -> bool:
    return ACTIVATION_MODULES.get(layer_type(module)) == "relu"


def _relu_refusal(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """For a ReLU (plain or linked): '' when re-normalisation applies, else why not; None for other nodes."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if _is_relu(module):
        return ""
    if isinstance(module, LinkedActivation) and _is_relu(module.act):  # lnconvert's own module
        return "" if module.policy == "mirror" else "minmax twins are not ReLU outputs"
    return None


def _zero_padded(module: nn.Module) -> bool:
    padding = getattr(module, "padding", 0)
    padded = padding == "same" or any(p != 0 for p in (padding if isinstance(padding, tuple) else (padding,)))
    return padded and getattr(module, "padding_mode", "zeros") == "zeros"


def _renormalise(gm: fx.GraphModule, act: fx.Node, users: list[fx.Node]) -> str:
    """Insert ``ReLURenorm`` after ``act``; its scale goes into the users' gamma and its
    shift into their bias, or, when a user zero-pads (the padding would be 0 in the shifted
    space, not in the original), into an explicit learnable per-channel shift."""
    renorm = insert_module_after(gm, act, ReLURenorm(), f"{act.name}_renorm", (act,))
    after, how = renorm, "shift into the bias"
    if any(_zero_padded(gm.get_submodule(u.target)) for u in users):
        width = act.meta["tensor_meta"].shape[1]
        dtype = gm.get_submodule(users[0].target).weight.dtype
        shift = ChannelAffine(torch.ones(width, dtype=dtype), torch.full((width,), RELU_MEAN / RELU_STD, dtype=dtype))
        layout = act.meta.get(LAYOUT)
        if layout is not None:  # on a linked tensor: compaction and param_groups need its twins
            mark_twins(shift, layout)
        after = insert_module_after(gm, renorm, shift, f"{act.name}_renorm_shift", (renorm,))
        if layout is not None:
            after.meta[IN_LAYOUT] = layout
        how = "explicit shift (a consumer zero-pads)"
    for user in users:
        layer = gm.get_submodule(user.target)
        with torch.no_grad():
            if after is renorm:
                layer.bias += RELU_MEAN * layer.effective_weight().flatten(1).sum(1)
            layer.gamma *= RELU_STD
        user.replace_input_with(act, after)
    return how


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """1. Every conv / linear a BatchNorm was folded into becomes a NormProp layer with the
       same weight, ``gamma_j = c * ||W_j||`` and the folded bias: ``gamma * (W x) /
       (c ||W||) + b`` is then the folded layer (twin columns are zero, so the norm is
       the primaries'; after fine-tuning it covers both halves, which is NormProp on the
       linked layer).
    2. A ReLU (plain or linked ``mirror``) reading such a layer, whose every user is one,
       gets ``ReLURenorm`` after it; ``1 / std`` is absorbed into the users' gamma and the
       mean shift into their bias, or kept as a learnable per-channel shift when a user
       zero-pads. ReLUs feeding anything else (residual adds, pooling) are left as they are.
    A BN that fold_bn turned into a per-channel affine (not after a conv/linear) stays one.
    Needs current shapes (the linked widths): the pipeline propagates them first.
    Preserves: eval-mode outputs up to float rounding (reported per layer).
    """
    for bn in ctx.report.batchnorm:
        if bn["action"] == "affine":
            ctx.report.norm_layer(bn["name"], "normprop", "affine", "BN not after a conv/linear: a per-channel "
                                  "affine, as with fold")
    layers = _to_normprop(gm, ctx)
    for node in list(gm.graph.nodes):
        reason = _relu_refusal(gm, node)
        if reason is None or node.args[0] not in layers:
            continue
        users = list(node.users)
        if reason == "" and not all(u in layers for u in users):
            reason = "feeds something other than NormProp layers"
        if reason:
            ctx.report.norm_layer(node.name, "normprop", "not renormalised", reason)
            continue
        how = _renormalise(gm, node, users)
        ctx.report.norm_layer(node.name, "normprop", "renormalised", how)
    gm.recompile()
    return gm

"""Deep Control strategy: a BatchNorm on a conv output becomes a DeepControl2d."""
from __future__ import annotations

from torch import fx

from ..analysis import shape_of
from ..layers import layer_spec
from ..nn import DeepControl2d
from ..options import PassContext
from ..rewrite import own_module
from ..rules import is_batchnorm
from .fold_bn import bn_scale_shift


def _conv_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does ``node`` compute a conv's feature maps (a per-map mean exists)?"""
    shape = shape_of(node)
    spec = layer_spec(gm.get_submodule(node.target)) if node.op == "call_module" else None
    return spec is not None and spec.folds_bn and spec.feature_maps and shape is not None and len(shape) >= 3


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Each eval-mode BatchNorm (``rules.is_batchnorm``, running statistics present) whose input is a
    conv's output becomes ``DeepControl2d`` with ``alpha = 0`` and the BN's eval scale and
    shift (``alpha`` is learnable afterwards). The conv itself is left unfolded, whatever
    else reads it. Other BNs (pre-activation, after an add or a linear) are left to
    ``fold_bn`` and recorded as not controlled.
    Preserves: eval-mode outputs up to float rounding (scale and shift in float64).
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_batchnorm(gm.get_submodule(node.target)):
            continue
        bn = gm.get_submodule(node.target)
        if bn.running_mean is None or bn.running_var is None:
            continue  # fold_bn keeps and reports it
        producer = node.args[0]
        if not (isinstance(producer, fx.Node) and _conv_output(gm, producer)):
            ctx.report.norm_layer(node.target, "deep-control", "not applied",
                                  "input is not a conv's feature maps: left to fold_bn")
            continue
        scale, shift = bn_scale_shift(bn)
        dtype = bn.running_var.dtype
        own_module(gm, node, DeepControl2d.from_scale_shift(scale.to(dtype), shift.to(dtype)), "deep_control")
        ctx.report.bn(node.target, "deep-control", f"after {producer.target}")
        ctx.report.norm_layer(node.target, "deep-control", "deep-control", f"alpha = 0, after {producer.target}")
    gm.recompile()
    return gm

"""Export-time lowering of linked activations: conv/linear consumers read the two halves.

A linked activation ``cat(g(x), twin(x))`` feeding a conv needs a concatenation, and for a
grouped or depthwise consumer a per-group interleave (reshapes around the concat) and a conv
with two input channels per group, which leaves ONNX Runtime's depthwise kernel. The conv is
linear in its input, so ``conv(cat(p, t)) = conv_p(p) + conv_t(t)`` where ``conv_p`` /
``conv_t`` carry the weight columns that read the primaries / the twins: two ordinary convs
(one input channel per group for a depthwise one) and an add, which ORT fuses into the second
conv. No concat, reshape or interleave is left for such consumers.

The twin half is also computed without a ``Neg`` where the activation allows it exactly:
``relu(-x) = -min(x, 0)`` and ``hardtanh(-x; lo, hi) = -clamp(x, -hi, -lo)`` (ReLU6), the sign
moving into ``conv_t``'s weights; the ``minmax`` twin is ``min(x, 0)`` already.

This is applied to the copy that is exported (:func:`lnconvert.export.export_onnx`); the
converted PyTorch model keeps its linked layout and trainable twin weights.
"""
from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

from ..analysis import insert_module_after, propagate_shapes, shape_of
from ..layout import Layout
from ..nn import ChannelSelect, LinkedActivation
from ..rules import ACTIVATION_MODULES, CONV_MODULES
from .widen import read_columns


def _linked_layout(linked: LinkedActivation, width: int) -> Layout:
    """The layout a linked activation writes, from the width its consumer reads."""
    if linked.subset:
        kept = linked.twin_index.tolist()
        return Layout.linked(width - len(kept), 1, linked.dim, "", kept)
    return Layout.linked(width // 2, linked.groups, linked.dim, "")


def _reads_channels(module: nn.Module, dim: int, ndim: int) -> int | None:
    """The input width of a conv or linear that reads the channel axis ``dim`` of an
    ``ndim``-d tensor; None for anything else (kept on the concatenated tensor)."""
    if isinstance(module, nn.Linear) and dim == ndim - 1:
        return module.in_features
    if isinstance(module, tuple(CONV_MODULES)) and dim == 1 and isinstance(module.weight, nn.Parameter):
        return module.in_channels
    return None


def _narrowed(module: nn.Module, weight: torch.Tensor, keep_bias: bool) -> nn.Module:
    """Copy of ``module`` computing with ``weight`` (fewer input columns), bias optional."""
    new = copy.deepcopy(module)
    new.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if not keep_bias and getattr(new, "bias", None) is not None:
        new.register_parameter("bias", None)
    new._buffers.pop("lnc_twin_channels", None)  # it described the wide weight
    if isinstance(new, nn.Linear):
        new.in_features = weight.shape[1]
    else:
        new.in_channels = weight.shape[1] * new.groups
    return new


# g(x) = x * s(x) with s(-x) = 1 - s(x) gives g(-x) = g(x) - x in real arithmetic
SELF_GATED = frozenset({"relu", "silu", "gelu", "hardswish", "quick_gelu"})


def twin_from_primary(linked: LinkedActivation) -> tuple[float, float] | None:
    """(alpha, beta) with ``twin(x) = alpha * g(x) + beta * x`` for every x, where one exists:
    ``g(-x) = g(x) - x`` for self-gated g (ReLU, SiLU, GELU, Hardswish), ``lrelu(-x) = lrelu(x)
    - (1 + a) x``, and the minmax twin of ReLU ``min(x, 0) = x - relu(x)``."""
    kind = ACTIVATION_MODULES.get(type(linked.act))
    if linked.subset or linked.twin_act is not None:
        return None
    if linked.policy == "minmax":
        return (-1.0, 1.0) if kind == "relu" else None
    if kind in SELF_GATED:
        return 1.0, -1.0
    if kind == "leaky_relu":
        return 1.0, -(1.0 + linked.act.negative_slope)
    return None


def _twin_half(gm: fx.GraphModule, node: fx.Node, linked: LinkedActivation) -> tuple[fx.Node, float]:
    """Insert the twin half before ``node``; returns it and the sign that turns it into the
    twin the linked activation computes (exact: negation is exact in floating point)."""
    graph, source = gm.graph, node.args[0]
    twin_act = f"{node.target}.{'twin_act' if linked.twin_act is not None else 'act'}"
    if linked.subset:
        index = graph.get_attr(f"{node.target}.twin_index")
        source = graph.call_function(torch.index_select, (source, linked.dim, index))
    act = linked.act
    if linked.policy == "minmax":
        return graph.call_function(torch.clamp, (source,), {"max": 0.0}), 1.0
    if linked.twin_act is None and type(act) is nn.ReLU:
        return graph.call_function(torch.clamp, (source,), {"max": 0.0}), -1.0
    if linked.twin_act is None and isinstance(act, nn.Hardtanh):  # ReLU6 included
        return graph.call_function(torch.clamp, (source,), {"min": -act.max_val, "max": -act.min_val}), -1.0
    return graph.call_module(twin_act, (graph.call_function(torch.neg, (source,)),)), 1.0


def _lower_one(gm: fx.GraphModule, node: fx.Node, linked: LinkedActivation) -> int:
    """Rewrite the conv/linear consumers and primary selections of one linked activation;
    returns how many consumers now read the halves."""
    ndim = len(shape_of(node) or ())
    consumers = []
    for user in list(node.users):
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            continue
        module = gm.get_submodule(user.target)
        width = _reads_channels(module, linked.dim, ndim)
        if width is not None:
            consumers.append((user, module, _linked_layout(linked, width)))
    selects = [u for u in node.users if u.op == "call_module" and u.args == (node,)
               and isinstance(select := gm.get_submodule(u.target), ChannelSelect) and not select.copy]
    if not consumers and not selects:
        return 0
    identity = twin_from_primary(linked) if consumers else None
    with gm.graph.inserting_before(node):
        if identity is None:  # first: the negated producer must still have the activation as its only user
            twin, sign = _twin_half(gm, node, linked)
        else:  # the twin conv reads the activation's input: no twin tensor at all
            twin, sign = node.args[0], identity[1]
        primary = gm.graph.call_module(f"{node.target}.act", (node.args[0],))
    for user, module, layout in consumers:
        primary_w, twin_w = read_columns(module, layout)
        if linked.subset:  # the twin half holds the kept channels only, in channel order
            twin_w = twin_w[:, [c for c, t in enumerate(layout.twin) if t >= 0]]
        if identity is not None:
            primary_w = primary_w + identity[0] * twin_w
        reads_primary = insert_module_after(gm, user, _narrowed(module, primary_w, True), f"{user.target}_primary",
                                            (primary,))
        reads_twin = insert_module_after(gm, reads_primary, _narrowed(module, sign * twin_w, False),
                                         f"{user.target}_twin", (twin,))
        with gm.graph.inserting_after(reads_twin):
            total = gm.graph.call_function(operator.add, (reads_primary, reads_twin))
        user.replace_all_uses_with(total)
        gm.graph.erase_node(user)
    for select in selects:
        chosen = gm.get_submodule(select.target).index.tolist()
        if chosen == list(_linked_layout(linked, _width_of(linked, node)).primary):
            select.replace_all_uses_with(primary)
    return len(consumers)


def _width_of(linked: LinkedActivation, node: fx.Node) -> int:
    shape = shape_of(node)
    return shape[linked.dim] if shape else -1


def run(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` in which every conv/linear reading a linked activation's output
    directly reads its primary and twin halves through two narrower modules whose outputs
    are added, and every selection of the primaries reads the primary half; activations left
    without consumers are removed. Returns the copy and the number of consumers rewritten.
    Preserves: every output, up to float32 reassociation of each consumer's sum (the same
    weights for any twin values, trained or not); ``gm`` itself is not modified.
    """
    lowered = copy.deepcopy(gm)
    propagate_shapes(lowered, example_inputs)
    count = 0
    for node in list(lowered.graph.nodes):
        if node.op == "call_module" and isinstance(lowered.get_submodule(node.target), LinkedActivation):
            count += _lower_one(lowered, node, lowered.get_submodule(node.target))
    lowered.graph.eliminate_dead_code()
    lowered.delete_all_unused_submodules()
    lowered.recompile()
    return lowered, count

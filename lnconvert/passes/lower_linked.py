"""Export-time lowering of linked activations: conv/linear consumers read the two halves.

A linked activation ``cat(g(x), twin(x))`` feeding a conv needs a concatenation, and for a
grouped or depthwise consumer a per-group interleave (reshapes around the concat) and a conv
with two input channels per group, which leaves ONNX Runtime's depthwise kernel. The conv is
linear in its input, so ``conv(cat(p, t)) = conv_p(p) + conv_t(t)`` where ``conv_p`` /
``conv_t`` carry the weight columns that read the primaries / the twins: two ordinary convs
(one input channel per group for a depthwise one) and an add, which ORT fuses into the second
conv. No concat, reshape or interleave is left for such consumers.

The twin half is computed without materialising ``g(-x)`` where an exact identity allows:
self-gated activations (``g(-x) = g(x) - x``: ReLU, SiLU, GELU, Hardswish) and LeakyReLU let
the twin conv read ``x`` itself. ReLU6 (hardtanh on [0, hi]) is written with ops ONNX Runtime
keeps in its blocked layout (a standalone ``Clip`` is not, and costs two layout reorders):
after a conv, ``c = clamp(x, -hi, hi)`` (fused into the conv), primary ``relu(c)``, twin
``relu(-c) = relu(c) - c`` read as ``c``; after anything else (a sum of split convs),
``hi * clamp(x / hi, 0, 1)`` and ``hi * clamp(-x / hi, 0, 1)`` as two ``HardSigmoid``s, the
``hi`` moving into the consumers' weights.

This is applied to the copy that is exported (:func:`lnconvert.export.export_onnx`); the
converted PyTorch model keeps its linked layout and trainable twin weights.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..analysis import propagate_shapes, shape_of
from ..layers import TWIN_BUFFER, layer_spec
from ..layout import Layout
from ..nn import ChannelExpand, ChannelSelect, LinkedActivation
from ..rewrite import eliminate_dead_code, insert_module_after
from ..rules import ACTIVATION_MODULES
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
    spec = layer_spec(module)
    family = spec.family if spec is not None else None
    if family == "linear" and dim == ndim - 1:
        return module.in_features
    if family == "conv" and dim == 1 and isinstance(module.weight, nn.Parameter):
        return module.in_channels
    return None


def _narrowed(module: nn.Module, weight: torch.Tensor, keep_bias: bool) -> nn.Module:
    """Copy of ``module`` computing with ``weight`` (fewer input columns), bias optional."""
    new = copy.deepcopy(module)
    new.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if not keep_bias and getattr(new, "bias", None) is not None:
        new.register_parameter("bias", None)
    new._buffers.pop(TWIN_BUFFER, None)  # it described the wide weight
    if layer_spec(new).family == "linear":
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


@dataclass
class Halves:
    """What the split consumers read, and how their weights change: the primary conv gets
    ``primary_scale * (W_p + mix * W_t)``, the twin conv ``twin_scale * W_t``."""

    primary: fx.Node
    twin: fx.Node
    mix: float = 0.0
    primary_scale: float = 1.0
    twin_scale: float = 1.0


def _fuses_into_producer(source: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ONNX Runtime fuses an activation into ``source``'s producer: a conv whose
    output has no other reader (a sum of convs, or a shared output, leaves it standalone)."""
    if source.op != "call_module" or len(source.users) != 1:
        return False
    spec = layer_spec(gm.get_submodule(source.target))
    return spec is not None and spec.family == "conv"


def _hardsigmoid(graph: fx.Graph, x: fx.Node, alpha: float) -> fx.Node:
    """``clamp(alpha * x, 0, 1)`` as ``hardsigmoid(6 alpha x - 3)``, which the export folds into
    one ``HardSigmoid(alpha, beta=0)`` (:func:`lnconvert.export.fold_affine_into_hardsigmoid`)."""
    scaled = x if 6 * alpha == 1 else graph.call_function(torch.mul, (x, 6 * alpha))
    return graph.call_function(F.hardsigmoid, (graph.call_function(torch.add, (scaled, -3.0)),))


def _halves(gm: fx.GraphModule, node: fx.Node, linked: LinkedActivation, plain: bool) -> Halves:
    """Insert, before ``node``, the cheapest exact form of the two halves its consumers read;
    ``plain``: the halves themselves, unscaled (a max pooling on the way needs them).

    ONNX Runtime runs a conv in its blocked (NCHWc) layout and fuses the following activation
    into it when the conv's output has one reader; a standalone ``Relu``, ``Sigmoid`` or
    ``HardSigmoid`` stays in that layout, a standalone ``Clip`` does not (each is wrapped in
    layout reorders). So the twin is never a second function of the activation's input when
    an identity avoids it, and ReLU6 (hardtanh on [0, hi]) is written with fusable ops only.
    """
    graph, source, act = gm.graph, node.args[0], linked.act
    own_act = f"{node.target}.act"
    identity = None if plain else twin_from_primary(linked)
    if identity is not None:  # the twin conv reads the activation's input: no twin tensor at all
        return Halves(graph.call_module(own_act, (source,)), source, identity[0], 1.0, identity[1])
    clamps = (not plain and not linked.subset and linked.policy == "mirror" and linked.twin_act is None
              and type(act) in (nn.ReLU6, nn.Hardtanh) and act.min_val == 0)
    if clamps and _fuses_into_producer(source, gm):
        # c = clamp(x, -hi, hi) fuses into the conv; relu(c) = hardtanh(x), relu(-c) = relu(c) - c
        clamped = graph.call_function(torch.clamp, (source,), {"min": -act.max_val, "max": act.max_val})
        return Halves(graph.call_function(torch.relu, (clamped,)), clamped, 1.0, 1.0, -1.0)
    if clamps:  # both halves as hardsigmoids of the input, each in the blocked layout
        hi = act.max_val
        return Halves(_hardsigmoid(graph, source, 1 / hi), _hardsigmoid(graph, source, -1 / hi), 0.0, hi, hi)
    twin_act = f"{node.target}.{'twin_act' if linked.twin_act is not None else 'act'}"
    if linked.subset:
        index = graph.get_attr(f"{node.target}.twin_index")
        source = graph.call_function(torch.index_select, (source, linked.dim, index))
    sign = 1.0
    if linked.policy == "minmax":
        twin = graph.call_function(torch.clamp, (source,), {"max": 0.0})
    elif plain:
        twin = graph.call_module(twin_act, (graph.call_function(torch.neg, (source,)),))
    elif linked.twin_act is None and type(act) is nn.ReLU:  # relu(-x) = -min(x, 0)
        twin, sign = graph.call_function(torch.clamp, (source,), {"max": 0.0}), -1.0
    elif linked.twin_act is None and isinstance(act, nn.Hardtanh):  # hardtanh(-x) = -clamp(x, -hi, -lo)
        twin, sign = graph.call_function(torch.clamp, (source,), {"min": -act.max_val, "max": -act.min_val}), -1.0
    else:
        twin = graph.call_module(twin_act, (graph.call_function(torch.neg, (source,)),))
    return Halves(graph.call_module(own_act, (node.args[0],)), twin, twin_scale=sign)


# ops that act on every channel alike and linearly, so they commute with the split into
# halves (f(cat(p, t)) = cat(f(p), f(t))) and with the identities above (f(a p + b x) = a f(p)
# + b f(x)): pooling before a classifier or an SE block's squeeze; kept local to this pass
CHANNELWISE_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d,
                       nn.AvgPool3d, nn.Dropout, nn.Identity)
CHANNELWISE_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool2d, F.dropout)
# per channel but not linear: commute with the split of the plain halves only (resnet's stem)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _gate_of(gm: fx.GraphModule, user: fx.Node, source: fx.Node, layout: Layout) -> fx.Node | None:
    """For ``user = source * expand(gate)`` (an SE block's excitation) whose ChannelExpand gives a
    channel's primary and twin the same gate value: the ChannelExpand's node, else None."""
    if user.op != "call_function" or user.target not in (operator.mul, torch.mul) or user.kwargs \
            or len(user.args) != 2 or source not in user.args:
        return None
    other = user.args[1] if user.args[0] is source else user.args[0]
    if not isinstance(other, fx.Node) or other.op != "call_module" or other is source:
        return None
    expand = gm.get_submodule(other.target)
    if not isinstance(expand, ChannelExpand) or expand.dim != layout.dim or not layout.has_all_twins:
        return None
    index = expand.index.tolist()
    if any(index[p] != c or index[t] != c for c, (p, t) in enumerate(zip(layout.primary, layout.twin))):
        return None
    return other


def _is_max_pool(gm: fx.GraphModule, user: fx.Node) -> bool:
    return user.op == "call_module" and isinstance(module := gm.get_submodule(user.target), MAX_POOLS) \
        and not module.return_indices


def _commutes(gm: fx.GraphModule, user: fx.Node, source: fx.Node, dim: int) -> bool:
    """Whether ``user`` applies the same linear map (or a max pooling) to every channel of
    ``source`` (its only tensor argument), keeping the channel axis ``dim`` in place."""
    if user.args[:1] != (source,) or any(isinstance(a, fx.Node) for a in [*user.args[1:], *user.kwargs.values()]):
        return False
    if user.op == "call_module":
        module = gm.get_submodule(user.target)
        if _is_max_pool(gm, user):
            return True
        if isinstance(module, nn.Flatten):
            return module.start_dim == dim == 1 and module.end_dim == -1 and _trailing_ones(source, dim)
        return isinstance(module, CHANNELWISE_MODULES)
    if user.op in ("call_method", "call_function") and user.target in ("mean", torch.mean):  # mnasnet's pooling
        dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else dims
        return dims is not None and len(user.args) <= 3 and all(d > dim for d in dims) \
            and set(user.kwargs) <= {"dim", "keepdim"}
    if user.op == "call_function" and user.target is torch.flatten:
        start = user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0)
        return start == dim == 1 and len(user.args) <= 2 and _trailing_ones(source, dim)
    return user.op == "call_function" and user.target in CHANNELWISE_FUNCTIONS


def _trailing_ones(node: fx.Node, dim: int) -> bool:
    shape = shape_of(node)
    return shape is not None and all(s == 1 for s in shape[dim + 1:])


@dataclass
class Readers:
    """Where a linked activation's output goes: the ops on the way to conv/linear consumers
    that commute with the split (each with its gate's ChannelExpand for an excitation
    multiply, else None), in graph order; those consumers; the selections of the primaries
    (with the tensor they read); whether a max pooling on the way needs the plain halves."""

    steps: list[tuple[fx.Node, fx.Node | None]]
    consumers: list[tuple[fx.Node, nn.Module, Layout]]
    selects: list[fx.Node]
    plain: bool


def _split_readers(gm: fx.GraphModule, node: fx.Node, linked: LinkedActivation, layout: Layout) -> Readers:
    """The readers of ``node`` that can read its halves instead (see :class:`Readers`)."""
    steps, consumers, selects, plain = [], [], [], False

    def visit(source: fx.Node, ndim: int) -> bool:
        nonlocal plain
        found = False
        for user in list(source.users):
            if user.op == "call_module" and user.args == (source,) and \
                    isinstance(select := gm.get_submodule(user.target), ChannelSelect) and not select.copy \
                    and select.index.tolist() == list(layout.primary):
                selects.append(user)
                found = True
                continue
            if user.op == "call_module" and user.args == (source,) and not user.kwargs:
                module = gm.get_submodule(user.target)
                width = _reads_channels(module, linked.dim, ndim)
                if width is not None:
                    consumers.append((user, module, _linked_layout(linked, width)))
                    found = True
                    continue
            expand = None if linked.subset else _gate_of(gm, user, source, layout)
            if expand is not None or _commutes(gm, user, source, linked.dim):
                if visit(user, len(shape_of(user) or ())):
                    steps.append((user, expand))
                    plain = plain or _is_max_pool(gm, user)
                    found = True
        return found

    visit(node, len(shape_of(node) or ()))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return Readers(sorted(steps, key=lambda s: order[s[0]]), consumers, selects, plain)


def _lower_one(gm: fx.GraphModule, node: fx.Node, linked: LinkedActivation) -> int:
    """Rewrite the conv/linear consumers (reached directly or through ops that commute with
    the split) and primary selections of one linked activation; returns how many consumers
    now read the halves."""
    layout = _linked_layout(linked, _width_of(linked, node))
    readers = _split_readers(gm, node, linked, layout)
    if not readers.consumers and not readers.selects:
        return 0
    with gm.graph.inserting_before(node):
        if readers.consumers:
            halves = _halves(gm, node, linked, readers.plain)
        else:  # only selections: the primary half alone
            halves = Halves(gm.graph.call_module(f"{node.target}.act", (node.args[0],)), node)
    read = {node: (halves.primary, halves.twin)}
    for step, expand in readers.steps:  # the same op on each half (a gate unexpanded), after the original
        source = next(a for a in step.all_input_nodes if a in read)
        swap = {expand: expand.args[0]} if expand is not None else {}
        with gm.graph.inserting_after(step):
            read[step] = tuple(gm.graph.node_copy(step, lambda n, half=half: half if n is source else swap.get(n, n))
                               for half in read[source])
    own_act = None
    for select in readers.selects:
        if halves.primary_scale == 1:
            select.replace_all_uses_with(read[select.args[0]][0])
        elif select.args[0] is node:  # the primary half is scaled: the selection reads g(x) itself
            if own_act is None:
                with gm.graph.inserting_before(node):
                    own_act = gm.graph.call_module(f"{node.target}.act", (node.args[0],))
            select.replace_all_uses_with(own_act)
    for user, module, layout in readers.consumers:
        primary_w, twin_w = read_columns(module, layout)
        if linked.subset:  # the twin half holds the kept channels only, in channel order
            twin_w = twin_w[:, [c for c, t in enumerate(layout.twin) if t >= 0]]
        if halves.mix:
            primary_w = primary_w + halves.mix * twin_w
        primary_w = halves.primary_scale * primary_w
        reads_p, reads_t = read[user.args[0]]
        reads_primary = insert_module_after(gm, user, _narrowed(module, primary_w, True), f"{user.target}_primary",
                                            (reads_p,))
        reads_twin = insert_module_after(gm, reads_primary, _narrowed(module, halves.twin_scale * twin_w, False),
                                         f"{user.target}_twin", (reads_t,))
        with gm.graph.inserting_after(reads_twin):
            total = gm.graph.call_function(operator.add, (reads_primary, reads_twin))
        user.replace_all_uses_with(total)
        gm.graph.erase_node(user)
    return len(readers.consumers)


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
    eliminate_dead_code(lowered)
    lowered.delete_all_unused_submodules()
    lowered.recompile()
    return lowered, count

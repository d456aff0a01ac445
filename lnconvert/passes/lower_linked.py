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

A pooled classifier ``linear(flatten(pool(h)))`` reads the halves as two 1x1 convs summed
before one flatten, so the export has the original's single ``Reshape``, not one per half.

This is applied to the copy that is exported (:func:`lnconvert.export.export_onnx`); the
converted PyTorch model keeps its linked layout and trainable twin weights.
"""
from __future__ import annotations

import copy
import operator
from collections import Counter
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
    kept: dict[fx.Node, int | None]  # selection steps: how many leading channels each keeps (None: all)


def _halves_at(layout: Layout) -> dict[int, tuple[int, bool]]:
    """For each physical channel of a ``layout`` tensor: (its logical channel, whether a twin)."""
    return {p: (c, False) for c, p in enumerate(layout.primary)} | \
        {t: (c, True) for c, t in enumerate(layout.twin) if t >= 0}


def _leading_channels(select: ChannelSelect, layout: Layout) -> Layout | None:
    """The layout of ``select``'s output when it keeps the primary and the twin of logical
    channels ``0..n-1`` of a ``layout`` tensor and nothing else (a ghost module's ``[:, :out]``,
    in whatever order its reader wants), else None."""
    at = _halves_at(layout)
    picked = [at.get(i) for i in select.index.tolist()]
    count = len(picked) // 2
    if None in picked or select.copy or select.dim != layout.dim \
            or sorted(picked) != [(c, twin) for c in range(count) for twin in (False, True)]:
        return None
    position = {pick: k for k, pick in enumerate(picked)}
    return Layout(tuple(position[c, False] for c in range(count)), tuple(position[c, True] for c in range(count)),
                  layout.dim)


def _split_readers(gm: fx.GraphModule, node: fx.Node, linked: LinkedActivation, layout: Layout) -> Readers:
    """The readers of ``node`` that can read its halves instead (see :class:`Readers`)."""
    steps, consumers, selects, plain, kept = [], [], [], False, {}

    def visit(source: fx.Node, ndim: int, current: Layout) -> bool:
        nonlocal plain
        found = False
        for user in list(source.users):
            select = gm.get_submodule(user.target) if user.op == "call_module" and user.args == (source,) else None
            if isinstance(select, ChannelSelect) and not select.copy and current is layout \
                    and select.index.tolist() == list(layout.primary):
                selects.append(user)
                found = True
                continue
            if isinstance(select, ChannelSelect) and not linked.subset \
                    and (piece := _leading_channels(select, current)) is not None:
                if visit(user, ndim, piece):
                    steps.append((user, None))
                    kept[user] = piece.channels if piece.channels < current.channels else None
                    found = True
                continue
            if user.op == "call_module" and user.args == (source,) and not user.kwargs:
                module = gm.get_submodule(user.target)
                width = _reads_channels(module, linked.dim, ndim)
                if width is not None:
                    consumers.append((user, module, _linked_layout(linked, width) if current is layout else current))
                    found = True
                    continue
            expand = None if linked.subset else _gate_of(gm, user, source, current)
            if expand is not None or _commutes(gm, user, source, linked.dim):
                if visit(user, len(shape_of(user) or ()), current):
                    steps.append((user, expand))
                    plain = plain or _is_max_pool(gm, user)
                    found = True
        return found

    visit(node, len(shape_of(node) or ()), layout)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return Readers(sorted(steps, key=lambda s: order[s[0]]), consumers, selects, plain, kept)


def _is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A flatten from the channel axis on (the only kind a reader's walk passes, see _commutes)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Flatten)
    return node.op == "call_function" and node.target is torch.flatten


CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _as_pointwise_conv(linear: nn.Module, spatial: int) -> nn.Module:
    """The 1x1 convolution computing ``linear`` on a tensor whose ``spatial`` trailing dims are 1."""
    out_features, in_features = linear.weight.shape
    conv = CONVS[spatial](in_features, out_features, 1, bias=linear.bias is not None)
    conv.to(linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.detach().reshape(out_features, in_features, *[1] * spatial))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias.detach())
    return conv.requires_grad_(False)


def _flatten_after_linear(gm: fx.GraphModule, readers: Readers) -> bool:
    """Rewrite ``linear(f(flatten(x)))`` among the readers (a pooled classifier head: ``x`` has
    trailing ones, ``f`` zero or more channelwise steps) as ``flatten(conv1x1(f(x)))``, so the
    split halves are summed before one flatten, as the original's export has one Reshape, not
    one per half. Preserves every output (the same products and sums). Returns whether it
    rewrote any; the steps between then hold the unflattened shape (shapes must be refreshed)."""
    consumers = {user: module for user, module, _ in readers.consumers}
    steps = {step for step, expand in readers.steps if expand is None}
    rewrote = False
    for flatten in [step for step in steps if _is_flatten(gm, step)]:
        chain, tail = [], flatten
        while len(tail.users) == 1 and (reader := next(iter(tail.users))) in steps:
            chain.append(reader)
            tail = reader
        if len(tail.users) != 1 or (linear := next(iter(tail.users))) not in consumers \
                or layer_spec(consumers[linear]).family != "linear":
            continue
        spatial = len(shape_of(flatten.args[0])) - 2
        conv = insert_module_after(gm, linear, _as_pointwise_conv(consumers[linear], spatial), f"{linear.target}_conv",
                                   (tail,))
        with gm.graph.inserting_after(conv):
            flat = gm.graph.call_function(torch.flatten, (conv, 1))
        linear.replace_all_uses_with(flat)
        gm.graph.erase_node(linear)
        flatten.replace_all_uses_with(flatten.args[0])
        gm.graph.erase_node(flatten)
        rewrote = True
    return rewrote


def _lower_one(gm: fx.GraphModule, node: fx.Node, linked: LinkedActivation,
               example_inputs: tuple[torch.Tensor, ...]) -> int:
    """Rewrite the conv/linear consumers (reached directly or through ops that commute with
    the split) and primary selections of one linked activation; returns how many consumers
    now read the halves."""
    layout = _linked_layout(linked, _width_of(linked, node))
    readers = _split_readers(gm, node, linked, layout)
    if _flatten_after_linear(gm, readers):
        propagate_shapes(gm, example_inputs)
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
            if step in readers.kept:  # a selection of leading channels: each half's leading channels
                read[step] = tuple(_leading(gm, half, linked.dim, readers.kept[step]) for half in read[source])
            else:
                read[step] = tuple(gm.graph.node_copy(step, lambda n, half=half: half if n is source
                                                      else swap.get(n, n)) for half in read[source])
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


# node metadata: why the lowering added a layout op there (read by kept_whole)
WHY = "lnconvert_layout_why"


def _leading(gm: fx.GraphModule, half: fx.Node, dim: int, count: int | None) -> fx.Node:
    """``half`` narrowed to its first ``count`` channels (None: all of them, ``half`` itself)."""
    if count is None:
        return half
    narrowed = gm.graph.call_function(torch.narrow, (half, dim, 0, count))
    narrowed.meta[WHY] = "cut of a half's leading channels (the original cuts once, the halves twice)"
    return narrowed


def _width_of(linked: LinkedActivation, node: fx.Node) -> int:
    shape = shape_of(node)
    return shape[linked.dim] if shape else -1


def _cat_parts(gm: fx.GraphModule, node: fx.Node) -> list[tuple[fx.Node, LinkedActivation]] | None:
    """For ``cat([a1(x1), a2(x2), ...], dim)`` whose parts are all linked activations of one
    parameter-free kind on that dim, each with every twin (ghostnet's ghost module): the parts,
    else None."""
    if node.op != "call_function" or node.target is not torch.cat or not isinstance(node.args[0], (list, tuple)):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    parts = []
    for part in node.args[0]:
        if not isinstance(part, fx.Node) or part.op != "call_module":
            return None
        linked = gm.get_submodule(part.target)
        if not isinstance(linked, LinkedActivation) or linked.subset or linked.twin_act is not None \
                or linked.dim != dim or shape_of(part) is None:
            return None
        parts.append((part, linked))
    first = parts[0][1] if parts else None
    if first is None or any(type(a.act) is not type(first.act) or repr(a.act) != repr(first.act)
                            or a.policy != first.policy for _, a in parts):
        return None
    return parts


def _merge_linked_cat(gm: fx.GraphModule, cat: fx.Node, parts: list[tuple[fx.Node, LinkedActivation]]) -> None:
    """Rewrite ``cat([a(x1), a(x2)])`` read by channel selections as ``a(cat([x1, x2]))``, one
    linked activation in the block layout, each selection re-indexed to the same values: the
    concat of linked tensors (and their per-group layouts) becomes the original's concat of
    their inputs, and the new activation's readers can be split into halves."""
    dim = parts[0][1].dim
    where = {}  # old physical position -> (logical channel, is twin)
    offset, logical = 0, 0
    for part, linked in parts:
        width = shape_of(part)[dim]
        layout = _linked_layout(linked, width)
        where.update({offset + p: (logical + c, twin) for p, (c, twin) in _halves_at(layout).items()})
        offset, logical = offset + width, logical + layout.channels
    with gm.graph.inserting_before(cat):
        inputs = gm.graph.call_function(torch.cat, ([part.args[0] for part, _ in parts], dim))
    merged = LinkedActivation(parts[0][1].act, parts[0][1].policy, dim)
    merged_node = insert_module_after(gm, inputs, merged, f"{parts[0][0].target}_cat", (inputs,))
    for select in list(cat.users):
        module = gm.get_submodule(select.target)
        index = [c + logical * twin for c, twin in (where[i] for i in module.index.tolist())]
        moved = insert_module_after(gm, merged_node, ChannelSelect(index, dim, module.copy), f"{select.target}_cat",
                                    (merged_node,))
        select.replace_all_uses_with(moved)
        gm.graph.erase_node(select)
    gm.graph.erase_node(cat)


def _selects_only(gm: fx.GraphModule, node: fx.Node) -> bool:
    return bool(node.users) and all(
        u.op == "call_module" and u.args == (node,) and isinstance(gm.get_submodule(u.target), ChannelSelect)
        for u in node.users)


def merge_linked_cats(gm: fx.GraphModule) -> int:
    """Concats of linked activations read through channel selections (ghostnet's ghost
    modules: ``cat([a(conv(x)), a(dwconv(a(conv(x))))])[:, :out]``) become one linked
    activation of the concatenated inputs, whose selections of leading channels the lowering
    then follows like any other step. Preserves every output (the same values, re-indexed).
    Returns how many concats were merged; needs shapes on ``gm``'s nodes."""
    merged = 0
    for node in list(gm.graph.nodes):
        parts = _cat_parts(gm, node)
        if parts is not None and _selects_only(gm, node):
            _merge_linked_cat(gm, node, parts)
            merged += 1
    return merged


def kept_whole(gm: fx.GraphModule) -> Counter:
    """Why the lowered ``gm`` still moves channels: each lnconvert module left in its graph with
    what reads it, e.g. ``{"linked activation read by cat": 19, "channel selection": 28}``. A
    linked activation exports a ``Concat`` of its halves (plus two ``Reshape``s when laid out
    per group), a selection or expansion a ``Gather`` (a ``Slice`` for a contiguous range)."""
    kept = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, LinkedActivation):
            readers = sorted({_op_name(gm, user) for user in node.users})
            kept[f"linked activation read by {' / '.join(readers)}"] += 1
        elif isinstance(module, ChannelSelect):
            kept["channel selection (a chunk, split or slice boundary of a linked tensor)"] += 1
        elif isinstance(module, ChannelExpand):
            kept["channel expansion (a per-channel tensor repeated into the linked layout)"] += 1
    kept.update(node.meta[WHY] for node in gm.graph.nodes if WHY in node.meta)
    return kept


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


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
    if merge_linked_cats(lowered):
        eliminate_dead_code(lowered)  # the parts' activations nothing else reads
        propagate_shapes(lowered, example_inputs)
    count = 0
    for node in list(lowered.graph.nodes):
        if node.op == "call_module" and isinstance(lowered.get_submodule(node.target), LinkedActivation):
            count += _lower_one(lowered, node, lowered.get_submodule(node.target), example_inputs)
    eliminate_dead_code(lowered)
    lowered.delete_all_unused_submodules()
    lowered.recompile()
    return lowered, count

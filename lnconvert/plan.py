"""Link planning: which activations to link, and what every downstream op does with the
linked width. Pure analysis over a shape-annotated GraphModule; the rewrite passes
(link, widen, boundaries) carry the plan out.

Propagation walks the graph in topological order with each node's rule
(:mod:`lnconvert.rules`). A linked activation is kept only if its twins reach at least
one absorbing consumer; otherwise linking would cost width and buy nothing, so it is
skipped with that reason (iterated to a fixed point).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

from torch import fx, nn

from .analysis import normalize_dim, shape_of
from .layers import layer_spec
from .layout import Layout, merge_sources
from .options import ConvertOptions
from .rules import PAD_MODULES, TRANSPOSES, Kind, Rule, is_kind, layer_type, rule_for


@dataclass
class LinkPlan:
    linked: dict[str, tuple[Layout, int]] = field(default_factory=dict)  # act node -> (layout, groups)
    layouts: dict[str, Layout] = field(default_factory=dict)             # node -> layout of its output
    absorbers: dict[str, Layout] = field(default_factory=dict)           # node -> layout of its input
    channel_params: dict[str, Layout] = field(default_factory=dict)
    expands: dict[str, tuple[str, Layout]] = field(default_factory=dict)  # binary node -> (ordinary operand, layout)
    flattens: dict[str, int] = field(default_factory=dict)               # node -> start dim of torch.flatten
    rewires: dict[str, str] = field(default_factory=dict)                # node -> node whose value replaces it
    selects: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # piece -> (source, physical channels)
    boundaries: list[tuple[str, str, str, str]] = field(default_factory=list)  # consumer, producer, kind, reason
    skipped: dict[str, str] = field(default_factory=dict)                # act node -> reason

    def boundary(self, consumer: fx.Node, producer: fx.Node, reason: str, kind: str = "slice") -> None:
        self.boundaries.append((consumer.name, producer.name, kind, reason))


# ---------------------------------------------------------------- candidates
_SQUASHING = ("sigmoid", "hardsigmoid", "tanh")


def _is_gate(gm: fx.GraphModule, node: fx.Node, name: str) -> bool:
    """Output scales another tensor: broadcast into a product (squeeze-excitation, spatial
    attention), or a squashing function multiplying a same-shape tensor (``x * sigmoid(x)``).
    An activation that is the *data* operand of such a product is not a gate."""
    for user in node.users:
        rule = rule_for(gm, user)
        if rule is None or rule.kind is not Kind.BINARY or rule.op not in ("mul", "div"):
            continue
        if not any(isinstance(a, fx.Node) and a is not node for a in user.args[:2]):
            continue
        if shape_of(node) != shape_of(user) or name in _SQUASHING:
            return True
    return False


_LAYOUT_KEEPING = (Kind.PASS, Kind.CHANNEL_PARAMS)


def _reachable_absorbers(gm: fx.GraphModule, start: fx.Node) -> list[nn.Module]:
    """Absorbing modules reached from ``start`` through layout-keeping single-input ops."""
    found, frontier, seen = [], list(start.users), set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        rule = rule_for(gm, node)
        if rule is None:
            continue
        if rule.kind is Kind.ABSORB:
            found.append(gm.get_submodule(node.target))
        elif rule.kind in _LAYOUT_KEEPING:
            frontier.extend(node.users)
    return found


def _consumer_groups(gm: fx.GraphModule, node: fx.Node, channels: int) -> int:
    """Groups of a grouped/depthwise conv reading ``node``'s channels (1 if none)."""
    for module in _reachable_absorbers(gm, node):
        spec = layer_spec(module)
        if spec.groups(module) > 1 and spec.in_channels(module) == channels:
            return spec.groups(module)
    return 1


def _initial_layout(gm: fx.GraphModule, node: fx.Node, shape: tuple[int, ...]) -> tuple[Layout, int]:
    """Channel axis and grouping chosen from what the activation feeds: a Linear on a
    3D+ tensor reads the last axis; a grouped/depthwise conv wants a per-group layout."""
    ndim = len(shape)
    reads_last = any(layer_spec(m).input_channel_axis == -1 for m in _reachable_absorbers(gm, node))
    dim = ndim - 1 if ndim > 2 and reads_last else 1
    groups = _consumer_groups(gm, node, shape[dim]) if dim == 1 else 1
    return Layout.linked(shape[dim], groups, dim, node.name), groups


def find_candidates(gm: fx.GraphModule,
                    options: ConvertOptions) -> tuple[dict[str, tuple[Layout, int]], dict[str, str]]:
    chosen: dict[str, tuple[Layout, int]] = {}
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        rule = rule_for(gm, node)
        if rule is None or rule.kind is not Kind.ACTIVATION:
            continue
        shape = shape_of(node)
        if options.activations is not None and rule.name not in options.activations:
            skipped[node.name] = f"type {rule.name} not selected"
        elif shape is None or len(shape) < 2:
            skipped[node.name] = "output is not a batched tensor"
        elif _is_gate(gm, node, rule.name):
            skipped[node.name] = "gate: its output multiplies another tensor"
        elif options.twins is not None and node.name in options.twins and not options.twins[node.name]:
            skipped[node.name] = "compacted: no twin left"
        else:
            chosen[node.name] = _initial_layout(gm, node, shape)
            kept = options.twins.get(node.name) if options.twins is not None else None
            layout = chosen[node.name][0]
            if kept is not None and len(kept) < layout.channels:
                chosen[node.name] = Layout.linked(layout.channels, 1, layout.dim, node.name, kept), 1
    return chosen, skipped


# ---------------------------------------------------------------- propagation
def _carried(node: fx.Node, plan: LinkPlan) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if n.name in plan.layouts]


def _slice_all(node: fx.Node, carried: list[fx.Node], plan: LinkPlan, reason: str) -> None:
    for producer in carried:
        plan.boundary(node, producer, reason)


def _only_first_arg(node: fx.Node, carried: list[fx.Node]) -> bool:
    return len(carried) == 1 and bool(node.args) and node.args[0] is carried[0]


def _absorb(gm, node, carried, rule, plan, options) -> None:
    if not _only_first_arg(node, carried):
        return _slice_all(node, carried, plan, "linked tensor is not the data input")
    layout = plan.layouts[carried[0].name]
    module = gm.get_submodule(node.target)
    in_shape = shape_of(carried[0])
    spec = layer_spec(module)
    if layout.dim != spec.input_channel_dim(len(in_shape)):
        return plan.boundary(node, carried[0], "linked axis is not this layer's input axis")
    groups = spec.groups(module)
    if not layout.fits_groups(groups):
        return plan.boundary(node, carried[0], f"layout does not fit groups={groups}")
    plan.absorbers[node.name] = layout


def _pads_channel_axis(gm, node: fx.Node, layout: Layout, ndim: int) -> bool:
    if node.op == "call_module" and layer_type(gm.get_submodule(node.target)) in PAD_MODULES:
        padding = gm.get_submodule(node.target).padding
    elif node.target is nn.functional.pad:
        padding = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
    else:
        return False
    return ndim - len(padding) // 2 <= layout.dim  # pads cover the last len/2 axes


def _pass(gm, node, carried, rule, plan, options) -> None:
    if not _only_first_arg(node, carried) or shape_of(node) is None:
        return _slice_all(node, carried, plan, "op does not carry a linked tensor in this form")
    layout = plan.layouts[carried[0].name]
    if _pads_channel_axis(gm, node, layout, len(shape_of(node))):
        return plan.boundary(node, carried[0], "pads the channel axis")
    plan.layouts[node.name] = layout
    if rule.kind is Kind.CHANNEL_PARAMS:
        module = gm.get_submodule(node.target)
        if layout.dim != getattr(module, "dim", 1):
            plan.layouts.pop(node.name)
            return plan.boundary(node, carried[0], "per-channel parameters on another axis")
        plan.channel_params[node.name] = layout


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _channel_shuffle(gm, split: fx.Node, layout: Layout, in_shape: tuple, out_shape: tuple):
    """``view(N, G, C/G, ...) -> transpose -> [contiguous] -> view(N, C, ...)`` starting at
    ``split``: returns (last view, order) with out channel k = in channel order[k], or None."""
    d = layout.dim
    if (len(out_shape) != len(in_shape) + 1 or out_shape[:d] != in_shape[:d] or out_shape[d + 2:] != in_shape[d + 1:]
            or out_shape[d] * out_shape[d + 1] != in_shape[d]):
        return None
    transpose = _sole_user(split)
    if transpose is None or transpose.target not in TRANSPOSES:
        return None
    if {normalize_dim(a, len(out_shape)) for a in transpose.args[1:3]} != {d, d + 1}:
        return None
    merge = _sole_user(transpose)
    while merge is not None and merge.target == "contiguous":
        merge = _sole_user(merge)
    if merge is None or not is_kind(gm, merge, Kind.FLATTEN) or shape_of(merge) != in_shape:
        return None
    groups, per = out_shape[d], out_shape[d + 1]
    return merge, [g * per + j for j in range(per) for g in range(groups)]


def _flatten(gm, node, carried, rule, plan, options) -> None:
    if not _only_first_arg(node, carried):
        return _slice_all(node, carried, plan, "op does not carry a linked tensor in this form")
    layout = plan.layouts[carried[0].name]
    in_shape, out_shape = shape_of(carried[0]), shape_of(node)
    d = layout.dim
    if in_shape is None or out_shape is None:
        return plan.boundary(node, carried[0], "reshape of unknown shape")
    if out_shape == in_shape:  # a view to the same shape: a no-op
        plan.layouts[node.name] = layout
        plan.rewires[node.name] = carried[0].name
        return
    shuffle = _channel_shuffle(gm, node, layout, in_shape, out_shape)
    if shuffle is not None:  # a pure channel permutation: becomes a layout permutation, no runtime op
        merge, order = shuffle
        plan.layouts[merge.name] = layout.permuted(order)
        plan.rewires[merge.name] = carried[0].name
        return
    if len(out_shape) != d + 1 or out_shape[:d] != in_shape[:d] or out_shape[d] != math.prod(in_shape[d:]):
        return plan.boundary(node, carried[0], "reshape other than flattening the channel axis")
    plan.layouts[node.name] = layout.expand_trailing(math.prod(in_shape[d + 1:]))
    plan.flattens[node.name] = d


def _split_sizes(node: fx.Node, dim: int) -> list[int] | None:
    """Piece widths along ``dim`` from the traced shapes: sizes computed in ``forward``
    (``split(x, [k, x.shape[1] - k])``) are graph values, known only once shapes are."""
    pieces = node.meta.get("tensor_meta")
    if not isinstance(pieces, (list, tuple)) or not all(hasattr(p, "shape") for p in pieces):
        return None
    return [p.shape[dim] for p in pieces]


def _split(gm, node, carried, rule, plan, options) -> None:
    if not _only_first_arg(node, carried):
        return _slice_all(node, carried, plan, "op does not carry a linked tensor in this form")
    layout = plan.layouts[carried[0].name]
    in_shape = shape_of(carried[0])
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if in_shape is None or normalize_dim(dim, len(in_shape)) != layout.dim:
        return plan.boundary(node, carried[0], "splits another axis")
    sizes = _split_sizes(node, layout.dim)
    pieces = list(node.users)
    if sizes is None or not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in pieces):
        return plan.boundary(node, carried[0], "split whose pieces are not indexed directly")
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for piece in pieces:
        i = piece.args[1]
        _select(gm, piece, carried[0], layout, offsets[i], offsets[i] + sizes[i], plan)


def _select(gm, piece: fx.Node, source: fx.Node, layout: Layout, start: int, stop: int, plan: LinkPlan) -> None:
    """``piece`` reads logical channels [start, stop) of ``source``: a ChannelSelect of them
    and their twins, ordered per group when a grouped conv reads the piece (MixNet)."""
    groups = _consumer_groups(gm, piece, stop - start)
    physical, sub = layout.select(start, stop, groups)
    plan.selects[piece.name] = (source.name, physical)
    plan.layouts[piece.name] = sub


def _index(gm, node, carried, rule, plan, options) -> None:
    """``x[:, a:b]`` and other basic slicing: a channel slice becomes a selection."""
    if not _only_first_arg(node, carried):
        return _slice_all(node, carried, plan, "op does not carry a linked tensor in this form")
    layout = plan.layouts[carried[0].name]
    in_shape = shape_of(carried[0])
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if in_shape is None or not all(isinstance(i, slice) for i in index) or len(index) > len(in_shape):
        return plan.boundary(node, carried[0], "indexing other than slicing")
    trivial = [i == slice(None) for i in index] + [True] * (len(in_shape) - len(index))
    channel = index[layout.dim] if layout.dim < len(index) else slice(None)
    if trivial[layout.dim]:
        plan.layouts[node.name] = layout  # slices other axes only
        return
    start, stop, step = channel.indices(layout.channels)
    if step != 1 or not all(t for d, t in enumerate(trivial) if d != layout.dim):
        return plan.boundary(node, carried[0], "strided channel slice or slicing several axes")
    _select(gm, node, carried[0], layout, start, stop, plan)


def _binary(gm, node, carried, rule, plan, options) -> None:
    operands = list(node.args[:2])
    if len(operands) != 2 or not any(a in carried for a in operands) or len(carried) > 2:
        return _slice_all(node, carried, plan, "op does not carry a linked tensor in this form")
    out_shape = shape_of(node)
    if all(a in carried for a in operands):
        la, lb = (plan.layouts[a.name] for a in operands)
        if la == lb and shape_of(operands[0]) == shape_of(operands[1]) == out_shape:
            plan.layouts[node.name] = la.merged(lb)
            return
        return _slice_all(node, carried, plan, "operands carry different layouts")
    linked = next(a for a in operands if a in carried)
    other = operands[1] if linked is operands[0] else operands[0]
    layout = plan.layouts[linked.name]
    if shape_of(linked) != out_shape:
        return plan.boundary(node, linked, "linked operand is broadcast")
    if not isinstance(other, fx.Node):  # python scalar
        plan.layouts[node.name] = layout
        return
    other_shape = shape_of(other)
    if other_shape is None:
        return plan.boundary(node, linked, "other operand is not a tensor")
    axis = len(other_shape) - (len(out_shape) - layout.dim)  # other's axis aligned with ours
    if axis < 0 or other_shape[axis] == 1:
        plan.layouts[node.name] = layout  # broadcast over channels
        return
    if rule.op == "mul" or (rule.op == "div" and linked is operands[0]):
        plan.layouts[node.name] = layout
        plan.expands[node.name] = (other.name, layout)
        return
    if rule.op == "add" and options.residual == "gate" and any(t >= 0 for t in layout.twin):
        return plan.boundary(node, linked, "residual add with an ordinary tensor", kind="gate")
    plan.boundary(node, linked, f"residual {rule.op} with an ordinary tensor")


def _cat(gm, node, carried, rule, plan, options) -> None:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out_shape = shape_of(node)
    if not isinstance(tensors, (list, tuple)) or out_shape is None:
        return _slice_all(node, carried, plan, "op does not carry a linked tensor in this form")
    dim = normalize_dim(dim, len(out_shape))
    layouts = [plan.layouts[t.name] for t in tensors if t in carried]
    if all(lay.dim == dim for lay in layouts) and all(shape_of(t) is not None for t in tensors):
        parts = [plan.layouts[t.name] if t in carried else Layout.plain(shape_of(t)[dim], dim) for t in tensors]
        plan.layouts[node.name] = Layout.concat(parts, dim)
        return
    if all(t in carried for t in tensors) and all(lay == layouts[0] for lay in layouts):
        merged = layouts[0]
        for other in layouts[1:]:
            merged = merged.merged(other)
        plan.layouts[node.name] = merged
        return
    _slice_all(node, carried, plan, "concatenation of mixed layouts off the channel axis")


def _reduce(gm, node, carried, rule, plan, options) -> None:
    if not _only_first_arg(node, carried):
        return _slice_all(node, carried, plan, "op does not carry a linked tensor in this form")
    layout = plan.layouts[carried[0].name]
    in_shape = shape_of(carried[0])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or in_shape is None or shape_of(node) is None:
        return plan.boundary(node, carried[0], "reduces over the channel axis")
    dims = [normalize_dim(d, len(in_shape)) for d in ((dims,) if isinstance(dims, int) else dims)]
    if layout.dim in dims:
        return plan.boundary(node, carried[0], "reduces over the channel axis")
    new_dim = layout.dim if keepdim else layout.dim - sum(d < layout.dim for d in dims)
    plan.layouts[node.name] = layout.with_dim(new_dim)


_HANDLERS = {
    Kind.ABSORB: _absorb, Kind.PASS: _pass, Kind.CHANNEL_PARAMS: _pass, Kind.FLATTEN: _flatten,
    Kind.BINARY: _binary, Kind.CAT: _cat, Kind.REDUCE: _reduce, Kind.SPLIT: _split, Kind.INDEX: _index,
}


def propagate(gm: fx.GraphModule, chosen: dict[str, tuple[Layout, int]], options: ConvertOptions) -> LinkPlan:
    plan = LinkPlan(linked=dict(chosen))
    for node in gm.graph.nodes:
        carried = _carried(node, plan)
        if node.name in chosen:
            _slice_all(node, carried, plan, "input of a linked activation")
            plan.layouts[node.name] = chosen[node.name][0]
            continue
        if not carried:
            continue
        if node.op == "output":
            _slice_all(node, carried, plan, "model output")
            continue
        rule: Rule | None = rule_for(gm, node)
        handler = _HANDLERS.get(rule.kind) if rule is not None else None
        if handler is None:
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
            _slice_all(node, carried, plan, f"no rule for {what}")
        else:
            handler(gm, node, carried, rule, plan, options)
    return plan


def plan_links(gm: fx.GraphModule, options: ConvertOptions) -> LinkPlan:
    """Choose the activations to link and propagate their layouts to a fixed point."""
    chosen, skipped = find_candidates(gm, options)
    while True:
        plan = propagate(gm, chosen, options)
        useful = merge_sources(plan.absorbers.values())
        useless = [name for name in chosen if name not in useful]
        if not useless:
            break
        for name in useless:
            skipped[name] = "no absorbing consumer: its output only reaches boundaries"
            del chosen[name]
    plan.skipped = skipped
    return plan

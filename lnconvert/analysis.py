"""Facts about a GraphModule: shapes, channel counts, costs, call sites, dead units.

Nothing here changes a graph or a module (``propagate_shapes`` only records ``tensor_meta``
on the nodes); the edits passes make are in :mod:`lnconvert.rewrite`."""
from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .layers import layer_spec
from .layout import Layout
from .nn import LinkedActivation
from .rules import ACTIVATION_MODULES, layer_type


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node by running the graph once.

    ShapeProp prints a traceback of its own on failure; the caller turns the exception
    into a one-line error instead, so that print is swallowed."""
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        _PlainListShapeProp(gm).propagate(*example_inputs)


class _PlainListShapeProp(ShapeProp):
    """ShapeProp handing plain lists to the functions it calls. fx's interpreter passes list
    arguments as its ``immutable_list``, and a wrapped function that writes into one (torchvision's
    swin3d ``_get_window_and_shift_size``) fails there although the GraphModule itself runs."""

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_function(target, _plain(args), _plain(kwargs))


def _plain(value: Any) -> Any:
    """``value`` with every list (fx's immutable ones included) copied into a plain list."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if type(value) is tuple:  # named tuples keep their type and fields
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The traced output shape of a node, or None for non-tensors and non-nodes."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def reads_input(node: fx.Node) -> bool:
    """Whether ``node``'s value depends on a graph input, not only on parameters and constants
    (a functional ``batch_norm`` of a conv weight, timm's weight standardisation, does not)."""
    seen, stack = {node}, [node]
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return True
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return False


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates per sample of every conv / linear, from recorded shapes."""
    total = 0
    for node in gm.graph.nodes:
        spec = layer_spec(gm.get_submodule(node.target)) if node.op == "call_module" else None
        out_shape = shape_of(node)
        in_shape = shape_of(node.args[0]) if node.args else None
        if spec is not None and out_shape is not None and in_shape is not None:
            total += spec.macs(gm.get_submodule(node.target), in_shape, out_shape)
    return int(total)


def channel_mismatch(gm: fx.GraphModule) -> str | None:
    """The first conv / linear whose input width (from the recorded shapes) differs from what
    its weights read, described; None when all match."""
    for node in gm.graph.nodes:
        spec = layer_spec(gm.get_submodule(node.target)) if node.op == "call_module" else None
        in_shape = shape_of(node.args[0]) if node.args else None
        if spec is None or in_shape is None:
            continue
        expected = spec.in_channels(gm.get_submodule(node.target))
        got = in_shape[spec.input_channel_dim(len(in_shape))]
        if got != expected:
            return f"node {node.name} ({node.target}) gets {got} channels but its module expects {expected}"
    return None


@dataclass
class DeadUnits:
    """Dead units of one activation call site. A unit is a channel (a feature for dense
    layers); it is dead when its output is zero (``|a| <= threshold``) at every position of
    every sample seen. A linked unit is dead only when its primary *and* its twin are."""

    layer: str          # module name; ``name#k`` for the k-th call of a shared module
    kind: str           # activation type, ``linked <type>`` for linked activations
    units: int
    dead: int
    primary_dead: int   # units whose primary half alone is dead (= ``dead`` when not linked)

    @property
    def fraction(self) -> float:
        return self.dead / self.units if self.units else 0.0

    @property
    def primary_fraction(self) -> float:
        return self.primary_dead / self.units if self.units else 0.0


def _alive(out: torch.Tensor, dim: int, threshold: float) -> torch.Tensor:
    """Per channel along ``dim``: is any entry above ``threshold`` in magnitude?"""
    return (out.detach().abs() > threshold).movedim(dim, 0).flatten(1).any(dim=1)


def dead_units(model: nn.Module, loader: Iterable[Any], *, threshold: float = 0.0, max_batches: int | None = None,
               channel_dim: int = 1) -> list[DeadUnits]:
    """Per activation layer, the units whose output is zero for every sample of ``loader``.

    Hooks every activation module (the types lnconvert links, and :class:`LinkedActivation`
    as one layer) and runs ``model`` in eval mode without gradients; its mode is restored.
    ``loader`` yields input tensors or ``(inputs, ...)`` tuples. Ordinary activations use
    ``channel_dim`` as the unit axis, linked ones their own layout. Functional activations
    (``F.relu`` inside ``forward``) are not modules and are not seen; converted models have
    none (the converter turns them into modules). Works before and after conversion: a
    converted model's ``primary_dead`` equals the original's ``dead``.
    """
    alive: dict[str, torch.Tensor] = {}
    info: dict[str, tuple[str, nn.Module]] = {}
    calls: Counter = Counter()
    # LinkedActivation is lnconvert's own module (not a user layer type): any subclass is one
    linked_names = [n for n, m in model.named_modules() if isinstance(m, LinkedActivation)]

    def inside_linked(name: str) -> bool:  # the inner act of a LinkedActivation is part of it
        return any(name.startswith(f"{ln}.") for ln in linked_names)

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            calls[name] += 1
            key = name if calls[name] == 1 else f"{name}#{calls[name]}"
            dim = module.dim if isinstance(module, LinkedActivation) else channel_dim  # ours: its own axis
            now = _alive(out, normalize_dim(dim, out.dim()), threshold)
            alive[key] = alive[key] | now if key in alive else now
            info[key] = (name, module)
        return record

    handles = [model.register_forward_pre_hook(lambda *_: calls.clear())]
    for name, module in model.named_modules():
        activation = layer_type(module) in ACTIVATION_MODULES and not inside_linked(name)
        if activation or isinstance(module, LinkedActivation):  # ours: hooked as one layer
            handles.append(module.register_forward_hook(hook(name)))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()

    rows = []
    for key, live in alive.items():
        _, module = info[key]
        if isinstance(module, LinkedActivation):  # ours: primaries and twins in its layout
            if module.subset:  # compacted: primaries, then twins of the kept channels only
                channels = live.numel() - module.twin_index.numel()
                layout = Layout.linked(channels, 1, module.dim, "", module.twin_index.tolist())
            else:
                layout = Layout.linked(live.numel() // 2, module.groups, module.dim, "")
            has_twin = torch.tensor([t >= 0 for t in layout.twin])
            primary = live[list(layout.primary)]
            twin = torch.where(has_twin, live[[max(t, 0) for t in layout.twin]], False)
            kind = f"linked {ACTIVATION_MODULES.get(type(module.act), type(module.act).__name__)}"
            rows.append(DeadUnits(key, kind, layout.channels, int((~(primary | twin)).sum()), int((~primary).sum())))
        else:
            dead = int((~live).sum())
            rows.append(DeadUnits(key, ACTIVATION_MODULES[layer_type(module)], live.numel(), dead, dead))
    return rows

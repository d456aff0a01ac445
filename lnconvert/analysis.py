"""Facts about a GraphModule: shapes, channel counts, costs, call sites, dead units.

Nothing here changes a graph or a module (``propagate_shapes`` only records ``tensor_meta``
on the nodes); the edits passes make are in :mod:`lnconvert.rewrite`."""
from __future__ import annotations

import contextlib
import functools
import io
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .layers import layer_spec
from .layout import Layout
from .nn import ChannelAffine, LinkedActivation
from .nn.affine import broadcast_shape
from .rules import ACTIVATION_MODULES, layer_type


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node.

    The graph runs on meta tensors (:func:`_run_on_meta`): shapes and dtypes without any
    arithmetic, ~5 ms for a 224x224 ResNet-50 where a forward pass takes 0.2-0.7 s on one core.
    What meta tensors cannot run (a value-dependent op such as ``nonzero`` or ``.item()``, a tensor
    made on the CPU inside ``forward``) runs on ``example_inputs`` themselves instead, and that
    run's error is the one raised. ShapeProp prints a traceback of its own on failure; the
    caller turns the exception into a one-line error instead, so that print is swallowed."""
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        try:
            _run_on_meta(gm, tuple(_plain(example_inputs, _to_meta)))
        except Exception:  # noqa: BLE001 - whatever fails on meta tensors is run for real
            _PlainListShapeProp(gm).propagate(*example_inputs)


class _PlainListShapeProp(ShapeProp):
    """ShapeProp handing plain lists to the functions it calls. fx's interpreter passes list
    arguments as its ``immutable_list``, and a wrapped function that writes into one (torchvision's
    swin3d ``_get_window_and_shift_size``) fails there although the GraphModule itself runs."""

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_function(target, _plain(args), _plain(kwargs))


def _run_on_meta(gm: fx.GraphModule, inputs: tuple) -> None:
    """Run ``gm``'s graph on meta ``inputs`` node by node, as ``fx.Interpreter`` does (without its
    per-node bookkeeping), recording what ShapeProp records. Common ops get their result
    directly (:func:`_shortcut`: meta kernels are Python, ~0.1 ms a call); a module that runs
    runs with meta copies of its parameters and buffers."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    remaining = iter(gm.graph.process_inputs(*inputs))
    env: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        args, kwargs = _plain(fx.node.map_arg((node.args, node.kwargs), env.__getitem__))
        if node.op == "output":
            value = args[0]
        elif node.op == "placeholder":  # a placeholder's args hold its default, if any
            value = list(remaining) if node.target.startswith("*") else next(remaining, *args[:1])
        elif node.op == "get_attr":
            value = _to_meta(functools.reduce(getattr, node.target.split("."), gm))
        else:
            call = modules[node.target] if node.op == "call_module" else node.target
            value = _shortcut(node.op, call, args, kwargs)
            if value is None:
                value = _run_op(node.op, call, args, kwargs)
        _record(node, value)
        env[node] = value


def _record(node: fx.Node, value: Any) -> None:
    """What ShapeProp records: ``tensor_meta`` where ``value`` holds tensors, and its type."""
    tensors = []

    def describe(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        tensors.append(v)
        return _tensor_meta(v)

    meta = map_aggregate(value, describe)
    if tensors:
        node.meta["tensor_meta"] = meta
    node.meta["type"] = type(value)


def _shortcut(op: str, call: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The meta result of a common op whose shape and dtype are plain: activations, dropout, norms
    keep their input's, elementwise add / sub / mul broadcast, cat adds up, convolutions, linear
    layers and adaptive pooling compute theirs, a :class:`LinkedActivation` widens its axis (each
    raising what the op itself would refuse); None for everything else, which runs."""
    first = args[0] if args else None
    if op == "call_module":
        rule = _MODULE_SHAPES.get(type(call))
        return rule(call, first) if rule is not None and len(args) == 1 and not kwargs and _is_float(first) else None
    if op == "call_method":
        return _meta_like(first) if call in _SAME_SHAPE_METHODS and _is_float(first) else None
    call = _hashable(call)
    if call in _SAME_SHAPE_FUNCTIONS and _is_float(first):
        return _meta_like(first)
    if call in _BROADCAST_FUNCTIONS and len(args) == 2 and not kwargs:
        return _broadcast(*args)
    if call is F.adaptive_avg_pool2d and len(args) == 2 and not kwargs and _is_float(first):
        return _adaptive_pool_shape(*args)
    if call is F.layer_norm and len(args) >= 2 and _is_float(first):
        return _layer_norm_shape(*args[:2])
    return _cat_shape(*args, **kwargs) if call is torch.cat else None


def _run_op(op: str, call: Any, args: tuple, kwargs: dict) -> Any:
    """Run one op on meta tensors as the graph would."""
    if op == "call_module":  # with meta copies of its parameters and buffers
        state = {name: t.to("meta") for name, t in [*call.named_parameters(), *call.named_buffers()]}
        return torch.func.functional_call(call, state, args, kwargs)
    if op == "call_method":
        return getattr(args[0], call)(*args[1:], **kwargs)
    return call(*args, **kwargs)


_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _tensor_meta(t: torch.Tensor) -> TensorMetadata:
    """ShapeProp's record of a (meta, so unquantized) tensor, without its Python contiguity checks."""
    memory_format = next((f for f in _MEMORY_FORMATS if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), memory_format, False, {})


def _meta_like(x: torch.Tensor, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous meta tensor of ``x``'s (or the given) shape and dtype: ``empty_like`` and
    ``new_empty`` run Python refs on meta tensors. Strides in the record may thus differ from a
    real run's (a channels-last input); shapes and dtypes do not."""
    return torch.empty(x.shape if shape is None else shape, dtype=dtype or x.dtype, device="meta")


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _hashable(target: Any) -> Any:
    try:
        hash(target)
    except TypeError:
        return None
    return target


def _broadcast(a: Any, b: Any) -> torch.Tensor | None:
    """The meta result of an elementwise op on tensors / numbers with a floating result, else None."""
    tensors = [t for t in (a, b) if isinstance(t, torch.Tensor)]
    if not tensors or not all(isinstance(v, (torch.Tensor, int, float)) for v in (a, b)):
        return None
    dtype = torch.result_type(a, b)
    if not dtype.is_floating_point:
        return None
    return _meta_like(tensors[0], _broadcast_shapes(*(t.shape for t in tensors)), dtype)


def _broadcast_shapes(*shapes: Sequence[int]) -> list[int]:
    """``torch.broadcast_shapes`` (a Python ref on meta-sized work) for plain int shapes."""
    out = [1] * max(len(s) for s in shapes)
    for shape in shapes:
        for i, size in enumerate(shape, len(out) - len(shape)):
            if size != out[i] and 1 not in (size, out[i]):
                raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
            out[i] = size if out[i] == 1 else out[i]
    return out


def _cat_shape(tensors: Any, dim: int = 0) -> torch.Tensor | None:
    """The meta result of ``torch.cat`` of same-dtype floating tensors of one rank, else None."""
    if not isinstance(tensors, (list, tuple)) or not tensors or not all(_is_float(t) for t in tensors):
        return None
    first = tensors[0]
    if first.dim() == 0 or any(t.dim() != first.dim() or t.dtype != first.dtype for t in tensors):
        return None
    dim = normalize_dim(dim, first.dim())
    others = [s for i, s in enumerate(first.shape) if i != dim]
    if any([s for i, s in enumerate(t.shape) if i != dim] != others for t in tensors):
        raise ValueError(f"torch.cat: sizes of tensors must match except in dimension {dim}")
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return _meta_like(first, shape)


def _affine_shape(module: ChannelAffine, x: torch.Tensor) -> torch.Tensor:
    shape = broadcast_shape(module.dim, x.dim())
    shape[module.dim] = module.scale.numel()
    dtype = torch.promote_types(torch.promote_types(x.dtype, module.scale.dtype), module.shift.dtype)
    return _meta_like(x, _broadcast_shapes(x.shape, shape), dtype)


def _conv_shape(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor | None:
    """A batched, zero-padded convolution's output; None (run it) for string padding, another
    padding mode, unbatched input or another dtype than the weight's. Raises what the
    convolution would: wrong input width, input smaller than the kernel."""
    weight, spatial = module.weight, len(module.kernel_size)
    if (isinstance(module.padding, str) or module.padding_mode != "zeros" or x.dim() != spatial + 2
            or x.dtype != weight.dtype):
        return None
    if x.shape[1] != weight.shape[1] * module.groups:
        raise ValueError(f"{module} got {x.shape[1]} input channels")
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
            zip(x.shape[2:], module.padding, module.dilation, module.kernel_size, module.stride)]
    if min(size) < 1:
        raise ValueError(f"{module}: input {tuple(x.shape)} is smaller than the kernel")
    return _meta_like(x, [x.shape[0], weight.shape[0], *size])


def _linear_shape(module: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    if x.dim() == 0 or x.dtype != module.weight.dtype:
        return None
    if x.shape[-1] != module.weight.shape[1]:
        raise ValueError(f"{module} got {x.shape[-1]} input features")
    return _meta_like(x, [*x.shape[:-1], module.weight.shape[0]])


def _layer_norm_shape(x: torch.Tensor, normalized_shape: Sequence[int]) -> torch.Tensor:
    normalized = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[x.dim() - len(normalized):]) != normalized:
        raise ValueError(f"layer_norm over {normalized} of an input of shape {tuple(x.shape)}")
    return _meta_like(x)


def _adaptive_pool_shape(x: torch.Tensor, output_size: Any) -> torch.Tensor | None:
    """``adaptive_avg_pool2d``'s output on a 3-D / 4-D input (None entries keep that size)."""
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if x.dim() not in (3, 4) or len(size) != 2:
        return None
    return _meta_like(x, [*x.shape[:-2], *(n if s is None else s for n, s in zip(x.shape[-2:], size))])


def _same_shape(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _meta_like(x)


def _batchnorm_shape(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module._check_input_dim(x)  # what BatchNorm's forward checks first
    if x.dim() < 2 or x.shape[1] != module.num_features:
        raise ValueError(f"{type(module).__name__}({module.num_features}) got input of shape {tuple(x.shape)}")
    return _meta_like(x)


def _linked_shape(module: LinkedActivation, x: torch.Tensor) -> torch.Tensor | None:
    """Primaries and twins along ``module.dim``; None (run ``forward``) for other activations."""
    dim = normalize_dim(module.dim, x.dim())
    channels = x.shape[dim]
    if type(module.act) not in _SAME_SHAPE_MODULES or module.twin_act is not None or channels % module.groups:
        return None
    shape = list(x.shape)
    shape[dim] += module.twin_index.numel() if module.subset else channels
    return _meta_like(x, shape)


_SAME_SHAPE_MODULES = frozenset({
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardtanh,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Identity})
_MODULE_SHAPES = {t: _same_shape for t in _SAME_SHAPE_MODULES} | \
    {t: _batchnorm_shape for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)} | \
    {t: _conv_shape for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d)} | \
    {nn.Linear: _linear_shape, nn.LayerNorm: lambda module, x: _layer_norm_shape(x, module.normalized_shape),
     nn.AdaptiveAvgPool2d: lambda module, x: _adaptive_pool_shape(x, module.output_size),
     LinkedActivation: _linked_shape, ChannelAffine: _affine_shape}
_SAME_SHAPE_FUNCTIONS = frozenset({
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.silu, F.gelu, F.hardswish, F.hardtanh, F.hardsigmoid,
    F.mish, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout})
_SAME_SHAPE_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"})
_BROADCAST_FUNCTIONS = frozenset({operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul})


def _plain(value: Any, leaf: Callable[[Any], Any] = lambda v: v) -> Any:
    """``value`` with every list (fx's immutable ones included) copied into a plain list, and
    ``leaf`` applied to everything else."""
    if isinstance(value, list):
        return [_plain(v, leaf) for v in value]
    if type(value) is tuple:  # named tuples keep their type and fields
        return tuple(_plain(v, leaf) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v, leaf) for k, v in value.items()}
    return leaf(value)


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


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. A sum is finite only then (an Inf or NaN anywhere makes it
    Inf or NaN), and one reduction is some 50x faster than ``isfinite().all()``; a sum that is not
    finite (which overflow alone can make it) is settled element by element."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _layer_calls(gm: fx.GraphModule) -> Iterable[tuple[fx.Node, nn.Module, Any]]:
    """(node, module, its LayerSpec) for every call of a registered conv / linear layer."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        spec = layer_spec(module) if module is not None else None
        if spec is not None:
            yield node, module, spec


def count_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates per sample of every conv / linear, from recorded shapes."""
    total = 0
    for node, module, spec in _layer_calls(gm):
        out_shape = shape_of(node)
        in_shape = shape_of(node.args[0]) if node.args else None
        if out_shape is not None and in_shape is not None:
            total += spec.macs(module, in_shape, out_shape)
    return int(total)


def channel_mismatch(gm: fx.GraphModule) -> str | None:
    """The first conv / linear whose input width (from the recorded shapes) differs from what
    its weights read, described; None when all match."""
    for node, module, spec in _layer_calls(gm):
        in_shape = shape_of(node.args[0]) if node.args else None
        if in_shape is None:
            continue
        expected = spec.in_channels(module)
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

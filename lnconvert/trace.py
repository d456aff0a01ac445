"""Tracing any nn.Module to an fx.GraphModule, with timm awareness and clear failures."""
from __future__ import annotations

import copy
import inspect
from typing import Any, Iterable

import torch
from torch import fx, nn

from .errors import TraceError
from .layers import lookup_type, registered_layers
from .rules import _RULES, ACTIVATION_MODULES, is_frozen_batchnorm


def _timm_notrace() -> tuple[set[type], list[Any]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return set(), []
    return set(timm_fx.get_notrace_modules()), list(timm_fx.get_notrace_functions())


class ConvertTracer(fx.Tracer):
    """fx tracer that keeps timm's non-traceable layers, every module lnconvert has a rule
    for (frozen BatchNorms of any class too), and user-named submodules as leaves, and
    remembers where tracing failed."""

    def __init__(self, leaf_modules: Iterable[str] = ()):
        notrace_modules, notrace_functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(notrace_functions))
        self.leaf_types = (notrace_modules | {t for t in _RULES if isinstance(t, type)} | set(ACTIVATION_MODULES)
                           | set(registered_layers()))
        self.leaf_names = set(leaf_modules)
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf_type = lookup_type(type(m), self.leaf_types) in self.leaf_types
        if leaf_type or module_qualified_name in self.leaf_names or is_frozen_batchnorm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # innermost module first
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "control flow" in text:
        return "data-dependent control flow (an `if`/loop on a tensor value)"
    return f"{type(exc).__name__}: {text}"


def defaults_beyond(model: nn.Module, count: int) -> dict[str, Any]:
    """The parameters of ``model.forward`` after its first ``count`` positional ones that have a
    default, with it (``{}`` when ``*args`` could take the first ``count``)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params[:count + 1]) or \
            sum(p.kind in positional for p in params[:count]) < count:
        return {}
    return {p.name: p.default for p in params[count:]
            if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD}


def _drop_guards(graph: fx.Graph, count: int) -> None:
    """Erase each placeholder after the first ``count`` that only feeds call_function nodes
    reaching nothing else (fx's guards that a fixed argument has its fixed value), with them."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for placeholder in [n for n in graph.nodes if n.op == "placeholder"][count:]:
        reached, todo = {placeholder}, [placeholder]
        while todo:
            users = [u for u in todo.pop().users if u not in reached]
            reached.update(users)
            todo += users
        if all(n.op == "call_function" for n in reached - {placeholder}):
            for node in sorted(reached, key=order.__getitem__, reverse=True):  # users first
                graph.erase_node(node)


def trace(model: nn.Module, leaf_modules: Iterable[str] = (), inputs: int | None = None) -> fx.GraphModule:
    """Trace ``model`` (already a private copy, in eval mode) to a GraphModule.

    With ``inputs`` (how many example inputs the model is called with) every later argument of
    its ``forward`` that has a default is fixed to it, as the model runs on those inputs (an
    optional ``mask=None`` would otherwise be traced as a graph input, so ``if mask is not None``
    would take the masked branch); the graph takes only the ``inputs``.

    Raises :class:`TraceError` naming the innermost module being traced when it fails
    and suggesting ``leaf_modules`` (those are kept as opaque calls; a linked tensor
    reaching one is sliced back to its primaries).
    """
    tracer = ConvertTracer(leaf_modules)
    fixed = defaults_beyond(model, inputs) if inputs is not None else {}
    try:
        graph = tracer.trace(model, concrete_args=fixed or None)
        if fixed:
            _drop_guards(graph, inputs)
    except Exception as exc:  # fx raises many types; all become one clear message
        where = tracer.failed_in
        location = f" in module '{where[0] or '<root>'}' ({where[1]})" if where else ""
        hint = f"; try leaf_modules=['{where[0]}'] (CLI: --leaf {where[0]})" if where and where[0] else ""
        hint += "; or convert its traceable parts in place: partial unset (CLI: --no-save; not savable yet)"
        raise TraceError(f"cannot trace {type(model).__name__}{location}: {_reason(exc)}{hint}") from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def private_eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode, so the caller's model is never mutated."""
    clone = copy.deepcopy(model)
    clone.eval()
    return clone


def example_input_size(model: nn.Module, override: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """(C, H, W) from ``override``, timm's ``pretrained_cfg['input_size']``, or 3x224x224."""
    if override is not None:
        return tuple(override)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size:
        return tuple(int(s) for s in size)
    return (3, 224, 224)


def default_example_inputs(model: nn.Module, batch: int = 2, input_size: tuple[int, ...] | None = None,
                           seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Any, ...]:
    """A random batch the model accepts: ``input_size`` (C, H, W; video C, T, H, W) or the
    model's configured size; torchvision task models get their task's inputs (lnconvert.tasks:
    a list of images for detection, two image batches for optical flow, a long enough clip)."""
    from .tasks import example_inputs

    task_inputs = example_inputs(model, batch, input_size, seed, dtype)
    if task_inputs is not None:
        return task_inputs
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, *example_input_size(model, input_size))
    return (torch.randn(shape, generator=generator, dtype=dtype),)

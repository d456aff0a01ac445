"""Read-only facts about a GraphModule: shapes, channel counts, costs, call sites."""
from __future__ import annotations

import contextlib
import io
import math
from collections import Counter
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .rules import ABSORB_MODULES, CONV_TRANSPOSE_MODULES


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node by running the graph once.

    ShapeProp prints a traceback of its own on failure; the caller turns the exception
    into a one-line error instead, so that print is swallowed."""
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(gm).propagate(*example_inputs)


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The traced output shape of a node, or None for non-tensors and non-nodes."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def call_site_counts(gm: fx.GraphModule) -> Counter:
    """How many call_module nodes use each submodule (shared modules have > 1)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def own_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, suffix: str) -> None:
    """Install ``module`` for this call site only, under a fresh name when the old
    submodule is shared with other call sites, so rewriting one site leaves the rest alone."""
    if call_site_counts(gm)[node.target] == 1:
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
        return
    base = f"{node.target}_{suffix}"
    name, i = base, 1
    while _has_submodule(gm, name):
        i += 1
        name = f"{base}{i}"
    gm.add_submodule(name, module)
    node.target = name


def _has_submodule(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False


def insert_module_after(gm: fx.GraphModule, anchor: fx.Node, module: nn.Module, name: str,
                        args: tuple) -> fx.Node:
    """Add ``module`` under a unique name derived from ``name`` and call it right after ``anchor``."""
    base = name.replace(".", "_")
    unique, i = base, 1
    while _has_submodule(gm, unique):
        i += 1
        unique = f"{base}_{i}"
    gm.add_submodule(unique, module)
    with gm.graph.inserting_after(anchor):
        return gm.graph.call_module(unique, args)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates per sample of every conv / linear, from recorded shapes."""
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, tuple(ABSORB_MODULES)):
            continue
        out_shape = shape_of(node)
        in_shape = shape_of(node.args[0]) if node.args else None
        if out_shape is None or in_shape is None:
            continue
        if isinstance(module, nn.Linear):
            total += math.prod(out_shape[1:]) * module.in_features
        elif isinstance(module, CONV_TRANSPOSE_MODULES):
            total += math.prod(in_shape[1:]) * (module.out_channels // module.groups) * math.prod(module.kernel_size)
        else:
            total += math.prod(out_shape[1:]) * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return int(total)


def check_channels(gm: fx.GraphModule, pass_name: str) -> None:
    """After a structural pass: every absorbing module's input width matches its weights."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        in_shape = shape_of(node.args[0]) if node.args else None
        if in_shape is None or not isinstance(module, tuple(ABSORB_MODULES)):
            continue
        expected = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        got = in_shape[-1] if isinstance(module, nn.Linear) else in_shape[1]
        if got != expected:
            raise AssertionError(f"after pass {pass_name}: node {node.name} ({node.target}) gets {got} "
                                 f"channels but its module expects {expected}")

"""Graph edits the passes share: give one call site its own module, insert a module call,
remove dead code."""
from __future__ import annotations

import copy
import operator
from collections import Counter
from typing import Any, Iterable

import torch
from torch import fx, nn

from .rules import is_inplace_call


def call_site_counts(gm: fx.GraphModule) -> Counter:
    """How many call_module nodes use each submodule (shared modules have > 1)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def copy_module(module: nn.Module, replaced: Iterable[torch.Tensor | None] = ()) -> nn.Module:
    """A deep copy of ``module`` whose ``replaced`` tensors (about to be set anew on the copy) are
    not copied but None, so a pass rewriting a large weight does not first duplicate it."""
    return copy.deepcopy(module, {id(t): None for t in replaced if t is not None})


def own_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, suffix: str) -> None:
    """Install ``module`` for this call site only, under a fresh name when the old
    submodule is shared with other call sites, so rewriting one site leaves the rest alone."""
    if len(gm.graph.find_nodes(op="call_module", target=node.target, sort=False)) == 1:
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




# functions of the pure modules below that write into an argument or an object
_MUTATING = frozenset({operator.setitem, operator.delitem, setattr, delattr, *(
    getattr(operator, f"i{name}") for name in ("add", "and", "concat", "floordiv", "lshift", "matmul", "mod", "mul",
                                                "or", "pow", "rshift", "sub", "truediv", "xor"))})
_PURE_MODULES = ("_operator", "operator", "builtins", "math")


def _defined_in(target: Any) -> str:
    """The module a call_function target comes from (a Tensor method: its class's)."""
    return getattr(target, "__module__", None) or getattr(getattr(target, "__objclass__", None), "__module__", "") or ""


def may_have_side_effects(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` must stay although nothing reads its output: what torch.fx keeps
    (placeholders, outputs, mutating or random aten ops, ``torch._assert``), every in-place call
    (``x.add_(y)``, ``ReLU(inplace=True)``, ``x += y``, ``out=``), and every call_function that is
    not a torch / operator / math / builtin function: a wrapped user function (``torch.fx.wrap``)
    may write into its arguments (torchvision's MViT adds its pooled residual in place in
    ``_add_shortcut`` and ignores the result)."""
    if node.is_impure() or is_inplace_call(gm, node) or node.kwargs.get("out") is not None:
        return True
    if node.op != "call_function":
        return False
    module = _defined_in(node.target)
    if module in _PURE_MODULES:
        return node.target in _MUTATING
    return not (module == "torch" or module.startswith("torch."))


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove the nodes whose outputs nothing reads, keeping those that may have side effects
    (:func:`may_have_side_effects`). Preserves: every output and every write into a tensor
    read later. Does not recompile."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda node: may_have_side_effects(gm, node))

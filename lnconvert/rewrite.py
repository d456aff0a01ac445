"""Graph edits the passes share: give one call site its own module, insert a module call."""
from __future__ import annotations

import copy
from collections import Counter
from typing import Iterable

import torch
from torch import fx, nn


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



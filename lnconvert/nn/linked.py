"""Modules the converter inserts into graphs; all usable from scratch and ONNX-exportable."""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from .affine import ChannelAffine, broadcast_shape  # noqa: F401  (ChannelAffine lived here: old import path)

POLICIES = ("mirror", "minmax")


def _out_of_place(act: nn.Module) -> nn.Module:
    act = copy.deepcopy(act)
    if getattr(act, "inplace", False):
        act.inplace = False  # the linked pair reads x twice
    return act


class LinkedActivation(nn.Module):
    """``cat(g(x), twin(x))`` on the channel axis (Linked Neurons, Molina et al. 2017).

    ``mirror``: twin = g(-x) (a parametric g such as PReLU gets its own copy of the
    parameters); ``minmax``: twin = min(x, 0). For ``groups > 1`` the output is laid out
    per group (that group's primaries, then its twins) so that a grouped or depthwise
    consumer sees each channel's pair inside its own group. ``twin_channels`` keeps twins
    for those channels only (a compacted model): output ``cat(g(x), twin(x[:, kept]))``.
    """

    def __init__(self, act: nn.Module, policy: str = "mirror", dim: int = 1, groups: int = 1,
                 twin_channels: Sequence[int] | None = None):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
        if groups > 1 and (dim < 0 or twin_channels is not None):
            raise ValueError("a grouped layout needs a non-negative channel dim and every twin")
        self.act = _out_of_place(act)
        has_params = any(True for _ in self.act.parameters())
        self.twin_act = copy.deepcopy(self.act) if policy == "mirror" and has_params else None
        self.policy, self.dim, self.groups = policy, dim, groups
        self.subset = twin_channels is not None
        if self.subset:
            kept = sorted(twin_channels)
            _index_buffer(self, "twin_index", kept)
            if self.twin_act is not None:  # per-channel parameters (PReLU) follow the kept channels
                for name, param in list(self.twin_act.named_parameters(recurse=False)):
                    if param.dim() == 1 and param.numel() > 1:
                        setattr(self.twin_act, name, nn.Parameter(param.detach()[kept].clone()))
                if hasattr(self.twin_act, "num_parameters"):
                    self.twin_act.num_parameters = len(kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.act(x)
        source = x.index_select(self.dim, self.twin_index) if self.subset else x
        if self.policy == "mirror":
            twin = (self.twin_act if self.twin_act is not None else self.act)(-source)
        else:
            twin = torch.clamp(source, max=0.0)
        if self.groups == 1:
            return torch.cat([primary, twin], dim=self.dim)
        shape = (self.groups, primary.shape[self.dim] // self.groups)
        pair = torch.cat([primary.unflatten(self.dim, shape), twin.unflatten(self.dim, shape)], dim=self.dim + 1)
        return pair.flatten(self.dim, self.dim + 1)

    def extra_repr(self) -> str:
        kept = f", twins={self.twin_index.numel()}" if self.subset else ""
        return f"policy={self.policy}, dim={self.dim}, groups={self.groups}{kept}"


def _index_buffer(module: nn.Module, name: str, index: Sequence[int]) -> None:
    module.register_buffer(name, torch.tensor(list(index), dtype=torch.long), persistent=False)


class ChannelSelect(nn.Module):
    """Keep the given channels: the primaries of a linked tensor (a ``slice`` boundary),
    or one piece of a ``chunk``/``split``.

    A contiguous range becomes a narrow (ONNX ``Slice``), anything else a gather.
    ``copy=True`` returns fresh memory, for consumers that write in place.
    """

    def __init__(self, index: Sequence[int], dim: int = 1, copy: bool = False):
        super().__init__()
        index = list(index)
        self.dim, self.copy = dim, copy
        self.length = len(index)
        self.start = index[0] if index and index == list(range(index[0], index[0] + len(index))) else -1
        _index_buffer(self, "index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.start >= 0:
            out = x.narrow(self.dim, self.start, self.length)
            return out.clone() if self.copy else out
        return x.index_select(self.dim, self.index)

    def extra_repr(self) -> str:
        where = f"[{self.start}:{self.start + self.length}]" if self.start >= 0 else "gathered"
        return f"{self.length} channels {where}, dim={self.dim}"


class ChannelExpand(nn.Module):
    """Repeat an ordinary per-channel tensor into a linked layout (e.g. an SE gate).

    ``index[k]`` is the logical channel of physical channel ``k``.
    """

    def __init__(self, index: Sequence[int], dim: int = 1):
        super().__init__()
        self.dim = dim
        _index_buffer(self, "index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.dim, self.index)


class GatedMerge(nn.Module):
    """``primary + a * twin`` per channel with ``a`` learnable, initialised to 0.

    The ``gate`` residual boundary: exact at conversion, and lets the twins reach the
    residual stream once ``a`` is trained. A channel without a twin (index -1, e.g. after
    compaction) reads a constant zero twin.
    """

    def __init__(self, primary: Sequence[int], twin: Sequence[int], dim: int = 1):
        super().__init__()
        self.dim = dim
        self.gate = nn.Parameter(torch.zeros(len(primary)))
        self.complete = all(t >= 0 for t in twin)
        width = len(primary) + sum(1 for t in twin if t >= 0)
        _index_buffer(self, "primary_index", primary)
        _index_buffer(self, "twin_index", [t if t >= 0 else width for t in twin])  # width: the zero channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = broadcast_shape(self.dim, x.dim())
        primary = x.index_select(self.dim, self.primary_index)
        if not self.complete:
            x = torch.cat([x, torch.zeros_like(x.narrow(self.dim, 0, 1))], dim=self.dim)
        twin = x.index_select(self.dim, self.twin_index)
        return primary + self.gate.view(shape) * twin


class _NamedLinked(LinkedActivation):
    """A LinkedActivation whose base activation is the subclass's ``base`` factory."""

    base: Callable[[], nn.Module]

    def __init__(self, policy: str = "mirror", dim: int = 1, groups: int = 1):
        super().__init__(self.base(), policy, dim, groups)


class LinkedReLU(_NamedLinked):
    """``cat(relu(x), relu(-x))`` (CReLU); ``minmax``: ``cat(relu(x), min(x, 0))``."""
    base = staticmethod(nn.ReLU)


class LinkedSELU(_NamedLinked):
    """``cat(selu(x), selu(-x))``: the paper's best variant in the 50-layer plain net."""
    base = staticmethod(nn.SELU)


class LinkedSiLU(_NamedLinked):
    """``cat(silu(x), silu(-x))`` (linked Swish)."""
    base = staticmethod(nn.SiLU)


class LinkedELU(_NamedLinked):
    """``cat(elu(x), elu(-x))``."""
    base = staticmethod(nn.ELU)


class LinkedGELU(_NamedLinked):
    """``cat(gelu(x), gelu(-x))``."""
    base = staticmethod(nn.GELU)


class LinkedPReLU(LinkedActivation):
    """Two PReLUs with their own slopes: ``cat(prelu_a(x), prelu_b(-x))`` (``mirror``), each
    with ``num_parameters`` slopes initialised to ``init``; ``minmax`` keeps one set."""

    def __init__(self, num_parameters: int = 1, init: float = 0.25, policy: str = "mirror", dim: int = 1,
                 groups: int = 1):
        super().__init__(nn.PReLU(num_parameters, init), policy, dim, groups)

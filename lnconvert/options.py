"""Conversion options and the context every pass receives."""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import UsageError
from .nn import POLICIES
from .report import DEFAULT_TOLERANCE, ConversionReport
from .rules import ACTIVATION_NAMES, ALIASES

RESIDUAL_MODES = ("slice", "gate")
NORM_STRATEGIES = ("fold", "normprop", "deep-control")  # what replaces a BatchNorm (docs/strategies.md)


@dataclass(frozen=True)
class ConvertOptions:
    drop_bn: bool = True
    link: bool = True
    policy: str = "mirror"
    activations: tuple[str, ...] | None = None  # None: every supported type
    residual: str = "slice"
    leaf_modules: tuple[str, ...] = ()
    tolerance: float = DEFAULT_TOLERANCE
    precision: str = "float64"
    # compaction: activation node -> channels that keep a twin (absent: all twins)
    twins: dict[str, tuple[int, ...]] | None = None
    norm: str = "fold"
    lcw: bool = False  # project weights onto zero sum per unit (changes the function by design)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise UsageError(f"unknown policy {self.policy!r}; choose one of: {', '.join(POLICIES)}")
        if self.residual not in RESIDUAL_MODES:
            raise UsageError(f"unknown residual mode {self.residual!r}; choose one of: {', '.join(RESIDUAL_MODES)}")
        if self.activations is not None:
            names = tuple(ALIASES.get(a.strip().lower(), a.strip().lower()) for a in self.activations if a.strip())
            unknown = sorted(set(names) - ACTIVATION_NAMES)
            if unknown:
                raise UsageError(f"unknown activation type(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(ACTIVATION_NAMES))}")
            object.__setattr__(self, "activations", names)
        if self.norm not in NORM_STRATEGIES:
            raise UsageError(f"unknown norm strategy {self.norm!r}; choose one of: {', '.join(NORM_STRATEGIES)}")
        if self.norm != "fold" and not self.drop_bn:
            raise UsageError(f"norm={self.norm!r} replaces BatchNorm; "
                             "it cannot be combined with keeping BN (--keep-bn)")
        if self.precision not in ("float64", "float32"):
            raise UsageError(f"unknown precision {self.precision!r}; choose float64 or float32")
        if not self.tolerance > 0:
            raise UsageError(f"tolerance must be positive, got {self.tolerance}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def graph_kwargs(self) -> dict[str, Any]:
        """The ``convert()`` keyword arguments that decide the converted graph (all but the
        verification settings): rebuilding with them gives the same graph (load, compact)."""
        return {k: v for k, v in asdict(self).items() if k not in ("tolerance", "precision")}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "ConvertOptions":
        """Inverse of :meth:`to_dict` after a JSON round trip (lists back to tuples)."""
        data = dict(data)
        for key in ("activations", "leaf_modules"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        if data.get("twins") is not None:
            data["twins"] = {k: tuple(v) for k, v in data["twins"].items()}
        return ConvertOptions(**data)


@dataclass
class PassContext:
    """What every pass receives beside the graph; ``plan`` is set by the pipeline's plan step
    (a :class:`lnconvert.plan.LinkPlan`) for the rewrite passes that carry it out."""

    options: ConvertOptions
    report: ConversionReport
    example_inputs: tuple[torch.Tensor, ...] = field(default_factory=tuple)
    plan: Any = None


def renamed_argument(new_value, old_value, old: str, new: str, function: str, *, empty=None):
    """The value of an argument renamed from ``old`` to ``new``: the old name still works for
    one version, with a DeprecationWarning."""
    if old_value is empty:
        return new_value
    if new_value is not empty:
        raise UsageError(f"{function}: pass {new}= only ({old}= is its deprecated name)")
    warnings.warn(f"{function}({old}=...) is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
    return old_value

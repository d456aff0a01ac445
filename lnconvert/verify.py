"""Parity checks in PyTorch: the converted model against the original, output by output.

By default both models are evaluated in float64 on the same inputs: that measures what
the conversion changed (weights are still the stored float32 values), free of the float32
rounding noise that a deep float32 network shows against itself. The float32 deviation
and the original's own float32 rounding floor are reported next to it.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import one_line
from .report import ConversionReport, OutputParity

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and restore every submodule's training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def flat_outputs(output: Any) -> list[tuple[str, torch.Tensor]]:
    leaves, _ = tree_flatten(output)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if len(tensors) == 1:
        return [("output", tensors[0])]
    return [(f"output[{i}]", t) for i, t in enumerate(tensors)]


def parity(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """(max |delta|, max |delta| / max(1, max |reference|)); inf on shape or NaN mismatch."""
    if reference.shape != candidate.shape:
        return float("inf"), float("inf")
    ref, cand = reference.detach().double(), candidate.detach().double()
    if not torch.equal(torch.isnan(ref), torch.isnan(cand)):
        return float("inf"), float("inf")
    delta = (ref - cand).nan_to_num(0.0).abs()
    max_abs = float(delta.max()) if delta.numel() else 0.0
    scale = max(1.0, float(ref.nan_to_num(0.0).abs().max())) if ref.numel() else 1.0
    return max_abs, max_abs / scale


def _run(model: nn.Module, args: tuple, dtype: torch.dtype | None) -> list[tuple[str, torch.Tensor]]:
    if dtype is not None:
        args = tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, args)
    return flat_outputs(model(*args))


def native_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating parameter (float32 when it has none)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return param.dtype if param is not None else torch.float32


def precision_of(dtype: torch.dtype) -> str:
    """The ``precision`` name of ``dtype`` (a key of :data:`PRECISIONS`)."""
    return next(name for name, value in PRECISIONS.items() if value == dtype)


def wider_than(model: nn.Module, precision: str) -> bool:
    """Whether ``precision`` is wider than ``model``'s own dtype (a float64 check of a float32
    model): outputs may then exceed the tolerance by the storage of converted weights in the
    model's dtype alone (the float32-rounding rule, docs/verification.md)."""
    return PRECISIONS[precision].itemsize > native_dtype(model).itemsize


def compare(reference: nn.Module, candidate: nn.Module, inputs: Sequence[tuple[str, tuple[torch.Tensor, ...]]],
            tolerance: float, precision: str = "float64") -> list[OutputParity]:
    """Run both models in eval mode on each named input tuple; one row per output and input.

    Neither model is modified: the ``precision`` runs use copies. When the reference's own
    dtype is not ``precision``, each row also gets both models' deviation in their own dtypes
    and the reference's own rounding floor.
    """
    dtype = PRECISIONS[precision]
    upcast = native_dtype(reference) != dtype
    rows = []
    with torch.no_grad(), eval_mode(reference), eval_mode(candidate):
        wide_ref = copy.deepcopy(reference).to(dtype) if upcast else reference
        wide_cand = copy.deepcopy(candidate).to(dtype) if native_dtype(candidate) != dtype else candidate
        for label, args in inputs:
            expected, got = _run(wide_ref, args, dtype), _run(wide_cand, args, dtype)
            if upcast:
                native_ref, native_cand = _run(reference, args, None), _run(candidate, args, None)
            if len(expected) != len(got):
                rows.append(OutputParity("outputs", label, float("inf"), float("inf"), False, precision))
                continue
            for i, ((name, ref), (_, cand)) in enumerate(zip(expected, got)):
                max_abs, max_rel = parity(ref, cand)
                row = OutputParity(name, label, max_abs, max_rel, max_rel <= tolerance, precision)
                if upcast:
                    row.native_rel = parity(native_ref[i][1], native_cand[i][1])[1]
                    row.native_noise = parity(ref, native_ref[i][1])[1]
                rows.append(row)
    return rows


def accept_float32_rounding(measure: Callable[[], tuple[float, float]], tolerance: float, bad: list,
                            report: ConversionReport) -> None:
    """The float32-rounding rule (docs/verification.md): pass the ``bad`` rows (above the
    tolerance in a precision wider than the model's dtype) when ``measure()`` (as
    :func:`lnconvert.convert.float64_copy_errors`) shows that a float64 copy converts within
    ``tolerance`` and that the converted model is that conversion with its values rounded to its
    dtype, within ``tolerance``: the graph is then right and the excess is only float32 storage of
    the converted weights, which no model of that dtype avoids. Records both numbers either way;
    when they cannot be measured (e.g. the model does not run in float64) the rows stay failed."""
    try:
        report.float64_conversion_error, report.rounded_copy_error = measure()
    except Exception as exc:  # the rule only excuses: without its measurements the failure stands
        report.warnings.append(f"no float64 check ({one_line(exc)})")
        return
    if max(report.float64_conversion_error, report.rounded_copy_error) > tolerance:
        return
    for row in bad:
        row.ok = True
    worst = max(bad, key=lambda p: p.max_rel)
    floor = "" if worst.native_noise is None else f" (the original's own float32 rounding: {worst.native_noise:.1e})"
    report.warnings.append(
        f"{len(bad)} output(s) above the tolerance {tolerance:.0e} only by float32 storage of the converted "
        f"weights: max rel {worst.max_rel:.1e}{floor}; a float64 copy converts within "
        f"{report.float64_conversion_error:.1e}, and this model is that conversion rounded to float32 (max rel "
        f"{report.rounded_copy_error:.1e})")


def float64_check_note(report: ConversionReport) -> str:
    """What the float32-rounding rule measured, for a failure message ('' when it did not run)."""
    if report.float64_conversion_error is None:
        return next((f"; {w}" for w in report.warnings if w.startswith("no float64 check")), "")
    return (f"; a float64 copy converts to max rel {report.float64_conversion_error:.1e}, and this model is "
            f"{report.rounded_copy_error:.1e} from it rounded to float32")

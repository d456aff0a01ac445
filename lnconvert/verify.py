"""Parity checks in PyTorch: the converted model against the original, output by output.

By default both models are evaluated in float64 on the same inputs: that measures what
the conversion changed (weights are still the stored float32 values), free of the float32
rounding noise that a deep float32 network shows against itself. The float32 deviation
and the original's own float32 rounding floor are reported next to it.
"""
from __future__ import annotations

import contextlib
import copy
import gc
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import fx, nn
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


Outputs = list[list[tuple[str, torch.Tensor]]]  # per input tuple: the model's named outputs


@dataclass
class ReferenceOutputs:
    """The reference model's outputs on each input tuple: in the comparison's precision, and
    in its own dtype (None when that is the same)."""

    wide: Outputs
    native: Outputs | None


def _floating(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]


@contextlib.contextmanager
def cast_while_called(gm: fx.GraphModule, dtype: torch.dtype) -> Iterator[fx.GraphModule]:
    """``gm`` running in ``dtype`` without a copy: each module it calls is cast in place while
    it runs and cast back right after, the tensors the graph reads itself (``get_attr``) for the
    whole run. Casting back is exact when ``dtype`` is wider (float32 -> float64 -> float32), so
    ``gm`` ends with the same values, and only one module at a time is held in ``dtype``."""
    attrs = _floating(_attribute(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr")
    pinned = {id(t) for t in attrs}
    original = {id(t): t.dtype for t in _floating((*gm.parameters(), *gm.buffers(), *attrs))}
    called = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}

    def cast(tensors: Iterable[torch.Tensor], to: Callable[[torch.Tensor], torch.dtype]) -> None:
        for t in _floating(tensors):
            t.data = t.data.to(to(t))

    def narrow(module: nn.Module) -> None:
        cast((t for t in (*module.parameters(), *module.buffers()) if id(t) not in pinned), lambda t: original[id(t)])

    handles = [hook for m in called.values() for hook in (
        m.register_forward_pre_hook(lambda module, args: cast((*module.parameters(), *module.buffers()),
                                                              lambda t: dtype)),
        m.register_forward_hook(lambda module, args, output: narrow(module)))]
    try:
        cast(attrs, lambda t: dtype)
        yield gm
    finally:
        for handle in handles:
            handle.remove()
        cast((*gm.parameters(), *gm.buffers(), *attrs), lambda t: original[id(t)])


def _attribute(gm: fx.GraphModule, target: str) -> object:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _outputs(model: nn.Module, inputs: Sequence[tuple[str, tuple[torch.Tensor, ...]]], dtype: torch.dtype,
             in_place: bool = False) -> Outputs:
    """``model``'s outputs on every input tuple, run in ``dtype``: as it is when that is its own,
    else on a copy in ``dtype``, or (``in_place``, a GraphModule) cast while called."""
    if native_dtype(model) == dtype:
        return [_run(model, args, dtype) for _, args in inputs]
    if in_place:
        with cast_while_called(model, dtype):
            return [_run(model, args, dtype) for _, args in inputs]
    wide = copy.deepcopy(model).to(dtype)
    try:
        return [_run(wide, args, dtype) for _, args in inputs]
    finally:
        del wide
        gc.collect()  # a copied GraphModule is in a reference cycle (its graph points back at it)


def reference_outputs(reference: nn.Module, inputs: Sequence[tuple[str, tuple[torch.Tensor, ...]]],
                      precision: str = "float64") -> ReferenceOutputs:
    """What :func:`compare` checks a candidate against; computed apart, e.g. while the candidate
    is not built yet, so a large model's wide copy and the candidate never coexist in memory."""
    dtype = PRECISIONS[precision]
    with torch.no_grad(), eval_mode(reference):
        native = None if native_dtype(reference) == dtype else [_run(reference, args, None) for _, args in inputs]
        return ReferenceOutputs(_outputs(reference, inputs, dtype), native)


def precision_of(dtype: torch.dtype) -> str:
    """The ``precision`` name of ``dtype`` (a key of :data:`PRECISIONS`)."""
    return next(name for name, value in PRECISIONS.items() if value == dtype)


def wider_than(model: nn.Module, precision: str) -> bool:
    """Whether ``precision`` is wider than ``model``'s own dtype (a float64 check of a float32
    model): outputs may then exceed the tolerance by the storage of converted weights in the
    model's dtype alone (the float32-rounding rule, docs/verification.md)."""
    return PRECISIONS[precision].itemsize > native_dtype(model).itemsize


def compare(reference: nn.Module, candidate: nn.Module, inputs: Sequence[tuple[str, tuple[torch.Tensor, ...]]],
            tolerance: float, precision: str = "float64", *, expected: ReferenceOutputs | None = None,
            candidate_in_place: bool = False) -> list[OutputParity]:
    """Run both models in eval mode on each named input tuple; one row per output and input.

    ``expected``: the reference's outputs on ``inputs`` (:func:`reference_outputs`), when computed
    beforehand. Neither model is modified: the ``precision`` runs use a copy of each, one at a
    time; ``candidate_in_place=True`` (a GraphModule the caller owns) runs the candidate cast
    while called instead (:func:`cast_while_called`): no copy of a large widened model.
    """
    dtype = PRECISIONS[precision]
    expected = expected or reference_outputs(reference, inputs, precision)
    with torch.no_grad(), eval_mode(candidate):
        native_got = None if expected.native is None else [_run(candidate, args, None) for _, args in inputs]
        got_all = _outputs(candidate, inputs, dtype, in_place=candidate_in_place)
    rows = []
    for k, ((label, _), wanted, got) in enumerate(zip(inputs, expected.wide, got_all)):
        if len(wanted) != len(got):
            rows.append(OutputParity("outputs", label, float("inf"), float("inf"), False, precision))
            continue
        for i, ((name, ref), (_, cand)) in enumerate(zip(wanted, got)):
            max_abs, max_rel = parity(ref, cand)
            row = OutputParity(name, label, max_abs, max_rel, max_rel <= tolerance, precision)
            if expected.native is not None:
                row.native_rel = parity(expected.native[k][i][1], native_got[k][i][1])[1]
                row.native_noise = parity(ref, expected.native[k][i][1])[1]
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

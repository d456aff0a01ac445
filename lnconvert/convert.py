"""Orchestration: trace -> analyse -> passes -> verify -> report."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import fx, nn
from torch.ao.nn.quantized import FloatFunctional

from . import __version__
from .analysis import all_finite, count_macs, count_params, propagate_shapes, reads_input
from .calibrate import batchnorm_without_stats, calibrate_batchnorm
from .errors import ParityError, TraceError, UnsupportedModelError, UsageError, one_line
from .models import inherit_source
from .options import ConvertOptions, PassContext, renamed_argument
from .pipeline import AFTER_VERIFY, PIPELINE, run_pipeline, timed
from .report import DEFAULT_TOLERANCE, ConversionReport
from .rules import batchnorm_statistics, is_batchnorm_like
from .trace import default_example_inputs, private_eval_copy, trace
from .verify import (
    ReferenceOutputs,
    accept_float32_rounding,
    compare,
    eval_mode,
    float64_check_note,
    native_dtype,
    precision_of,
    reference_outputs,
    wider_than,
)


@dataclass
class ConversionResult:
    model: fx.GraphModule
    report: ConversionReport
    # what compaction needs to rebuild the graph: the caller's model (read, never modified),
    # the options and the example inputs
    source: nn.Module | None = None
    options: ConvertOptions | None = None
    example_inputs: tuple[torch.Tensor, ...] = ()

    def save(self, path: str | Path, *, format: str = "safetensors", force: bool = False) -> Path:
        """Write the current weights of ``model`` (see :func:`lnconvert.save`)."""
        from .io import save

        return save(self, path, format=format, force=force)


RECORD_KEY = "lnconvert"  # GraphModule.meta key of the ConversionRecord


@dataclass(frozen=True)
class ConversionRecord:
    """How a GraphModule was converted, kept in its ``meta``: with it the model alone can be
    saved, compacted or exported (:func:`as_result`). Shared, not copied, by ``deepcopy``: it
    describes the conversion, while the copy's weights are its own."""

    report: ConversionReport
    source: nn.Module | None
    options: ConvertOptions
    example_inputs: tuple[torch.Tensor, ...]

    def __deepcopy__(self, memo: dict) -> "ConversionRecord":
        return self


def as_result(obj: object, what: str) -> ConversionResult:
    """``obj`` as a :class:`ConversionResult`: itself, or a GraphModule returned by
    :func:`convert` / :func:`lnconvert.load` (its current weights, its recorded conversion),
    or a :class:`lnconvert.CompactResult` (its compacted model)."""
    from .compact import CompactResult

    if isinstance(obj, CompactResult):  # its .conversion keeps the uncompacted options: use the model's record
        obj = obj.model
    if isinstance(obj, ConversionResult):
        if obj.options is None:
            raise UsageError(f"{what}: this ConversionResult has no options; use the one lnconvert.convert returned")
        return obj
    record = obj.meta.get(RECORD_KEY) if isinstance(obj, fx.GraphModule) else None
    if record is None:
        raise UsageError(f"{what} takes a ConversionResult or a model returned by lnconvert.convert / lnconvert.load "
                         f"(which knows how it was converted), got {type(obj).__name__}")
    return ConversionResult(obj, record.report, record.source, record.options, record.example_inputs)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_supported(model: nn.Module) -> None:
    """Refuse, naming the culprit, what cannot be converted exactly: quantized modules,
    half-precision weights (folding rounds them by ~1e-3, far above any tolerance), NaN anywhere
    and Inf in parameters or BatchNorm statistics."""
    for name, module in model.named_modules():
        where = type(module).__module__
        # FloatFunctional is the float stand-in of quantizable models (torchvision's quantized_*
        # builders before quantization): plain torch.add / cat / mul, nothing quantized yet
        if where.startswith("torch.") and ".quantized" in where and type(module) is not FloatFunctional:
            raise UnsupportedModelError(f"module '{name}' is quantized ({type(module).__name__}); "
                                        f"convert the floating-point model, then quantize the result")
    bn_stats = {f"{name}.{stat}".lstrip(".") for name, m in model.named_modules() if is_batchnorm_like(m)
                for stat in batchnorm_statistics(m)}
    parameters = dict(model.named_parameters())
    for name, tensor in [*parameters.items(), *model.named_buffers()]:
        if tensor.dtype in _LOW_PRECISION:
            raise UnsupportedModelError(f"parameter '{name}' is {str(tensor.dtype).removeprefix('torch.')}; convert "
                                        f"the float32 model (model.float()) and cast the result back afterwards")
        if not tensor.is_floating_point():
            continue
        # other buffers may hold +-Inf on purpose (clamp bounds, masks): only NaN is broken there
        finite = all_finite(tensor) if name in parameters or name in bn_stats else not tensor.isnan().any()
        if not finite:
            raise UnsupportedModelError(f"parameter '{name}' contains NaN or Inf; refusing to convert")


def _with_running_statistics(model: nn.Module, data: Iterable[torch.Tensor] | None, drop_bn: bool,
                             report: ConversionReport) -> nn.Module:
    """``model``, or a copy whose BatchNorms without running statistics have them, estimated on
    ``data``; without data such a model cannot lose its BatchNorm: refused when ``drop_bn``."""
    missing = batchnorm_without_stats(model)
    if missing and data is not None:
        calibrated = calibrate_batchnorm(model, data)
        inherit_source(calibrated, model)  # saved under the source's name, rebuilt calibrated on load
        report.calibrated = missing
        return calibrated
    if missing and drop_bn:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UnsupportedModelError(f"BatchNorm '{missing[0]}'{more} has no running statistics "
                                    f"(track_running_stats=False), so it normalises each batch by itself and cannot "
                                    f"be removed; pass --calibrate DATA to estimate them, or --keep-bn "
                                    f"(API: calibration_data=batches, drop_bn=False)")
    return model


def _is_channels_last(model: nn.Module) -> bool:
    return any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())


def _check_inputs(inputs: tuple[torch.Tensor, ...], what: str) -> None:
    empty = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor) and t.numel() == 0]
    if empty:
        raise UsageError(f"{what} of shape {empty[0]} have no elements; conversion and verification need at least "
                         f"one sample")


def _first_line(exc: BaseException) -> str:
    """``Type: first line`` of the error itself: torch.fx's ShapeProp wraps the real one."""
    return one_line(exc.__cause__ if "ShapeProp error" in str(exc) and exc.__cause__ is not None else exc)


def _runs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> BaseException | None:
    """The error ``model`` raises on ``inputs`` (in eval mode, without gradients), or None."""
    try:
        with torch.no_grad(), eval_mode(model):
            model(*inputs)
    except Exception as exc:
        return exc
    return None


def _trace_whole(model: nn.Module, inputs: tuple[torch.Tensor, ...], options: ConvertOptions,
                 report: ConversionReport, partial: bool | None) -> tuple[fx.GraphModule | None, str]:
    """``model`` traced as one graph whose shapes are propagated on ``inputs``, or (None, why)
    when it must be converted in parts: fx cannot trace it, or its traced graph fails on inputs
    the model itself runs on (code that takes another path while traced, a Python value frozen
    at trace time). ``partial=False`` raises :class:`TraceError` instead; inputs the model itself
    does not run on raise :class:`UsageError`."""
    private = private_eval_copy(model)
    with timed(report, "trace"):
        try:
            gm = trace(private, options.leaf_modules, len(inputs))
        except TraceError as exc:
            if partial is False:
                raise
            return None, str(exc)
    with timed(report, "analyse"):
        try:
            propagate_shapes(gm, inputs)
            return gm, ""
        except Exception as exc:
            failed = exc
    shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
    own = _runs(private, inputs)
    if own is not None:
        raise UsageError(f"the model does not run on inputs of shape {shapes}: {one_line(own)}") from own
    why = f"its traced graph fails on inputs the model runs on: {_first_line(failed)}"
    if partial is False:
        raise TraceError(f"{why}; convert its traceable parts in place: partial unset (CLI: --no-save; not "
                         f"savable yet)") from failed
    return None, why


def _as_tuple(inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def remaining_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Names of BatchNorm modules or functional batch_norm calls on activations still in the
    graph, including BatchNorms inside modules called as opaque leaves (timm's non-traceable
    layers, --leaf)."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, fx.GraphModule):  # a part converted on its own (lnconvert.partial)
                found += [f"{node.target}.{name}" for name in remaining_batchnorm(module)]
                continue
            found += [f"{node.target}.{name}".rstrip(".") for name, sub in module.named_modules()
                      if is_batchnorm_like(sub)]
        elif node.op == "call_function" and node.target is torch.nn.functional.batch_norm and reads_input(node):
            found.append(node.name)
    return found


def float64_copy_errors(model: nn.Module, options: ConvertOptions, inputs: tuple[torch.Tensor, ...],
                        candidate: nn.Module, checks: Sequence[tuple[str, tuple[torch.Tensor, ...]]],
                        partial: bool | None = None) -> tuple[float, float]:
    """The two measurements of the float32-rounding rule (docs/verification.md), on ``checks``:
    the max rel error of the same conversion applied to a float64 copy of ``model`` (free of
    float32 storage, it shows a wrong graph), and the max rel distance of ``candidate`` (the
    conversion of ``model`` itself) from that conversion with its parameters and buffers rounded
    to ``candidate``'s dtype, both run in that dtype (it shows anything but the rounding: a graph
    or a weight that differs between the two conversions; the same model gives 0)."""
    wide = copy.deepcopy(model).double()
    kwargs = options.graph_kwargs() | {"lcw": False}  # LCW changes the function by design: measured apart
    converted = convert(wide, example_inputs=tuple(t.double() for t in inputs), verify=False, partial=partial,
                        **kwargs).model
    wide_checks = [(label, tuple(t.double() for t in args)) for label, args in checks]
    error = max(p.max_rel for p in compare(wide, converted, wide_checks, tolerance=1.0))
    dtype = native_dtype(candidate)
    rounded = converted.to(dtype)  # the same module, its values rounded (no copy: memory)
    return error, max(p.max_rel for p in compare(rounded, candidate, checks, 1.0, precision_of(dtype)))


def _verify(model: nn.Module, gm: fx.GraphModule, options: ConvertOptions,
            checks: list[tuple[str, tuple[torch.Tensor, ...]]], expected: ReferenceOutputs,
            report: ConversionReport, partial: bool | None = None) -> None:
    """Compare ``gm`` with ``model`` (whose outputs on ``checks`` are ``expected``) into
    ``report.parity`` and set its status; raise :class:`ParityError` when an output is beyond the
    tolerance (and not only by float32 storage of the weights of a graph a float64 copy proves
    right)."""
    with timed(report, "verify"):
        report.parity = compare(model, gm, checks, options.tolerance, options.precision, expected=expected,
                                candidate_in_place=True)
        bad = [p for p in report.parity if not p.ok]
        if bad and wider_than(model, options.precision):
            accept_float32_rounding(lambda: float64_copy_errors(model, options, checks[0][1], gm, checks, partial),
                                    options.tolerance, bad, report)
            bad = [p for p in report.parity if not p.ok]
    if bad:
        report.status = "failed"
        worst = max(bad, key=lambda p: p.max_rel)
        raise ParityError(f"converted model differs from the original: {worst.output} on {worst.inputs} "
                          f"input has max rel error {worst.max_rel:.3e} > tolerance {options.tolerance:.0e}"
                          f"{float64_check_note(report)}", report)
    report.status = "partial" if report.status_reasons else "exact"


def convert(
    model: nn.Module,
    *,
    drop_bn: bool = True,
    policy: str = "mirror",
    activations: Iterable[str] | None = None,
    residual: str = "slice",
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    verify: bool = True,
    link: bool = True,
    input_size: Sequence[int] | None = None,
    leaf_modules: Iterable[str] = (),
    data: Iterable[torch.Tensor | Sequence[torch.Tensor]] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    precision: str = "float64",
    name: str | None = None,
    twins: dict[str, Sequence[int]] | None = None,
    norm: str = "fold",
    lcw: bool = False,
    verify_inputs: Iterable[torch.Tensor | Sequence[torch.Tensor]] | None = None,
    partial: bool | None = None,
    submodules: Iterable[str] | None = None,
    calibration_data: Iterable[torch.Tensor] | None = None,
) -> ConversionResult:
    """Convert a trained model into a BatchNorm-free model with linked activations.

    The caller's model is never modified. ``example_inputs`` (default: a random batch of
    2 at the model's configured input size) drives shape propagation and verification;
    ``data`` (batches: tensors or tuples of tensors) adds user batches to the check
    (``verify_inputs`` is its deprecated name). With ``verify=True`` a mismatch
    above ``tolerance`` (max |delta| / max(1, max |y|)) raises :class:`ParityError`, whose
    ``report`` holds the per-output errors. ``precision="float64"`` (default) evaluates
    both models in float64, measuring the conversion free of float32 rounding noise (the
    float32 deviation is reported too); ``"float32"`` compares them as they are.
    ``twins`` (set by :func:`lnconvert.compact`) keeps twins only for the listed channels
    of the named activations.

    ``norm`` chooses what replaces BatchNorm (docs/strategies.md): ``"fold"`` (into the producing
    conv / linear, else a per-channel affine), ``"normprop"`` (those convs / linears become
    NormProp layers, ReLUs between two of them are re-normalised; exact at conversion) or
    ``"deep-control"`` (a BN on a conv output becomes ``DeepControl2d`` with ``alpha = 0``;
    exact). ``lcw=True`` then projects every conv / linear onto zero-sum weights per unit
    and keeps them there (Linearly Constrained Weights): this changes the function by
    design, so the model is verified *before* the projection, and the deviation it causes
    is reported (``report.lcw_deviation``, status ``changed``) instead of raising.

    A model fx cannot trace as a whole (detection, optical flow), or whose traced graph fails on
    inputs the model itself runs on, has each maximal traceable submodule holding BatchNorm
    converted in place instead, and the whole model verified (:mod:`lnconvert.partial`; a
    report warning says why, ``report.parts`` lists what was converted and what stayed, and
    why); ``partial=False`` raises :class:`TraceError` instead.
    ``submodules=["backbone", ...]`` converts exactly those.
    With ``partial=True`` a traceable model whose BatchNorms sit inside opaque leaves (timm's
    non-traceable layers) has each such leaf converted on its own first; the converted leaves
    stay leaves of the whole model's graph.

    A BatchNorm without running statistics (``track_running_stats=False``) normalises each batch
    by itself and cannot be removed: with ``drop_bn`` it is refused (:class:`UnsupportedModelError`)
    unless ``calibration_data`` (batches of inputs) is given, on which its statistics are estimated
    first (:func:`lnconvert.calibrate_batchnorm`); the calibrated model is then what is converted and
    verified, and ``report.calibrated`` names those BatchNorms.
    """
    options = ConvertOptions(drop_bn=drop_bn, link=link, policy=policy,
                             activations=tuple(activations) if activations is not None else None,
                             residual=residual, leaf_modules=tuple(leaf_modules), tolerance=tolerance,
                             precision=precision, norm=norm, lcw=lcw,
                             twins={k: tuple(v) for k, v in twins.items()} if twins is not None else None)
    if not isinstance(model, nn.Module):
        raise UsageError(f"expected an nn.Module, got {type(model).__name__}")
    data = renamed_argument(data, verify_inputs, "verify_inputs", "data", "convert") or ()
    report = ConversionReport(model=name or type(model).__name__, options=options.to_dict(),
                              lnconvert_version=__version__, tolerance=tolerance)
    _check_supported(model)
    model = _with_running_statistics(model, calibration_data, drop_bn, report)
    if model.training:
        report.warnings.append("model was in training mode: converted and verified in eval mode")
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    inputs = _as_tuple(example_inputs) if example_inputs is not None else \
        default_example_inputs(model, input_size=tuple(input_size) if input_size else None, dtype=dtype)
    _check_inputs(inputs, "example inputs")
    ctx = PassContext(options, report, inputs)

    gm, why = (None, "") if submodules is not None else _trace_whole(model, inputs, options, report, partial)
    if gm is None:  # the named submodules, or the traceable parts of an untraceable model
        from .partial import convert_partial

        with timed(report, "partial"):
            return convert_partial(model, inputs, options, report, why=why, verify=verify,
                                   submodules=None if submodules is None else list(submodules),
                                   verify_inputs=[_as_tuple(x) for x in data])
    if partial:  # BN inside opaque leaves: convert each leaf on its own, then keep it a leaf
        from .partial import convert_partial, opaque_parts

        opaque = list(dict.fromkeys(opaque_parts(gm)))
        if opaque:
            with timed(report, "partial"):
                inner = convert_partial(model, inputs, options, report, submodules=opaque, verify=verify,
                                        whole=False).model
            converted = tuple(p["module"] for p in report.parts if p["action"] == "converted")
            with timed(report, "trace"):
                gm = trace(private_eval_copy(inner), options.leaf_modules + converted, len(inputs))
            with timed(report, "analyse"):
                propagate_shapes(gm, inputs)
    with timed(report, "analyse"):
        report.params_before, report.macs_before = count_params(gm), count_macs(gm)
    checks = [("random", inputs)] + [(f"user[{i}]", _as_tuple(x)) for i, x in enumerate(data)]
    if verify:  # before the passes widen the model: its wide copy and the widened model never coexist
        with timed(report, "verify"):
            expected = reference_outputs(model, checks, precision)
    gm = run_pipeline(gm, ctx, PIPELINE)
    report.params_after, report.macs_after = count_params(gm), count_macs(gm)
    kept = remaining_batchnorm(gm)
    if options.drop_bn and kept:
        report.status_reasons.append(f"{len(kept)} BatchNorm kept ({kept[0]}{', ...' if len(kept) > 1 else ''})")
    if verify:
        _verify(model, gm, options, checks, expected, report, partial)
    gm = run_pipeline(gm, ctx, AFTER_VERIFY)
    if options.lcw and verify:
        report.lcw_deviation = max(p.max_rel for p in compare(model, gm, checks, tolerance, precision,
                                                              expected=expected, candidate_in_place=True))
        report.status = "changed"
        report.status_reasons.append(f"LCW projection changes the function by design: max rel deviation "
                                     f"{report.lcw_deviation:.2e}; fine-tune to recover")
    if _is_channels_last(model):  # rewritten weights are contiguous: give back the caller's memory format
        gm = gm.to(memory_format=torch.channels_last)
    gm.train(model.training)  # hand back the caller's mode
    gm.meta[RECORD_KEY] = ConversionRecord(report, model, options, inputs)
    return ConversionResult(gm, report, model, options, inputs)


__all__ = ["ConversionRecord", "ConversionResult", "as_result", "convert", "remaining_batchnorm", "eval_mode"]

"""Partial conversion: the traceable submodules holding BatchNorm of a model that fx cannot trace
as a whole (detection post-processing, optical-flow iterations, timm's non-traceable leaves).

Each such submodule is converted on its own by :func:`lnconvert.convert` (fold, link, verify
on the inputs it received) and put back in place; the untraceable code around it runs as
before. A converted part's outputs are its primaries (the graph output is a slice boundary),
so the swap is exact by construction; the whole model is then verified against the original
on the same inputs (every tensor of its outputs: boxes, scores, labels, masks, flow fields,
segmentation maps).
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.utils._pytree import tree_map

from .analysis import count_params
from .compare_tasks import compare_task, is_detection_output
from .errors import LnConvertError, ParityError, TraceError, UsageError, one_line
from .options import ConvertOptions
from .report import ConversionReport
from .rules import is_batchnorm_like
from .verify import accept_float32_rounding, eval_mode, float64_check_note, native_dtype, precision_of, wider_than

_REPORTED = ("batchnorm", "activations", "consumers", "boundaries")


def _trace_reason(text: str) -> str:
    """A TraceError's message without its hints (--leaf, --partial): they are about the whole model."""
    return text.split("; try leaf_modules")[0].split("; or convert its")[0]


def holds_batchnorm(module: nn.Module) -> bool:
    return any(is_batchnorm_like(m) for m in module.modules())


def capture_calls(model: nn.Module, inputs: tuple[Any, ...], names: Iterable[str]
                  ) -> tuple[dict[str, tuple[tuple, dict]], Any]:
    """(args, kwargs) of the first call of each named submodule while ``model`` runs on
    ``inputs`` in eval mode (tensors cloned, so a later in-place op cannot change them), and
    the model's output."""
    seen: dict[str, tuple[tuple, dict]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in seen:
                seen[name] = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (args, kwargs))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(recorder(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad(), eval_mode(model):
            output = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen, output


def _swap(root: nn.Module, name: str, converted: nn.Module, original: nn.Module) -> None:
    """Put ``converted`` where ``name`` was, keeping the original's plain attributes
    (``out_channels``, ``hidden_state_size``...) that the code around it may read."""
    kept = {key: value for key, value in vars(original).items()
            if not key.startswith("_") and key != "training" and not hasattr(converted, key)}
    for key, value in kept.items():
        setattr(converted, key, value)
    if isinstance(converted, fx.GraphModule):  # a GraphModule's deepcopy keeps only attributes listed here
        converted.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(kept)
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, converted)


def _merge(report: ConversionReport, part: ConversionReport, prefix: str) -> None:
    """The part's per-layer records under the whole model's names."""
    for field in _REPORTED:
        for item in getattr(part, field):
            item = dict(item)
            for key in ("name", "node", "consumer", "producer"):
                if key in item:
                    item[key] = f"{prefix}.{item[key]}"
            getattr(report, field).append(item)
    report.macs_before += part.macs_before
    report.macs_after += part.macs_after
    report.warnings += [f"{prefix}: {w}" for w in part.warnings if "training mode" not in w]


def _part_options(options: ConvertOptions, prefix: str) -> dict[str, Any]:
    kwargs = options.graph_kwargs() | {"tolerance": options.tolerance, "precision": options.precision}
    kwargs["leaf_modules"] = [n[len(prefix) + 1:] for n in options.leaf_modules if n.startswith(prefix + ".")]
    kwargs.pop("twins", None)
    kwargs["partial"] = False  # a part that does not trace is split into its children here, not converted in parts
    return kwargs


def convert_partial(model: nn.Module, inputs: tuple[Any, ...], options: ConvertOptions, report: ConversionReport,
                    *, submodules: Sequence[str] | None = None, why: str = "", verify: bool = True,
                    verify_inputs: Sequence[tuple[Any, ...]] = (), whole: bool = True):
    """Convert the maximal traceable submodules of ``model`` that hold BatchNorm (or exactly
    ``submodules``), in place of a private copy, and verify the whole model.

    Search: top down, a module holding BN is converted if it traces, else its children are
    tried. A module that holds BN but cannot be converted stays as it is, with the reason in
    ``report.parts``. Preserves: the whole model's outputs (verified, ``options.tolerance``).
    ``whole=False``: only the parts, each verified on its own; the caller converts the rest
    (timm's non-traceable leaves inside a traceable model) and verifies the whole.
    """
    from .convert import ConversionResult, convert  # convert.py calls this module
    from .trace import private_eval_copy

    clone = private_eval_copy(model)
    modules = dict(clone.named_modules())
    if submodules is not None:
        missing = [n for n in submodules if not n or n not in modules]
        if missing:
            top = ", ".join(n for n, _ in clone.named_children())
            raise UsageError(f"no submodule {missing[0]!r} in {type(model).__name__}; its children: {top}")
    calls, output = capture_calls(clone, inputs, [n for n, m in modules.items() if n and holds_batchnorm(m)])
    report.params_before = count_params(model)
    report.parts = report.parts or []
    if why:
        report.warnings.append(f"whole model not traceable ({_trace_reason(why)}): converted its traceable "
                               f"parts in place instead (partial=False refuses)")

    def keep(name: str, reason: str) -> None:
        report.parts.append({"module": name, "type": type(modules[name]).__name__, "action": "kept",
                             "detail": reason})

    def attempt(name: str, explicit: bool) -> None:
        module = modules[name]
        children = [f"{name}.{c}" for c, m in module.named_children() if holds_batchnorm(m)]

        def split(reason: str) -> None:  # its children instead, or keep it
            if explicit or not children:
                return keep(name, reason)
            for child in children:
                attempt(child, explicit=False)
            return None

        if name not in calls:  # e.g. a ModuleList, whose items the parent calls
            return split("not called on the example inputs")
        args, kwargs = calls[name]
        if kwargs:
            return split(f"called with keyword arguments ({', '.join(kwargs)})")
        try:
            result = convert(module, example_inputs=args, verify=verify, name=name, **_part_options(options, name))
        except TraceError as exc:
            return split(_trace_reason(one_line(exc)))
        except LnConvertError as exc:
            return keep(name, one_line(exc))
        _swap(clone, name, result.model, module)
        _merge(report, result.report, name)
        actions = result.report.count(result.report.batchnorm)
        report.parts.append({"module": name, "type": type(module).__name__, "action": "converted",
                             "detail": ", ".join(f"{n} BN {a}" for a, n in actions.items()) +
                                       (f"; part max rel {result.report.max_rel_error:.1e}"
                                          if result.report.max_rel_error is not None else "; part not verified")})

    if submodules is not None:
        for name in submodules:  # named by the user: exactly those; opaque leaves: split if need be
            attempt(name, explicit=whole)
    else:
        for name, child in clone.named_children():
            if holds_batchnorm(child):
                attempt(name, explicit=False)
    if not whole:
        return ConversionResult(clone, report, model, options, inputs)
    for name, m in clone.named_modules():  # what is left: inside kept parts
        if is_batchnorm_like(m):
            report.bn(name, "kept", "inside a part that was not converted")
    kept = [b["name"] for b in report.batchnorm if b["action"] == "kept"]
    if kept:
        report.status_reasons.append(f"{len(kept)} BatchNorm kept ({kept[0]}{', ...' if len(kept) > 1 else ''})")
    report.params_after = count_params(clone)
    if verify:
        labelled = [("random", inputs)] + [(f"user[{i}]", x) for i, x in enumerate(verify_inputs)]
        detections = is_detection_output(output)
        precision = options.precision
        try:
            checked = compare_task(model, clone, labelled, options.tolerance, precision, detections=detections)
        except RuntimeError as exc:  # code that makes float32 tensors itself (RAFT's grids) cannot run in float64
            report.warnings.append(f"verified in float32: the model does not run in {precision} ({one_line(exc)})")
            precision = "float32"
            checked = compare_task(model, clone, labelled, options.tolerance, precision, detections=detections)
        report.parity = checked.rows
        report.warnings += checked.notes
        bad = [p for p in report.parity if not p.ok]
        if bad and wider_than(model, precision):
            accept_float32_rounding(lambda: _float64_copy_errors(model, inputs, options, submodules, clone, labelled,
                                                                 detections), options.tolerance, bad, report)
            bad = [p for p in report.parity if not p.ok]
        if bad:
            report.status = "failed"
            worst = max(bad, key=lambda p: p.max_rel)
            unmatched = next((n for n in checked.notes if "without a partner (no near-tie" in n), None)
            detail = unmatched if unmatched and worst.max_rel == float("inf") else \
                f"{worst.output} on {worst.inputs} input has max rel error {worst.max_rel:.3e} > tolerance " \
                f"{options.tolerance:.0e}"
            raise ParityError(f"partially converted model differs from the original: {detail}"
                              f"{float64_check_note(report)}", report)
        report.status = "partial" if report.status_reasons else "exact"
        if checked.detections == 0:  # only the heads were compared: no pass for the detections
            report.status = "unverified"
            report.status_reasons.append("nothing compared: the outputs hold 0 detections (only the outputs before "
                                         "NMS were compared); use inputs with objects or a lower score threshold")
        elif checked.detections is not None:
            report.warnings.append(f"detections compared as sets: {checked.detections} matched")
    clone.train(model.training)
    return ConversionResult(clone, report, model, options, inputs)


def _float64_copy_errors(model: nn.Module, inputs: tuple[Any, ...], options: ConvertOptions,
                         submodules: Sequence[str] | None, candidate: nn.Module,
                         checks: Sequence[tuple[str, tuple[Any, ...]]], detections: bool) -> tuple[float, float]:
    """As :func:`lnconvert.convert.float64_copy_errors` for a model converted in parts: the same
    partial conversion of a float64 copy, and ``candidate``'s distance from it rounded to float32
    (e.g. Mask R-CNN's masks, pasted at box positions that moved by 1e-4 pixel)."""
    def wide(args: Any) -> Any:
        return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, args)

    original = copy.deepcopy(model).double()
    scratch = ConversionReport(model="float64 copy", options=options.to_dict())
    converted = convert_partial(original, wide(inputs), options, scratch, submodules=submodules, verify=False).model
    wide_checks = [(label, wide(args)) for label, args in checks]
    error = max(p.max_rel for p in compare_task(original, converted, wide_checks, 1.0, "float64",
                                                detections=detections).rows)
    dtype = native_dtype(candidate)
    rounded = converted.to(dtype)  # the same module, its values rounded (no copy: memory)
    return error, max(p.max_rel for p in compare_task(rounded, candidate, checks, 1.0, precision_of(dtype),
                                                      detections=detections).rows)


def opaque_parts(gm) -> list[str]:
    """Modules called as opaque leaves of a traced model (timm's non-traceable layers,
    ``leaf_modules``) that hold BatchNorm: each can be converted on its own."""
    from .rules import rule_for

    return [n.target for n in gm.graph.nodes if n.op == "call_module" and rule_for(gm, n) is None
            and not is_batchnorm_like(gm.get_submodule(n.target))  # the passes handle those (decompose_normact)
            and holds_batchnorm(gm.get_submodule(n.target))]


__all__ = ["capture_calls", "convert_partial", "holds_batchnorm", "opaque_parts"]

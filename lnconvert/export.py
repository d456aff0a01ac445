"""ONNX export and ONNX Runtime parity checks.

Export uses torch's dynamo exporter (falling back to the TorchScript exporter, with a
warning naming the reason), checks the file with ``onnx.checker`` (full check), gives it a
dynamic batch axis and embeds the conversion report as ``metadata_props``.

ORT runs float32, so its outputs are compared with the *original* PyTorch model in float32.
A deep float32 network deviates from its own float64 self (resnet50 with randomised BN
statistics: 2.2e-5), so an output passes when its error is within the tolerance or within
``noise_factor`` times the original's own float32 rounding floor, which is measured and
reported next to it (as in lnconvert.verify).
"""
from __future__ import annotations

import contextlib
import copy
import io as _io
import json
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import fx, nn

from . import __version__
from .errors import LnConvertError, OutputError, ParityError, UsageError
from .files import atomic_path, check_output_path
from .nn import LinkedActivation
from .passes import lower_linked
from .report import DEFAULT_TOLERANCE, OutputParity
from .verify import eval_mode, flat_outputs, parity


def export_onnx(model_or_result: Any, path: str | Path, *, example_inputs: Sequence[torch.Tensor] | None = None,
                opset: int = 18, dynamic_batch: bool = True, force: bool = False,
                metadata: dict[str, Any] | None = None, lower: bool = True) -> Path:
    """Export a converted model to ONNX at ``path``: a ConversionResult or the model it holds
    (their example inputs and report are used), or any other module with ``example_inputs``
    (e.g. the original, to compare).

    ``lower`` (default): the exported copy has its linked activations' conv/linear consumers
    read the primary and twin halves directly (:mod:`lnconvert.passes.lower_linked`), so
    no concat or reshape is exported for them and depthwise convs stay ordinary; the model
    itself is not changed. Preserves: the function (checked separately by :func:`verify_onnx`);
    the report of a ConversionResult, or ``metadata``, is stored in the file's ``metadata_props``.
    """
    import onnx

    from .convert import RECORD_KEY, as_result

    report = None
    if isinstance(model_or_result, nn.Module) and not (
            isinstance(model_or_result, torch.fx.GraphModule) and RECORD_KEY in model_or_result.meta):
        model = model_or_result
    else:
        result = as_result(model_or_result, "export_onnx")
        report, model = result.report, result.model
        example_inputs = example_inputs or result.example_inputs
    if not example_inputs:
        raise UsageError(f"export_onnx needs example_inputs for a {type(model).__name__} that lnconvert did not "
                         f"convert (a ConversionResult or its model brings its own)")
    model = without_parametrizations(model)
    args = tuple(example_inputs)
    path = check_output_path(path, force)
    props = {"lnconvert_version": __version__, **(metadata or {})}
    if report is not None:
        props.update(source_model=report.model, options=json.dumps(report.options, default=str),
                     parity=json.dumps([p.__dict__ for p in report.parity], default=str), status=report.status)
    try:
        with atomic_path(path) as tmp, eval_mode(model), torch.no_grad():
            if lower and _has_linked(model):
                model, props["lowered_consumers"] = lower_linked.run(model, args)
                props[KEPT_KEY] = json.dumps(lower_linked.kept_whole(model))
            # the raw export goes to a private folder: the exporter may write its weights to a
            # side file (external data) that must not be left beside the user's output
            with tempfile.TemporaryDirectory(prefix="lnconvert-export-") as raw_dir:
                raw = str(Path(raw_dir) / "model.onnx")
                exporter = _export(model, args, raw, opset, dynamic_batch)
                proto = onnx.load(raw)
            fold_affine_into_hardsigmoid(proto)
            onnx.checker.check_model(proto, full_check=True)
            props["exporter"] = exporter
            del proto.metadata_props[:]
            for key, value in props.items():
                proto.metadata_props.add(key=key, value=str(value))
            onnx.save(proto, tmp)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


_AFFINE = {"Add": lambda a, b, c: (a, b + c), "Sub": lambda a, b, c: (a, b - c),
           "Mul": lambda a, b, c: (a * c, b * c), "Div": lambda a, b, c: (a / c, b / c)}


def fold_affine_into_hardsigmoid(proto: Any) -> int:
    """Fold scalar ``Mul``/``Add``/``Sub``/``Div``/``Neg`` nodes that feed only a ``HardSigmoid``
    into its ``alpha``/``beta`` (``HardSigmoid(a x + b; alpha, beta) = HardSigmoid(x; alpha a,
    alpha b + beta)``), in place; returns how many nodes were removed. PyTorch's hardsigmoid
    has fixed slope and offset, so the lowering writes ``clamp(alpha x, 0, 1)`` as
    ``hardsigmoid(6 alpha x - 3)``; folded, it is one op ONNX Runtime keeps in its blocked
    layout, without the cancellation of the ``- 3``. Preserves the function up to float32
    rounding of the folded coefficients."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    scalars = {i.name: float(numpy_helper.to_array(i).item()) for i in graph.initializer if int(np.prod(i.dims)) == 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value" \
                and int(np.prod(node.attribute[0].t.dims)) == 1:
            scalars[node.output[0]] = float(numpy_helper.to_array(node.attribute[0].t).item())
    readers = Counter(name for node in graph.node for name in node.input)
    readers.update(o.name for o in graph.output)
    producer = {out: node for node in graph.node for out in node.output}
    removed = []
    for node in graph.node:
        if node.op_type != "HardSigmoid":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
        while (prev := producer.get(node.input[0])) is not None and readers[prev.output[0]] == 1:
            if prev.op_type == "Neg":
                x, (alpha, beta) = prev.input[0], (-alpha, beta)
            elif prev.op_type in _AFFINE and len(prev.input) == 2 and prev.input[1] in scalars:
                x = prev.input[0]
                scale, shift = _AFFINE[prev.op_type](1.0, 0.0, scalars[prev.input[1]])
                alpha, beta = alpha * scale, alpha * shift + beta
            elif prev.op_type in ("Add", "Mul") and len(prev.input) == 2 and prev.input[0] in scalars:
                x = prev.input[1]
                scale, shift = _AFFINE[prev.op_type](1.0, 0.0, scalars[prev.input[0]])
                alpha, beta = alpha * scale, alpha * shift + beta
            else:
                break
            node.input[0] = x
            removed.append(prev)
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("alpha", alpha), helper.make_attribute("beta", beta)])
    for node in removed:
        graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for unused in [i for i in graph.initializer if i.name in scalars and i.name not in read]:
        graph.initializer.remove(unused)
    return len(removed)


def _has_linked(model: nn.Module) -> bool:
    return isinstance(model, fx.GraphModule) and any(isinstance(m, LinkedActivation) for m in model.modules())


def without_parametrizations(model: nn.Module) -> nn.Module:
    """``model``, or a copy whose parametrized weights (LCW, split twins) are plain tensors
    holding their current values: the file stores the weights the model computes with, not
    the reparametrisation (which would be recomputed at every ONNX run)."""
    from torch.nn.utils import parametrize

    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        return model
    from .finetune import unparametrize

    baked = copy.deepcopy(model)
    for module in [m for m in baked.modules() if parametrize.is_parametrized(m)]:
        unparametrize(module, list(module.parametrizations))  # leaves the original model parametrized
    return baked


def _export(model: nn.Module, args: tuple, target: str, opset: int, dynamic_batch: bool) -> str:
    """Dynamo exporter first; the TorchScript exporter if it fails. Returns which one ran."""
    try:
        shapes = tuple({0: torch.export.Dim("batch", min=1)} for _ in args) if dynamic_batch else None
        with contextlib.redirect_stdout(_io.StringIO()):  # the exporter prints its progress
            torch.onnx.export(model, args, target, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                              verbose=False)
        return "dynamo"
    except Exception as exc:  # any exporter failure: try the other exporter before giving up
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"dynamo ONNX exporter failed ({type(exc).__name__}: {reason[:200]}); "
                      f"using the TorchScript exporter", stacklevel=3)
    names = [f"input_{i}" for i in range(len(args))]
    axes = {name: {0: "batch"} for name in names} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Opaque(model), args, target, dynamo=False, opset_version=min(opset, 17),
                          input_names=names, dynamic_axes=axes)
    return "torchscript"


class _Opaque(nn.Module):
    """Hides an ``fx.GraphModule``'s ``.graph``, which the TorchScript exporter mistakes for a
    TorchScript graph (AttributeError: 'Graph' object has no attribute 'outputs')."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(*args)


def session(path: str | Path):
    """An ORT session on every available provider (CPU last)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise LnConvertError(f"ONNX file not found: {path}")
    providers = [p for p in ort.get_available_providers() if p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        raise LnConvertError(f"{path} is not a valid ONNX model: {type(exc).__name__}") from exc


def input_shape(sess) -> tuple[int, ...] | None:
    """The first input's shape without the batch axis, when static."""
    dims = sess.get_inputs()[0].shape[1:]
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def verify_onnx(path: str | Path, reference: nn.Module, *, data: Iterable[Any] | None = None,
                data_label: str = "data", sample_shape: Sequence[int] | None = None,
                batch_sizes: Sequence[int] = (1, 4), tolerance: float = DEFAULT_TOLERANCE, noise_factor: float = 4.0,
                seed: int = 0, inputs: Sequence[tuple[str, tuple[torch.Tensor, ...]]] | None = None
                ) -> list[OutputParity]:
    """Run the ONNX file in ORT and ``reference`` (the original model) in PyTorch on random
    inputs at each batch size plus ``data`` (batches: tensors or tuples of tensors, labelled
    ``data_label[i]``); one row per output and input batch, checking output count, shapes
    and values (like optimum's ``validate_model_outputs``). ``inputs`` (labelled pairs) is
    deprecated: use ``data``."""
    from .options import renamed_argument

    labelled = [(f"{data_label}[{i}]", (b,) if isinstance(b, torch.Tensor) else tuple(b))
                for i, b in enumerate(data or ())]
    inputs = renamed_argument(labelled if data is not None else None, inputs, "inputs", "data", "verify_onnx") or []
    sess = session(path)
    shape = tuple(sample_shape) if sample_shape else input_shape(sess)
    if shape is None:
        raise UsageError("the ONNX input has dynamic spatial dims; pass the input size (C,H,W)")
    gen = torch.Generator().manual_seed(seed)
    batches = [(f"random batch {b}", (torch.randn((b, *shape), generator=gen),)) for b in batch_sizes]
    names = [i.name for i in sess.get_inputs()]
    rows = []
    with torch.no_grad(), eval_mode(reference):
        wide = _float64_copy(reference)
        for label, args in [*batches, *inputs]:
            if len(args) != len(names):
                raise UsageError(f"the ONNX model takes {len(names)} inputs, got {len(args)}")
            got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
            expected = flat_outputs(reference(*args))
            exact = flat_outputs(wide(*(a.double() for a in args)))
            if len(got) != len(expected):
                rows.append(OutputParity(f"{len(got)} outputs, expected {len(expected)}", label, float("inf"),
                                         float("inf"), False, "float32 (ORT)"))
                continue
            for out_name, value, (_, ref), (_, ref64) in zip([o.name for o in sess.get_outputs()], got, expected,
                                                            exact):
                max_abs, max_rel = parity(ref, torch.from_numpy(np.asarray(value)))
                floor = parity(ref64, ref)[1]
                ok = max_rel <= max(tolerance, noise_factor * floor)
                rows.append(OutputParity(out_name, label, max_abs, max_rel, ok, "float32 (ORT)", None, floor))
    return rows


# ops that only move or select data: an export of a linked model should add none of them
LAYOUT_OPS = ("Reshape", "Transpose", "Gather", "Split", "Slice", "Concat")


def layout_ops(path: str | Path) -> Counter:
    """How many nodes of each layout op the ONNX file at ``path`` has (its main graph)."""
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node
                   if n.op_type in LAYOUT_OPS)


def added_layout_ops(path: str | Path, reference: nn.Module, example_inputs: Sequence[torch.Tensor]) -> Counter:
    """Layout ops the file at ``path`` has beyond those of ``reference``'s own export (on
    the same exporter): what converting added. Empty when it added none."""
    with tempfile.TemporaryDirectory() as tmp:
        original = export_onnx(reference, Path(tmp) / "reference.onnx", example_inputs=example_inputs, lower=False)
        base = layout_ops(original)
    return layout_ops(path) - base


# the file's metadata entry naming the lnconvert modules its export kept (why it moves channels)
KEPT_KEY = "layout_ops_why"


def layout_ops_why(path: str | Path) -> Counter:
    """What :func:`lnconvert.passes.lower_linked.kept_whole` recorded in the file at ``path`` at
    export: the lnconvert modules left in the exported graph, by reason (empty for a file
    exported without lowering or by another tool)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return Counter(json.loads(props.get(KEPT_KEY, "{}")))


def describe_layout_ops(added: Counter, why: Counter | None = None) -> str:
    """``"+0"`` or ``"+3 (Concat 2, Slice 1)"``: the layout ops an export added, followed by
    ``why`` (see :func:`layout_ops_why`), e.g. ``"; kept: 2 linked activation read by cat"``."""
    if not added:
        return "+0"
    text = f"+{sum(added.values())} ({', '.join(f'{op} {n}' for op, n in added.most_common())})"
    if why:
        text += "; kept: " + ", ".join(f"{n} {reason}" for reason, n in why.most_common())
    return text


def _float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def require_parity(rows: list[OutputParity], path: str | Path) -> None:
    bad = [r for r in rows if not r.ok]
    if bad:
        worst = max(bad, key=lambda r: r.max_rel)
        raise ParityError(f"{path} differs from the reference: output {worst.output} on {worst.inputs} has max rel "
                          f"error {worst.max_rel:.3e} (original's float32 floor {worst.native_noise or 0:.1e})")


OPTIMIZATION_LEVELS = ("basic", "extended", "all")


def optimize_onnx(path: str | Path, target: str | Path, *, level: str = "basic", force: bool = False) -> Path:
    """Save ONNX Runtime's graph-optimised version of ``path`` at ``target`` (atomically).

    ``basic`` keeps standard ONNX ops (constant folding, redundant-node removal); ``extended``
    and ``all`` add ORT's own fused ops (``com.microsoft`` domain) and layouts tuned to this
    machine, so such a file is for ONNX Runtime on the same kind of hardware. Preserves the
    function up to float32 reassociation: check it with :func:`verify_onnx` like the export.
    """
    import onnxruntime as ort

    if level not in OPTIMIZATION_LEVELS:
        raise UsageError(f"unknown optimisation level {level!r}; choose one of: {', '.join(OPTIMIZATION_LEVELS)}")
    source = Path(path)
    if not source.is_file():
        raise LnConvertError(f"ONNX file not found: {source}")
    target = check_output_path(target, force)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's hardware-specific-layout warning for "all" is in the docstring
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    try:
        with atomic_path(target) as tmp:
            options.optimized_model_filepath = tmp
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target

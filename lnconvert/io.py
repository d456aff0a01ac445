"""The saved-model format: saving and loading converted models.

Default format (``safetensors``), with no pickle: one ``.safetensors`` file whose metadata
holds the conversion spec (source model, options, example input shape, lnconvert version,
report). :func:`load` rebuilds the graph by converting the source architecture again with
the same options (deterministic), then loads the weights.

Deployment formats: ``pt2`` (a ``torch.export`` ExportedProgram with a dynamic batch axis)
and ``torchscript`` (traced; scripting fails on several activation classes). Both embed the
spec as an extra file. Writes are atomic (:mod:`lnconvert.files`: a temp file in the target
directory, then a rename).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from . import __version__
from .errors import LnConvertError, ModelSourceError, OutputError, UsageError, one_line
from .files import atomic_path, check_output_path  # noqa: F401  (also their old import path)
from .models import is_registry_name, is_saved_model_path, source_name
from .models import load_model as build_model
from .options import ConvertOptions

if TYPE_CHECKING:
    from .convert import ConversionResult

SPEC_KEY = "lnconvert_spec"
SPEC_FILE = "lnconvert_spec.json"
FORMATS = {"safetensors": ".safetensors", "pt2": ".pt2", "torchscript": ".torchscript.pt"}
FORMAT_VERSION = 1  # the spec's "format" is "lnconvert/<version>"; readers refuse newer versions
# a spec's example input is allocated on load: a file must not be able to ask for terabytes
MAX_INPUT_ELEMENTS = 1 << 26
MAX_INPUTS = 16
MAX_INPUT_DIMS = 8
# key -> accepted JSON types; anything else in a spec is refused before it is acted on
_SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,), "lnconvert_version": (str,), "source": (str, type(None)), "weights": (str, type(None)),
    "options": (dict,), "input_shape": (list,), "report": (dict,), "calibrated": (bool,), "recipe": (dict, type(None)),
}
_REQUIRED_KEYS = ("format", "source", "options", "input_shape")


def save(result: "ConversionResult | fx.GraphModule", path: str | Path, spec: dict | None = None, *,
         force: bool = False, format: str = "safetensors") -> Path:
    """Write a conversion to ``path`` atomically: ``result`` is a :class:`ConversionResult`
    or the model it holds (e.g. after fine-tuning), saved with its current weights (split
    twins merged; the live model stays split). ``format``: ``safetensors`` (weights + spec,
    reloaded by :func:`load`), ``pt2`` or ``torchscript``. ``force`` overwrites.

    ``save(model, path, spec)`` with a spec from :func:`spec_for` is deprecated."""
    from .convert import ConversionResult, as_result

    if spec is not None:
        warnings.warn("save(model, path, spec) is deprecated; pass the ConversionResult (or the model lnconvert "
                      "returned): save(result, path)", DeprecationWarning, stacklevel=2)
        model = result.model if isinstance(result, ConversionResult) else result
        return save_with_spec(model, path, spec, force=force, format=format)
    result = as_result(result, "save")
    return save_with_spec(result.model, path, spec_of(result), force=force, format=format)


def spec_of(result: "ConversionResult") -> dict:
    """The spec :func:`save` writes for ``result``: its source by name when
    :func:`lnconvert.load_model` built it (unchanged since), else none (in-memory model:
    :func:`load` then needs ``model=``)."""
    name, weights = source_name(result.source)
    return spec_for(name, weights, result.options.to_dict(), [list(t.shape) for t in result.example_inputs],
                    result.report.to_dict(), calibrated=bool(result.report.calibrated))


def save_with_spec(model: fx.GraphModule, path: str | Path, spec: dict, *, force: bool = False,
                   format: str = "safetensors") -> Path:
    """Write ``model`` with an explicit ``spec`` (from :func:`spec_for`, possibly extended, as
    recipes do) to ``path`` atomically; :func:`save` builds the spec from a result."""
    if format not in FORMATS:
        raise OutputError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    path = check_output_path(path, force)
    text = json.dumps(spec, default=str)
    try:
        with atomic_path(path) as tmp:
            if format == "safetensors":
                from safetensors.torch import save_file

                from .finetune import plain_state_dict  # twin-split weights (fine-tuning) are saved merged

                save_file({k: v.detach().contiguous() for k, v in plain_state_dict(model).items()}, tmp,
                          metadata={SPEC_KEY: text})
            else:
                _save_deployment(model, tmp, spec, text, format)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def _save_deployment(model: nn.Module, tmp: str, spec: dict, text: str, format: str) -> None:
    from .export import without_parametrizations
    from .verify import eval_mode

    example = tuple(torch.zeros(shape) for shape in spec["input_shape"])
    model = without_parametrizations(model)  # a copy when split for fine-tuning: the live model is untouched
    with torch.no_grad(), eval_mode(model):
        if format == "pt2":
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(model, example, dynamic_shapes=tuple({0: batch} for _ in example))
            torch.export.save(program, tmp, extra_files={SPEC_FILE: text})
        else:
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, tmp, _extra_files={SPEC_FILE: text})


def spec_for(source: str, weights: str | None, options: dict, input_shape: list[list[int]], report: dict, *,
             calibrated: bool = False) -> dict:
    """``calibrated``: the source's BatchNorms without running statistics were calibrated
    (:func:`lnconvert.calibrate.calibrate_batchnorm`) before conversion."""
    return {"format": "lnconvert/1", "lnconvert_version": __version__, "source": source, "weights": weights,
            "options": options, "input_shape": input_shape, "report": report, "calibrated": calibrated}


def detect_format(path: str | Path) -> str:
    """``safetensors``, ``pt2`` or ``torchscript``, from the file's content."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"saved model not found: {path}")
    if zipfile.is_zipfile(path):
        names = zipfile.ZipFile(path).namelist()
        if any(n.endswith("/models/model.json") for n in names):
            return "pt2"
        if any("/code/" in n for n in names):
            return "torchscript"
        raise ModelSourceError(f"{path} is a zip archive but neither a pt2 nor a TorchScript model")
    return "safetensors"


def read_spec(path: str | Path) -> dict:
    """The validated spec of a saved model (see :func:`validate_spec`); reads only the file's
    header, no tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"saved model not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise ModelSourceError(f"{path} is not a valid lnconvert model (truncated or corrupt?)") from exc
    if SPEC_KEY not in metadata:
        raise ModelSourceError(f"{path} is a safetensors file without an lnconvert spec")
    try:
        spec = json.loads(metadata[SPEC_KEY])
    except ValueError as exc:
        raise ModelSourceError(f"{path}: its lnconvert spec is not valid JSON ({exc.msg} at char {exc.pos})") from None
    return validate_spec(spec, path)


def validate_spec(spec: object, path: str | Path = "spec") -> dict:
    """``spec`` checked before anything acts on it: a known format version, known keys of the
    right JSON types, options that :class:`ConvertOptions` accepts and a small ``input_shape``
    (it is allocated on load). Raises :class:`ModelSourceError` naming the first problem."""
    def bad(why: str) -> ModelSourceError:
        return ModelSourceError(f"{path}: invalid lnconvert spec: {why}")

    if not isinstance(spec, dict):
        raise bad(f"expected a JSON object, got {type(spec).__name__}")
    fmt = spec.get("format")
    prefix, _, version = fmt.partition("/") if isinstance(fmt, str) else ("", "", "")
    if prefix != "lnconvert" or not version.isdigit():
        raise bad(f"unknown format {fmt!r} (expected 'lnconvert/{FORMAT_VERSION}')")
    if int(version) > FORMAT_VERSION:
        raise ModelSourceError(f"{path} was written in format {fmt} by lnconvert "
                               f"{spec.get('lnconvert_version', '?')}; this lnconvert reads up to "
                               f"lnconvert/{FORMAT_VERSION}: upgrade lnconvert")
    unknown = sorted(set(spec) - set(_SPEC_TYPES))
    if unknown:
        raise bad(f"unknown key(s) {', '.join(map(repr, unknown))}")
    missing = [k for k in _REQUIRED_KEYS if k not in spec]
    if missing:
        raise bad(f"missing key(s) {', '.join(map(repr, missing))}")
    for key, value in spec.items():
        if not isinstance(value, _SPEC_TYPES[key]):
            expected = " or ".join(t.__name__ for t in _SPEC_TYPES[key])
            raise bad(f"'{key}' must be {expected}, got {type(value).__name__}")
    _check_input_shape(spec["input_shape"], bad)
    try:
        ConvertOptions.from_dict(spec["options"])
    except (TypeError, ValueError, AttributeError, LnConvertError) as exc:
        raise bad(f"options: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return spec


def _check_input_shape(shapes: list, bad) -> None:
    if not 1 <= len(shapes) <= MAX_INPUTS:
        raise bad(f"'input_shape' must list 1 to {MAX_INPUTS} shapes, got {len(shapes)}")
    total = 0
    for shape in shapes:
        if not (isinstance(shape, list) and 1 <= len(shape) <= MAX_INPUT_DIMS
                and all(type(d) is int and d > 0 for d in shape)):
            raise bad(f"'input_shape' entries must be lists of 1 to {MAX_INPUT_DIMS} positive integers, got {shape!r}")
        total += math.prod(shape)
    if total > MAX_INPUT_ELEMENTS:
        raise bad(f"'input_shape' asks for {total:,} input elements (limit {MAX_INPUT_ELEMENTS:,})")


def trusted_source(spec: dict, path: str | Path, trust_source: bool) -> str:
    """The spec's source name, when rebuilding it imports no code the file names: a
    torchvision or timm registry name. Anything else (``module:callable``, a file path) is
    refused unless ``trust_source``: loading it would import and run what the file says."""
    source = spec.get("source")
    if not source:
        raise ModelSourceError(f"{path} was converted from an in-memory model; pass model= (the source "
                               f"architecture, an nn.Module) to load it")
    if trust_source or is_registry_name(source):
        return source
    raise ModelSourceError(f"{path} names '{source}' as its architecture; building it would import and run "
                           f"that code, refused: pass model= (the architecture as an nn.Module) or, only if you "
                           f"trust this file, trust_source=True (CLI --trust-source)")


def _load_deployment(path: Path, format: str) -> nn.Module:
    extra = {SPEC_FILE: ""}
    try:
        if format == "pt2":
            return torch.export.load(str(path), extra_files=extra).module()  # exported in eval mode
        return torch.jit.load(str(path), _extra_files=extra).eval()
    except Exception as exc:
        raise ModelSourceError(f"{path} is not a loadable {format} model (truncated or corrupt?): "
                               f"{type(exc).__name__}") from exc


def load(path: str | Path, model: nn.Module | None = None, *, trust_source: bool = False) -> nn.Module:
    """Load a saved converted model. The default format is rebuilt without unpickling, by
    converting the source architecture again: ``model`` supplies it (an nn.Module; needed
    when the model was converted from an in-memory model), else the spec's source name is
    built. Only torchvision / timm registry names are built by default; a ``module:callable``
    source imports and runs code the file names, so it needs ``trust_source=True``.
    pt2 / TorchScript files load with torch's own loaders."""
    from safetensors.torch import load_file

    from .convert import convert

    format = detect_format(path)
    if format != "safetensors":
        return _load_deployment(Path(path), format)
    spec = read_spec(path)
    if model is None:
        model = build_model(trusted_source(spec, path, trust_source))
    elif not isinstance(model, nn.Module):
        raise UsageError(f"model= must be the source architecture as an nn.Module, got {type(model).__name__}")
    options = ConvertOptions.from_dict(spec["options"]).graph_kwargs()
    inputs = tuple(torch.zeros(shape) for shape in spec["input_shape"])
    if spec.get("calibrated"):  # for the graph's structure only: the saved weights replace the statistics
        from .calibrate import calibrate_batchnorm

        model = calibrate_batchnorm(model, inputs[:1])
    rebuilt = convert(model, example_inputs=inputs, verify=False, **options).model
    state = load_file(str(path))
    result = rebuilt.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelSourceError(f"{path} does not match its rebuilt graph "
                               f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return rebuilt.eval()


def load_result(path: str | Path, model: nn.Module | None = None, *, trust_source: bool = False):
    """A saved model as a :class:`ConversionResult` (source architecture, options, example
    inputs and report included), e.g. for :func:`lnconvert.compact`. ``model`` and
    ``trust_source`` as in :func:`load`."""
    from .convert import ConversionResult
    from .report import ConversionReport

    if detect_format(path) != "safetensors":
        raise ModelSourceError(f"{path}: only the default safetensors format keeps what compaction needs")
    spec = read_spec(path)
    if spec.get("calibrated"):
        raise ModelSourceError(f"{path} was converted with --calibrate, whose data is not stored; compact the "
                               f"ConversionResult of the calibrated model instead")
    source = model if model is not None else build_model(trusted_source(spec, path, trust_source))
    inputs = tuple(torch.randn(shape, generator=torch.Generator().manual_seed(0)) for shape in spec["input_shape"])
    try:
        report = ConversionReport.from_dict({"model": spec["source"] or Path(path).stem, "options": spec["options"]}
                                            | (spec.get("report") or {}))
    except (TypeError, ValueError) as exc:
        raise ModelSourceError(f"{path}: invalid lnconvert spec: report: {one_line(exc)}") from None
    return ConversionResult(load(path, model=source), report, source, ConvertOptions.from_dict(spec["options"]),
                            inputs)


def load_model(name: str, weights: str | None = None, *, trust_pickle: bool = False,
               trust_source: bool = False, weights_key: str | None = None) -> nn.Module:
    """Build a model by name with ``weights`` (:func:`lnconvert.models.load_model`: a torchvision
    or timm name, or ``module:callable``; None, ``"DEFAULT"`` or a checkpoint). A path to a saved
    lnconvert model (``.safetensors``, ``.pt2``, ``.torchscript.pt``) loads it instead
    (``trust_source`` as in :func:`load`)."""
    if is_saved_model_path(name):
        if weights is not None:
            raise ModelSourceError(f"{name} is a saved lnconvert model; it carries its own weights (drop --weights)")
        return load(name, trust_source=trust_source)  # already in eval mode (a pt2 module cannot switch modes)
    return build_model(name, weights, trust_pickle=trust_pickle, trust_source=trust_source, weights_key=weights_key)

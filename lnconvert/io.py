"""Saving and loading converted models.

Default format (``safetensors``), with no pickle: one ``.safetensors`` file whose metadata
holds the conversion spec (source model, options, example input shape, lnconvert version,
report). :func:`load` rebuilds the graph by converting the source architecture again with
the same options (deterministic), then loads the weights.

Deployment formats: ``pt2`` (a ``torch.export`` ExportedProgram with a dynamic batch axis)
and ``torchscript`` (traced; scripting fails on several activation classes). Both embed the
spec as an extra file. Writes are atomic: a temp file in the target directory, then a rename.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import fx, nn

from . import __version__
from .errors import ModelSourceError, OutputError
from .options import ConvertOptions

SPEC_KEY = "lnconvert_spec"
SPEC_FILE = "lnconvert_spec.json"
FORMATS = {"safetensors": ".safetensors", "pt2": ".pt2", "torchscript": ".torchscript.pt"}


def check_output_path(path: str | Path, force: bool) -> Path:
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output path {path} is a directory; give a file name")
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory {parent} is not writable")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    # keep the real suffix last: torch.export checks it
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent or ".")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the user's usual permissions
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave a partial file
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: fx.GraphModule, path: str | Path, spec: dict, *, force: bool = False,
         format: str = "safetensors") -> Path:
    """Write ``model`` and ``spec`` (from :func:`spec_for`) to ``path`` atomically."""
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
                _save_deployment(model.eval(), tmp, spec, text, format)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def _save_deployment(model: nn.Module, tmp: str, spec: dict, text: str, format: str) -> None:
    example = tuple(torch.zeros(shape) for shape in spec["input_shape"])
    with torch.no_grad():
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
    return json.loads(metadata[SPEC_KEY])


def _load_deployment(path: Path, format: str) -> nn.Module:
    extra = {SPEC_FILE: ""}
    try:
        if format == "pt2":
            return torch.export.load(str(path), extra_files=extra).module()  # exported in eval mode
        return torch.jit.load(str(path), _extra_files=extra).eval()
    except Exception as exc:
        raise ModelSourceError(f"{path} is not a loadable {format} model (truncated or corrupt?): "
                               f"{type(exc).__name__}") from exc


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a saved converted model. The default format is rebuilt without unpickling
    (``model`` supplies the source architecture when the spec's source is not a loadable
    name, i.e. it was converted from an in-memory model); pt2 / TorchScript files load with
    torch's own loaders."""
    from safetensors.torch import load_file

    from .convert import convert
    from .models import load_model

    format = detect_format(path)
    if format != "safetensors":
        return _load_deployment(Path(path), format)
    spec = read_spec(path)
    if model is None:
        if not spec.get("source"):
            raise ModelSourceError(f"{path} was converted from an in-memory model; pass model= to load it")
        model = load_model(spec["source"])
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


def load_result(path: str | Path):
    """A saved model as a :class:`ConversionResult` (source architecture, options, example
    inputs and report included), e.g. for :func:`lnconvert.compact`."""
    from .convert import ConversionResult
    from .models import load_model
    from .report import ConversionReport

    if detect_format(path) != "safetensors":
        raise ModelSourceError(f"{path}: only the default safetensors format keeps what compaction needs")
    spec = read_spec(path)
    if not spec.get("source"):
        raise ModelSourceError(f"{path} was converted from an in-memory model; compact the ConversionResult instead")
    if spec.get("calibrated"):
        raise ModelSourceError(f"{path} was converted with --calibrate, whose data is not stored; compact the "
                               f"ConversionResult of the calibrated model instead")
    inputs = tuple(torch.randn(shape, generator=torch.Generator().manual_seed(0)) for shape in spec["input_shape"])
    return ConversionResult(load(path), ConversionReport.from_dict(spec["report"]), load_model(spec["source"]),
                            ConvertOptions.from_dict(spec["options"]), inputs)

"""Saving and loading converted models without pickle: safetensors weights + a JSON spec.

The file is one ``.safetensors`` whose metadata holds the conversion spec (source model,
options, example input shape, lnconvert version, report). :func:`load` rebuilds the graph
by converting the source architecture again with the same options (deterministic), then
loads the weights. Writes are atomic: a temp file in the target directory, then a rename.
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

SPEC_KEY = "lnconvert_spec"


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave a partial file
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: fx.GraphModule, path: str | Path, spec: dict, *, force: bool = False) -> Path:
    """Write ``model``'s weights and ``spec`` (from :func:`spec_for`) to ``path`` atomically."""
    from safetensors.torch import save_file

    from .finetune import plain_state_dict  # twin-split weights (fine-tuning) are saved merged

    path = check_output_path(path, force)
    tensors = {k: v.detach().contiguous() for k, v in plain_state_dict(model).items()}
    metadata = {SPEC_KEY: json.dumps(spec, default=str)}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def spec_for(source: str, weights: str | None, options: dict, input_shape: list[list[int]], report: dict) -> dict:
    return {"format": "lnconvert/1", "lnconvert_version": __version__, "source": source, "weights": weights,
            "options": options, "input_shape": input_shape, "report": report}


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


def load(path: str | Path, model: nn.Module | None = None) -> fx.GraphModule:
    """Rebuild a saved converted model (no unpickling). ``model`` supplies the source
    architecture when the spec's source is not a loadable name (an in-memory model)."""
    from safetensors.torch import load_file

    from .convert import convert
    from .models import load_model

    spec = read_spec(path)
    if model is None:
        if not spec.get("source"):
            raise ModelSourceError(f"{path} was converted from an in-memory model; pass model= to load it")
        model = load_model(spec["source"])
    options = dict(spec["options"])
    options.pop("precision", None)
    options.pop("tolerance", None)
    inputs = tuple(torch.zeros(shape) for shape in spec["input_shape"])
    rebuilt = convert(model, example_inputs=inputs, verify=False, **options).model
    state = load_file(str(path))
    result = rebuilt.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelSourceError(f"{path} does not match its rebuilt graph "
                               f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return rebuilt.eval()

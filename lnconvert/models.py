"""Model sources: torchvision and timm names, ``module:callable`` import paths, weight files."""
from __future__ import annotations

import difflib
import importlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .errors import ModelSourceError

_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema", "ema")
_PREFIXES = ("module.", "_orig_mod.")


@lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


@lru_cache(maxsize=1)
def timm_names() -> tuple[str, ...]:
    try:
        import timm
    except ImportError:
        return ()
    return tuple(timm.list_models())


def resolve(name: str) -> tuple[str, str]:
    """(library, architecture) for ``name``: ``torchvision/x``, ``torchvision/TASK/x`` (any
    torchvision task: ``torchvision/detection/fasterrcnn_resnet50_fpn``), ``timm/x`` (or a timm
    pretrained tag such as ``resnet18.a1_in1k``), ``pkg.module:callable``, or a bare name
    (torchvision first). torchvision architectures come back canonical (``detection/NAME``)."""
    from . import tasks

    if ":" in name:
        return "import", name
    library, _, arch = name.partition("/") if "/" in name else ("", "", name)
    if library == "timm":
        return library, arch
    if library == "torchvision":
        found = tasks.canonical(arch)
        if found is None:
            raise ModelSourceError(f"unknown torchvision model '{arch}'; `lnconvert list 'torchvision/*'` shows them")
        return library, found
    if library:
        raise ModelSourceError(f"unknown model source '{library}/'; use torchvision/, timm/ or module:callable")
    found = tasks.canonical(arch)
    if found is not None:
        return "torchvision", found
    if arch.split(".")[0] in timm_names():
        return "timm", arch
    known = list(dict.fromkeys([n.rpartition("/")[2] for n in tasks.all_names()] + list(timm_names())))
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `lnconvert list PATTERN` shows known names"
    raise ModelSourceError(f"unknown model '{name}'{hint}")


def _build(library: str, arch: str, official: bool) -> nn.Module:
    if library == "torchvision":
        from . import tasks

        return tasks.build(arch, official)
    if library == "timm":
        import timm

        return timm.create_model(arch, pretrained=official)
    module_name, _, attr = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelSourceError(f"cannot import '{arch}': {exc}") from exc
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"'{arch}' did not give an nn.Module (got {type(model).__name__})")
    return model


def load_model(name: str, weights: str | None = None, *, trust_pickle: bool = False) -> nn.Module:
    """Build a model by name with ``weights``: None (the architecture's own initialisation),
    ``"DEFAULT"`` (official weights; needs network or a local cache) or a checkpoint path.
    A path to a saved lnconvert model (``.safetensors``, ``.pt2``, ``.torchscript.pt``) loads it."""
    if Path(name).suffix in (".safetensors", ".pt2") or name.endswith(".torchscript.pt"):
        from .io import load

        if weights is not None:
            raise ModelSourceError(f"{name} is a saved lnconvert model; it carries its own weights (drop --weights)")
        return load(name)  # already in eval mode (a pt2 module cannot even switch modes)
    library, arch = resolve(name)
    official = weights is not None and weights.upper() == "DEFAULT"
    try:
        model = _build(library, arch, official)
    except ModelSourceError:
        raise
    except Exception as exc:
        if official:
            raise ModelSourceError(f"could not fetch the official weights of {name} ({type(exc).__name__}); "
                                   f"download them where there is network and pass --weights PATH") from exc
        raise ModelSourceError(f"cannot build {name}: {type(exc).__name__}: {exc}") from exc
    if weights is not None and not official:
        load_weights(model, weights, trust_pickle=trust_pickle)
    return model.eval()


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``.pt/.pth`` (bare or wrapped under
    state_dict/model/ema keys; ``module.`` and ``_orig_mod.`` prefixes stripped). Pickled
    whole modules load only with ``trust_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise ModelSourceError(f"weights file is empty: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise ModelSourceError(f"{path} is not a valid safetensors file ({type(exc).__name__})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except Exception as exc:
            text = str(exc)
            if "Unsupported global" in text or "GLOBAL" in text:
                raise ModelSourceError(f"{path} contains pickled Python objects (a whole model?); refused "
                                       f"without --trust-pickle (only for files you trust)") from exc
            raise ModelSourceError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                                   f"{type(exc).__name__}") from exc
        if isinstance(state, nn.Module):
            state = state.state_dict()
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSourceError(f"{path} does not hold a state dict of tensors")
    return {_strip(k): v for k, v in state.items()}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def load_weights(model: nn.Module, path: str | Path, *, trust_pickle: bool = False) -> None:
    state = read_state_dict(path, trust_pickle=trust_pickle)
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ModelSourceError(f"{path} does not match {type(model).__name__}: {'; '.join(parts)}")


def list_models(pattern: str = "*") -> list[tuple[str, str]]:
    """(library, name) of known models matching a glob pattern."""
    import fnmatch

    from . import tasks

    def matches(library: str, name: str) -> bool:  # by name, TASK/NAME ('detection/*') or library/...
        return any(fnmatch.fnmatch(text, pattern) for text in (name, name.rpartition("/")[2], f"{library}/{name}"))

    out = [("torchvision", n) for n in tasks.all_names() if matches("torchvision", n)]
    out += [("timm", n) for n in timm_names() if matches("timm", n)]
    return out

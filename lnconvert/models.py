"""Model sources: torchvision and timm names, ``module:callable`` import paths, weight files."""
from __future__ import annotations

import difflib
import importlib
import weakref
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .errors import ModelSourceError

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


# model built by load_model -> (name, weights, structure at load): what lnconvert.save records as the
# source, so that lnconvert.load can rebuild it; a model changed since (a new head) has no name
_SOURCES: "weakref.WeakKeyDictionary[nn.Module, tuple[str, str | None, tuple]]" = weakref.WeakKeyDictionary()


def _structure(model: nn.Module) -> tuple:
    return (tuple((name, type(m).__qualname__) for name, m in model.named_modules()),
            tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))


def source_name(model: nn.Module | None) -> tuple[str | None, str | None]:
    """(name, weights) that :func:`load_model` built ``model`` from, if its modules and state
    shapes are unchanged since; else (None, None): an in-memory model."""
    entry = _SOURCES.get(model) if model is not None else None
    if entry is None or entry[2] != _structure(model):
        return None, None
    return entry[0], entry[1]


SAVED_MODEL_SUFFIXES = (".safetensors", ".pt2", ".torchscript.pt")


def is_saved_model_path(name: str) -> bool:
    """Whether ``name`` names a saved lnconvert model file (by its suffix), not an architecture."""
    return name.endswith(SAVED_MODEL_SUFFIXES)


def inherit_source(derived: nn.Module, model: nn.Module) -> None:
    """Record ``derived`` (e.g. a calibrated copy of ``model``) under ``model``'s source name, so
    that saving a conversion of ``derived`` names the architecture it can be rebuilt from."""
    name, weights = source_name(model)
    if name is not None:
        _SOURCES[derived] = (name, weights, _structure(derived))


def is_registry_name(name: str) -> bool:
    """Whether ``name`` is a torchvision or timm registry name: building it imports no code
    that the name chooses (unlike ``module:callable`` or a file path)."""
    if ":" in name or is_saved_model_path(name):
        return False
    try:
        library, arch = resolve(name)
    except ModelSourceError:
        return False
    if library == "torchvision":
        return arch in torchvision_names()
    return library == "timm" and arch.split(".")[0] in timm_names()  # not hf-hub: (network) or other schemes


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


def load_model(name: str, weights: str | None = None, *, trust_pickle: bool = False,
               trust_source: bool = False, weights_key: str | None = None) -> nn.Module:
    """Build a model by name with ``weights``: None (the architecture's own initialisation),
    ``"DEFAULT"`` (official weights; needs network or a local cache) or a checkpoint (file,
    sharded index or Hugging Face-style directory; ``weights_key`` picks the state dict inside
    it, see :func:`select_state_dict`).
    A saved lnconvert model is not built here: :func:`lnconvert.load_model` (:mod:`lnconvert.io`)
    loads those paths and hands everything else to this function."""
    if is_saved_model_path(name):
        raise ModelSourceError(f"{name} is a saved lnconvert model: load it with lnconvert.load_model or "
                               f"lnconvert.load")
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
        load_weights(model, weights, trust_pickle=trust_pickle, weights_key=weights_key)
    _SOURCES[model] = (name, weights, _structure(model))
    return model.eval()


HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin")
_MAX_NESTING = 6  # how deep checkpoint dicts are searched for a state dict


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, by its dotted path through nested dicts (``{"ema":
    {"conv.weight": t}}`` gives ``ema.conv.weight``). ``path`` is a ``.safetensors`` file, a
    ``torch.save`` file (``.pt/.pth/.bin/.ckpt``; pickled objects only with ``trust_pickle``),
    a sharded checkpoint's ``*.index.json`` or a Hugging Face-style directory holding one of
    ``model.safetensors(.index.json)`` / ``pytorch_model.bin(.index.json)``."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in HF_WEIGHT_FILES if (path / name).is_file()), None)
        if found is None:
            raise ModelSourceError(f"{path} is a directory without weights (expected one of: "
                                   f"{', '.join(HF_WEIGHT_FILES)})")
        path = found
    if not path.is_file():
        raise ModelSourceError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise ModelSourceError(f"weights file is empty: {path}")
    if path.name.endswith(".index.json"):
        return _read_shards(path, trust_pickle)
    return _flatten(_read_file(path, trust_pickle))


def _read_file(path: Path, trust_pickle: bool) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelSourceError(f"{path} is not a valid safetensors file ({type(exc).__name__})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise ModelSourceError(f"{path} contains pickled Python objects (a whole model?); refused "
                                   f"without --trust-pickle (only for files you trust)") from exc
        raise ModelSourceError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                               f"{type(exc).__name__}") from exc


def _read_shards(index: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """A sharded checkpoint: ``weight_map`` of the index names each tensor's shard, a file
    beside the index (names with a directory part are refused)."""
    import json

    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelSourceError(f"{index} is not a sharded-checkpoint index (no valid weight_map)") from exc
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or not (index.parent / shard).is_file():
            raise ModelSourceError(f"{index} names shard {shard!r}, which is not a file beside it")
        state.update(_flatten(_read_file(index.parent / shard, trust_pickle)))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise ModelSourceError(f"{index}: {len(absent)} tensors of its weight_map are in no shard (e.g. {absent[0]})")
    return state


def _flatten(obj: object, prefix: str = "", depth: int = 0) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj} if prefix else {}
    if isinstance(obj, nn.Module):  # a pickled whole model (trust_pickle)
        obj = obj.state_dict()
    if not isinstance(obj, dict) or depth > _MAX_NESTING:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key), depth + 1))
    return out


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _under(tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """The tensors under dotted prefix ``key`` ("" is the top level), the prefix and wrapper
    prefixes (``module.``, ``_orig_mod.``) stripped."""
    start = f"{key}." if key else ""
    return {_strip(k[len(start):]): v for k, v in tensors.items() if k.startswith(start)}


def _matches(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> int:
    return sum(1 for k, v in expected.items() if k in state and state[k].shape == v.shape)


def _required(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state entries a checkpoint must supply (BatchNorm's ``num_batches_tracked``
    counter is often left out and changes nothing in eval mode)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def weight_candidates(tensors: dict[str, torch.Tensor], model: nn.Module) -> list[tuple[str, int]]:
    """(key, matched entries) for every dotted prefix under which the checkpoint holds tensors
    that match ``model``'s state entries after stripping the prefix, ``module.`` and
    ``_orig_mod.``: nested dicts (``model_state_dict``, ``state_dict_ema``) and attribute
    prefixes (Lightning's ``state_dict.model``). Best first; copies of one state dict once."""
    expected = _required(model)
    prefixes = {""}
    for name in tensors:
        parts = name.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
    scored = [(key, _matches(_under(tensors, key), expected)) for key in prefixes]
    scored = sorted([c for c in scored if c[1] > 0], key=lambda c: (-c[1], len(c[0]), c[0]))
    distinct: list[tuple[str, int]] = []
    for key, count in scored:
        # a block inside a better candidate matches by accident (resnet's layer1.0.conv1 ~ conv1)
        inside = any(not seen or key.startswith(f"{seen}.") for seen, _ in distinct)
        state = _under(tensors, key)
        if not inside and not any(count == seen_count and _same(state, _under(tensors, seen), expected)
                                  for seen, seen_count in distinct):
            distinct.append((key, count))
    return distinct


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return all(k in a and k in b and (a[k] is b[k] or torch.equal(a[k], b[k])) for k in expected)


def _label(key: str) -> str:
    return f"'{key}'" if key else "the top level"


def select_state_dict(tensors: dict[str, torch.Tensor], model: nn.Module, path: str | Path,
                      weights_key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict for ``model`` in a checkpoint's ``tensors`` (see :func:`read_checkpoint`):
    under ``weights_key`` when given, else the one candidate that supplies every entry of the
    model. Several complete candidates (a model and its EMA copy) or none: one line listing
    the candidates with their match counts, naming ``--weights-key``."""
    if not tensors:
        raise ModelSourceError(f"{path} does not hold a state dict of tensors")
    expected = _required(model)
    candidates = weight_candidates(tensors, model)
    listing = ", ".join(f"{_label(k)} ({n}/{len(expected)} match)" for k, n in candidates[:6])
    choose = "choose one with --weights-key KEY (API weights_key=)"
    if weights_key is not None:
        state = _under(tensors, weights_key.strip("."))
        if not state:
            raise ModelSourceError(f"{path} holds no tensors under --weights-key {weights_key!r}; "
                                   f"candidates: {listing or 'none'}")
        return state
    complete = [k for k, n in candidates if n == len(expected)]
    if len(complete) == 1:
        return _under(tensors, complete[0])
    if len(complete) > 1:
        raise ModelSourceError(f"{path} holds {len(complete)} different state dicts for {type(model).__name__}: "
                               f"{listing}; {choose}")
    if len(candidates) > 1:
        raise ModelSourceError(f"{path} holds no complete state dict for {type(model).__name__}; candidates: "
                               f"{listing}; {choose}")
    return _under(tensors, candidates[0][0] if candidates else "")  # the mismatch is reported by the caller


def read_state_dict(path: str | Path, model: nn.Module | None = None, *, trust_pickle: bool = False,
                    weights_key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict for ``model`` found in the checkpoint at ``path`` (without ``model``:
    the tensors under ``weights_key``, default the top level)."""
    tensors = read_checkpoint(path, trust_pickle=trust_pickle)
    if model is None:
        state = _under(tensors, (weights_key or "").strip("."))
        if not state:
            raise ModelSourceError(f"{path} does not hold a state dict of tensors")
        return state
    return select_state_dict(tensors, model, path, weights_key)


def load_weights(model: nn.Module, path: str | Path, *, trust_pickle: bool = False,
                 weights_key: str | None = None) -> None:
    """Load the checkpoint at ``path`` into ``model`` (see :func:`select_state_dict`): every
    entry must match by name and shape."""
    state = read_state_dict(path, model, trust_pickle=trust_pickle, weights_key=weights_key)
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    missing = [k for k in _required(model) if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs "
                         f"{tuple(expected[wrong[0]].shape)})")
        raise ModelSourceError(f"{path} does not match {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=False)


def list_models(pattern: str = "*") -> list[tuple[str, str]]:
    """(library, name) of known models matching a glob pattern."""
    import fnmatch

    from . import tasks

    def matches(library: str, name: str) -> bool:  # by name, TASK/NAME ('detection/*') or library/...
        return any(fnmatch.fnmatch(text, pattern) for text in (name, name.rpartition("/")[2], f"{library}/{name}"))

    out = [("torchvision", n) for n in tasks.all_names() if matches("torchvision", n)]
    out += [("timm", n) for n in timm_names() if matches("timm", n)]
    return out

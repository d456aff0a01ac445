"""Choosing the zoo's models: torchvision builders by task, timm models by glob or family."""
from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from typing import Iterable

from ..errors import UsageError


def torchvision_classification() -> list[str]:
    """Every torchvision classification model (``torchvision.models.list_models(module=models)``)."""
    from ..models import torchvision_names

    return [f"torchvision/{n}" for n in torchvision_names()]


def torchvision_tasks(tasks: Iterable[str] | None = None) -> list[str]:
    """Every torchvision builder of the given tasks (default: all, classification included)."""
    from ..tasks import TASKS, task_names

    chosen = list(tasks) if tasks is not None else list(TASKS)
    unknown = [t for t in chosen if t not in TASKS]
    if unknown:
        raise UsageError(f"unknown torchvision task {unknown[0]!r}; tasks: {', '.join(TASKS)}")
    return [f"torchvision/{n}" if t == "classification" else f"torchvision/{t}/{n}"
            for t in chosen for n in task_names()[t]]


def timm_matching(pattern: str) -> list[str]:
    """timm models whose name matches the glob ``pattern``."""
    from ..models import timm_names

    return [f"timm/{n}" for n in timm_names() if fnmatch.fnmatch(n, pattern)]


def timm_family(name: str) -> str:
    """The family of a timm model: its timm module plus the name's stem without the depth,
    e.g. ``efficientnet:mixnet`` for mixnet_s, ``resnet:resnet`` for resnet18d and resnet50."""
    tokens = name.split("_")
    stem = "_".join(tokens[:2]) if tokens[0] == "tf" and len(tokens) > 1 else tokens[0]
    stem = re.sub(r"\d{2,}[a-z]?$", "", stem)  # resnet18d -> resnet; mobilenetv3 keeps its version
    return f"{_timm_modules().get(name, '?')}:{stem}"


@lru_cache(maxsize=1)
def _timm_modules() -> dict[str, str]:
    """timm model name -> its module, from timm's public list_modules / list_models(module=)."""
    import timm

    return {n: module for module in timm.list_modules() for n in timm.list_models(module=module)}


def _meta_param_count(name: str) -> float:
    """Parameters of a timm model built on the meta device (no memory, no init); inf if it cannot be."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # an architecture that computes on tensors in __init__: rank it last
        return float("inf")
    return float(sum(p.numel() for p in model.parameters()))


@lru_cache(maxsize=1)
def timm_families() -> dict[str, str]:
    """Family -> its smallest timm model by parameter count (ties: the shorter, then first name)."""
    from ..models import timm_names

    members: dict[str, list[str]] = {}
    for name in timm_names():
        members.setdefault(timm_family(name), []).append(name)
    return {family: min(names, key=lambda n: (_meta_param_count(n) if len(names) > 1 else 0, len(n), n))
            for family, names in sorted(members.items())}


def select_models(names: Iterable[str] = (), *, torchvision: bool = False, timm_patterns: Iterable[str] = (),
                  timm_smallest_per_family: bool = False, torchvision_task_list: Iterable[str] = ()) -> list[str]:
    """Canonical ``library/name`` list, in the order asked, without repeats. Explicit names are
    resolved like ``lnconvert MODEL`` (an unknown name raises ModelSourceError)."""
    from ..models import resolve

    chosen: list[str] = []
    for name in names:
        library, arch = resolve(name)
        if library == "import":
            raise UsageError(f"the zoo runs torchvision and timm models; {name!r} is an import path")
        chosen.append(f"{library}/{arch}")
    if torchvision:
        chosen += torchvision_classification()
    task_list = list(torchvision_task_list)
    if task_list:
        chosen += torchvision_tasks(None if "all" in task_list else task_list)
    for pattern in timm_patterns:
        matched = timm_matching(pattern)
        if not matched:
            raise UsageError(f"no timm model matches {pattern!r}")
        chosen += matched
    if timm_smallest_per_family:
        chosen += [f"timm/{n}" for n in timm_families().values()]
    return list(dict.fromkeys(chosen))


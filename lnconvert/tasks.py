"""torchvision beyond classification: builders by task name and an input each task accepts.

Names: ``torchvision/TASK/NAME`` (``torchvision/detection/fasterrcnn_resnet50_fpn``) or the
plain builder name when it is unique (``fasterrcnn_resnet50_fpn``; classification names
stay ``resnet18``). Builders get ``weights=None`` and ``weights_backbone=None`` unless
official weights are asked for, so nothing is fetched offline; the quantizable builders
(``quantized_resnet18``) build their floating-point model (``quantize=False``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn

from .errors import ModelSourceError

# task -> torchvision.models submodule holding its builders; classification first (plain names)
TASK_MODULES = {"classification": "", "segmentation": "segmentation", "detection": "detection",
                "video": "video", "optical_flow": "optical_flow", "quantization": "quantization"}
TASKS = tuple(TASK_MODULES)
# builder keyword: what it is set to when no official weights are asked for
_NO_DOWNLOAD = {"segmentation": {"weights_backbone": None}, "detection": {"weights_backbone": None},
                "quantization": {"quantize": False}}
# the clip a video model is built for, where the default 8 x 112 x 112 is too short or small
# (torchvision's weights meta: S3D min_temporal_size 14 at 224, MViT 16 at 224)
_VIDEO_CLIPS = {"S3D": (3, 16, 224, 224), "MViT": (3, 16, 224, 224)}
DEFAULT_INPUTS = {"segmentation": (3, 128, 128), "detection": (3, 160, 192), "video": (3, 8, 112, 112),
                  "optical_flow": (3, 128, 128)}


@lru_cache(maxsize=1)
def task_names() -> dict[str, tuple[str, ...]]:
    """Builder names per task (``torchvision.models.list_models(module=...)``)."""
    import torchvision.models as models

    return {task: tuple(models.list_models(module=getattr(models, sub) if sub else models))
            for task, sub in TASK_MODULES.items()}


def canonical(arch: str) -> str | None:
    """``TASK/NAME`` (classification: ``NAME``) for a torchvision name given either way, None
    if torchvision has no such builder."""
    names = task_names()
    task, _, name = arch.rpartition("/")
    if task:
        if task not in names:
            raise ModelSourceError(f"unknown torchvision task '{task}'; tasks: {', '.join(TASKS)}")
        return (name if task == "classification" else arch) if name in names[task] else None
    for task in TASKS:  # the first task holding the name (classification before quantization)
        if name in names[task]:
            return name if task == "classification" else f"{task}/{name}"
    return None


def all_names() -> list[str]:
    """Every torchvision builder in canonical form."""
    return [name if task == "classification" else f"{task}/{name}" for task, names in task_names().items()
            for name in names]


def build(arch: str, official: bool) -> nn.Module:
    """The torchvision model ``arch`` (canonical); its backbone is never fetched unless ``official``."""
    import torchvision

    task, _, name = arch.rpartition("/")
    kwargs: dict[str, Any] = {} if official else dict(_NO_DOWNLOAD.get(task, {}))
    return torchvision.models.get_model(name, weights="DEFAULT" if official else None, **kwargs)


def task_of(model: nn.Module) -> str:
    """The torchvision task ``model`` belongs to (by where its class is defined), else classification."""
    where = type(model).__module__
    for task, sub in TASK_MODULES.items():
        if sub and where.startswith(f"torchvision.models.{sub}"):
            return task
    return "classification"


def example_inputs(model: nn.Module, batch: int = 2, input_size: tuple[int, ...] | None = None, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> tuple[Any, ...] | None:
    """Positional arguments a torchvision task model accepts, or None for a plain image model:
    detection: one list of ``batch`` images (C, H, W); optical flow: two image batches; video:
    a clip batch (B, C, T, H, W) long enough for the model; segmentation: an image batch."""
    task = task_of(model)
    if task in ("classification", "quantization"):
        return None
    size = tuple(input_size) if input_size else _VIDEO_CLIPS.get(type(model).__name__, DEFAULT_INPUTS[task])
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)

    if task == "detection":  # images of one size; the model's own transform resizes them
        return ([draw(*size) for _ in range(batch)],)
    if task == "optical_flow":
        return draw(batch, *size), draw(batch, *size)
    return (draw(batch, *size),)


__all__ = ["DEFAULT_INPUTS", "TASKS", "all_names", "build", "canonical", "example_inputs", "task_names", "task_of"]

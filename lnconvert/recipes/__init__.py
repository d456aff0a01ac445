"""Runnable recipes: YAML files (``recipes/*.yaml``) run by ``lnconvert recipe run``.

Two pipelines: ``convert-finetune`` (train or load a BN model, convert with BN dropped,
check test accuracy is unchanged, fine-tune BN-free at several batch sizes, time train
steps) and ``depth`` (the Linked Neurons depth experiment). Every run writes metrics JSON,
PNG plots and resumable checkpoints into its run directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from rich.console import Console
from torch import fx

from ..errors import OutputError
from ..io import atomic_path
from .config import RecipeError, load_recipe

__all__ = ["RecipeError", "load_recipe", "load_result", "run_recipe"]


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RecipeError(f"recipes need {', '.join(missing)}: pip install 'lnconvert[recipes]'")


def run_recipe(source: str | Path | dict, *, out: str | Path | None = None, overrides: Iterable[str] = (),
               resume: bool = True, weights: str | None = None, data: str | None = None,
               console: Console | None = None) -> dict[str, Any]:
    """Run a recipe; returns its metrics (also written to ``OUT/metrics.json``).

    ``out`` defaults to ``runs/NAME``; ``weights`` sets ``model.weights``; ``data`` sets the
    data location (``data.path`` for ImageFolder, ``data.data_root`` for CIFAR-10). With
    ``resume`` existing checkpoints of the same configuration are continued.
    """
    _require("yaml", "matplotlib", "sklearn")
    import yaml

    from . import distributed
    from .pipelines import convert_finetune, depth

    context = distributed.init_from_env()  # under torchrun: join the other ranks first
    if not context.is_main:
        console = Console(quiet=True)  # rank 0 speaks for the run
    config = load_recipe(source, overrides)
    if weights is not None:
        config["model"]["weights"] = weights
    if data is not None:
        config["data"]["data_root" if config["data"]["kind"] == "cifar10" else "path"] = data
    pipeline = convert_finetune if config["recipe"] == "convert-finetune" else depth
    if context.active and not getattr(pipeline, "data_parallel", False):
        raise RecipeError(f"recipe kind {config['recipe']!r} runs in one process only; start it without torchrun")
    out = Path(out) if out is not None else Path("runs") / config["name"]
    # only rank 0 writes (the others need no run directory: they may be on another machine); its
    # error, if any, is raised on every rank
    distributed.from_main(lambda: _prepare_run_directory(out, yaml.safe_dump(config, sort_keys=False)))
    if config["threads"]:
        torch.set_num_threads(int(config["threads"]))
    metrics = pipeline(config, out, resume, console or Console())
    distributed.finish()
    return metrics


def _prepare_run_directory(out: Path, resolved_recipe: str) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"run directory {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create run directory {out}: {exc.strerror or exc}") from None
    with atomic_path(out / "recipe.yaml") as tmp:  # the resolved recipe, for reproducing the run
        Path(tmp).write_text(resolved_recipe)


def load_result(path: str | Path) -> fx.GraphModule:
    """Load a model saved by a ``convert-finetune`` recipe (its spec records the architecture)."""
    from ..io import load, read_spec
    from .pipelines import architecture

    spec = read_spec(path)
    recipe = spec.get("recipe")
    if spec.get("source") or not recipe:
        return load(path)
    return load(path, model=architecture(recipe["model"], recipe["in_channels"], recipe["num_classes"]))

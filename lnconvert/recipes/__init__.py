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
from ..files import atomic_path
from .config import RecipeError, load_recipe

__all__ = ["RecipeError", "load_recipe", "load_result", "run_recipe"]


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RecipeError(f"recipes need {', '.join(missing)}: pip install 'lnconvert[recipes]'")


def run_recipe(source: str | Path | dict, *, out: str | Path | None = None, overrides: Iterable[str] = (),
               resume: bool = True, weights: str | None = None, data: str | None = None,
               jobs: int | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run a recipe; returns its metrics (also written to ``OUT/metrics.json``).

    ``out`` defaults to ``runs/NAME``; ``weights`` sets ``model.weights``; ``data`` sets the
    data location (``data.path`` for ImageFolder, ``data.data_root`` for CIFAR-10); ``jobs``
    sets ``jobs`` (parallel processes, for recipes that have independent runs). With
    ``resume`` existing checkpoints of the same configuration are continued.
    """
    _require("yaml", "matplotlib", "sklearn")
    import yaml

    from . import distributed
    from .depth import depth
    from .pipelines import convert_finetune
    from .transfer import transfer

    context = distributed.init_from_env()  # under torchrun: join the other ranks first
    if not context.is_main:
        console = Console(quiet=True)  # rank 0 speaks for the run
    config = load_recipe(source, overrides)
    if weights is not None:
        config["model"]["weights"] = weights
    if data is not None:
        config["data"]["data_root" if config["data"]["kind"] == "cifar10" else "path"] = data
    if jobs is not None:
        if "jobs" not in config:
            raise RecipeError(f"--jobs applies to recipes with independent runs (depth, transfer), "
                              f"not {config['recipe']!r}")
        config["jobs"] = jobs
    pipeline = {"convert-finetune": convert_finetune, "depth": depth, "transfer": transfer}[config["recipe"]]
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


# bounds on the architecture a saved recipe spec may ask for (it is built before any weight is read)
_MAX_WIDTH, _MAX_BLOCKS, _MAX_STAGES, _MAX_CLASSES = 4096, 64, 16, 100_000


def load_result(path: str | Path, *, trust_source: bool = False) -> fx.GraphModule:
    """Load a model saved by a ``convert-finetune`` recipe (its spec records the architecture).

    As :func:`lnconvert.load`, nothing the file names is imported unless ``trust_source``:
    the built-in digits ResNet and torchvision / timm names are built, within size bounds."""
    from ..io import load, read_spec
    from .pipelines import architecture

    spec = read_spec(path)
    recipe = spec.get("recipe")
    if spec.get("source") or not recipe:
        return load(path, trust_source=trust_source)
    mcfg = _checked_recipe_model(recipe, path, trust_source)
    return load(path, model=architecture(mcfg, recipe["in_channels"], recipe["num_classes"]))


def _checked_recipe_model(recipe: dict, path: str | Path, trust_source: bool) -> dict:
    """The spec's recipe model config, refused unless its types and sizes are sane and its
    name imports no code (the built-in ResNet, a registry name, or ``trust_source``)."""
    from ..errors import ModelSourceError
    from ..io import trusted_source
    from .pipelines import BUILTIN

    def small(value: Any, limit: int) -> bool:
        return type(value) is int and 0 < value <= limit

    mcfg = recipe.get("model")
    ok = (isinstance(mcfg, dict) and isinstance(mcfg.get("name"), str) and small(recipe.get("in_channels"), _MAX_WIDTH)
          and small(recipe.get("num_classes"), _MAX_CLASSES)
          and (mcfg.get("num_classes") is None or small(mcfg.get("num_classes"), _MAX_CLASSES))
          and isinstance(mcfg.get("trust_pickle", False), bool))
    if ok and mcfg["name"] == BUILTIN:
        widths = mcfg.get("widths")
        ok = (isinstance(widths, list) and 0 < len(widths) <= _MAX_STAGES and all(small(w, _MAX_WIDTH) for w in widths)
              and small(mcfg.get("blocks"), _MAX_BLOCKS))
    if not ok:
        raise ModelSourceError(f"{path}: invalid lnconvert spec: 'recipe' does not describe a recipe model "
                               f"(name, sizes within bounds)")
    if mcfg["name"] != BUILTIN:
        trusted_source({"source": mcfg["name"]}, path, trust_source)
    return mcfg

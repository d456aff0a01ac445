"""Recipe files: YAML with defaults per pipeline, ``key.sub=value`` overrides, strict keys."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from ..errors import UsageError


class RecipeError(UsageError):
    """The recipe file, an override, or the data it names is invalid or missing (exit 2)."""


DATA = {"kind": "digits", "size": 32, "test_fraction": 0.2, "scale": 16.0, "normalize": True, "path": None,
        "data_root": None, "mean": None, "std": None, "max_train": None, "max_test": None}
TRAIN = {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "max_steps": None}
FINETUNE = {**TRAIN, "twin_lr": None, "twin_weight_decay": None}
COMMON = {"recipe": None, "name": None, "seed": 0, "threads": None, "amp": "none", "compile": False,
          "checkpoint_every": 500, "dead_units": {"max_batches": None}}

DEFAULTS: dict[str, dict[str, Any]] = {
    "convert-finetune": {
        **COMMON, "data": DATA,
        "model": {"name": "digits_resnet", "weights": None, "num_classes": None, "widths": [16, 32, 64],
                  "blocks": 1, "trust_pickle": False},
        "pretrain": {**TRAIN, "epochs": 0},
        "convert": {"drop_bn": True, "policy": "mirror", "residual": "slice", "activations": None,
                    "tolerance": 1e-5},
        "finetune": [],
        "timing": {"batch_size": 32, "steps": 10, "repeats": 5},
        # compact the last fine-tuned model: "exact" (zero-weight and dead twins) and MAC budgets
        "compact": {"targets": ["exact"], "calibration": 512},
        "save_model": True,
    },
    "depth": {
        **COMMON, "data": {**DATA, "normalize": False},
        "model": {"depth": 50, "width": 4, "stem_kernel": 7, "stem_stride": 2},
        "train": {**TRAIN, "epochs": 10},
        "variants": ["relu", "prelu", "silu", "linked_relu", "linked_selu", "selu", "relu_bn"],
        "seeds": None,          # run seeds (init and batch order); null: [seed]
        "variant_epochs": {},   # variant -> epochs, overriding train.epochs for that variant
        "jobs": 1,              # (variant, seed) tasks trained as parallel processes
        "time_limit_minutes": None,  # start no new (variant, seed) task after this; metrics list what did not run
    },
    "transfer": {
        **COMMON, "data": {"kind": "digits", "size": 16, "scale": 16.0},
        "shift": "invert",      # the target domain: invert (1 - x) | none
        # disjoint stratified splits: the target share of all images, then within it the labelled
        # target set (its validation part chooses learning rates) and the held-out test set (null: the rest)
        "split": {"target_fraction": 0.5, "source_test": 0.2, "target_train": 240, "target_val": 60,
                  "target_test": None},
        "model": {"widths": [8, 16, 32], "blocks": 2},
        "pretrain": {**TRAIN, "epochs": 10},
        "arms": ["no-finetune", "bn-train", "bn-frozen", "groupnorm", "folded", "linked-mirror",
                 "linked-minmax", "normprop", "deep-control"],
        "batch_sizes": [1, 4, 32],
        "samples": 720,         # target samples seen by every arm at every batch size
        "curve_points": 6,      # test-accuracy points along the way (for the plot)
        "optimizer": "adam",
        "lr_grid": [1e-4, 3e-4, 1e-3],
        "twin_lr_factors": [1, 10],  # linked arms: twin_lr = lr x factor, chosen with lr
        "seeds": [0, 1, 2, 3, 4],
        "selection_seed": 1000,  # the hyper-parameter search's batch order, apart from the reported seeds
        "jobs": 1,              # (arm, batch size) tasks run as parallel processes
        "time_limit_minutes": None,  # start no new task after this; metrics list what did not run
    },
}
LIST_ITEMS = {"finetune": FINETUNE}  # list-valued sections whose items are mappings with these keys
NULLABLE = {"timing", "compact"}     # sections a recipe may switch off with `null`
FREE_KEYS = {"variant_epochs"}       # mappings whose keys the recipe chooses (checked by the pipeline)


def _merge(defaults: Any, given: Any, where: str) -> Any:
    if where in FREE_KEYS:
        if not isinstance(given, dict):
            raise RecipeError(f"'{where}' must be a mapping, got {type(given).__name__}")
        return dict(given)
    if isinstance(defaults, dict):
        if given is None and where in NULLABLE:
            return None
        if not isinstance(given, dict):
            raise RecipeError(f"'{where}' must be a mapping, got {type(given).__name__}")
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise RecipeError(f"unknown key '{where + '.' if where else ''}{unknown[0]}' in recipe; "
                              f"known: {', '.join(sorted(defaults))}")
        return {k: _merge(v, given[k], f"{where}.{k}" if where else k) if k in given else copy.deepcopy(v)
                for k, v in defaults.items()}
    if where in LIST_ITEMS:
        if not isinstance(given, list):
            raise RecipeError(f"'{where}' must be a list of mappings")
        return [_merge(LIST_ITEMS[where], item, f"{where}[{i}]") for i, item in enumerate(given)]
    return given


def _parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set expects KEY=VALUE (e.g. pretrain.epochs=2), got {text!r}")
    path = []
    for part in key.strip().split("."):
        path.append(int(part) if part.isdigit() else part)
    return path, yaml.safe_load(value)


def _apply(raw: dict, path: list, value: Any) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(f"--set {'.'.join(map(str, path))}: no item {part} there")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"--set {'.'.join(map(str, path))}: '{path[i - 1]}' is not a mapping")
            node = node.setdefault(part, {})
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(f"--set {'.'.join(map(str, path))}: no item {last} there")
    elif not isinstance(node, dict):
        raise RecipeError(f"--set {'.'.join(map(str, path))}: parent is not a mapping")
    node[last] = value


def load_recipe(source: str | Path | dict, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a recipe (path or mapping), apply ``key.sub=value`` overrides, fill defaults."""
    import yaml

    if isinstance(source, dict):
        raw, default_name = copy.deepcopy(source), "recipe"
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise RecipeError(f"{path} is not valid YAML{where}") from None
        default_name = path.stem
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping")
    for text in overrides:
        _apply(raw, *_parse_override(text))
    kind = raw.get("recipe")
    if kind not in DEFAULTS:
        raise RecipeError(f"recipe kind {kind!r} unknown; set `recipe:` to one of {', '.join(DEFAULTS)}")
    config = _merge(DEFAULTS[kind], raw, "")
    config["name"] = config["name"] or default_name
    if config["amp"] not in ("none", "bf16"):
        raise RecipeError(f"amp must be none or bf16, got {config['amp']!r}")
    return config


def fingerprint(*parts: Any) -> str:
    """Stable hash of the configuration a checkpoint depends on."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

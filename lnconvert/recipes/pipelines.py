"""The convert-then-fine-tune pipeline (the depth experiment is in ``depth.py``, transfer in ``transfer.py``)."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from ..analysis import DeadUnits, dead_units
from ..compact import compact
from ..convert import ConversionResult, convert
from ..errors import ParityError
from ..finetune import merge_twins, param_groups
from ..io import save_with_spec, spec_for
from ..models import load_model, load_weights
from . import distributed
from .config import RecipeError, fingerprint
from .data import Data, build_data
from .nets import DigitsResNet
from .output import dead_rows, overall_dead, plot_curves, plot_dead, progress_bar, table, write_json
from .train import evaluate, fit, make_optimizer, ordered_batches, time_train_steps

BUILTIN = "digits_resnet"


# --- models ------------------------------------------------------------------------------
def _replace_head(model: nn.Module, num_classes: int) -> None:
    """timm's ``reset_classifier``, else a fresh copy of the last ``nn.Linear`` (torchvision heads)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    # torchvision's heads are their last nn.Linear
    name, last = next(((n, m) for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)),
                      (None, None))
    if last is None:
        raise RecipeError(f"{type(model).__name__} has no Linear head to replace for model.num_classes")
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf,
            nn.Linear(last.in_features, num_classes, bias=last.bias is not None))


def architecture(mcfg: dict[str, Any], in_channels: int, num_classes: int, weights: str | None = None) -> nn.Module:
    """The recipe's source model: the built-in BN ResNet or a torchvision/timm name, with
    ``weights`` loaded and, when ``model.num_classes`` is set and differs, a new head."""
    if mcfg["name"] == BUILTIN:
        model = DigitsResNet(in_channels, mcfg["num_classes"] or num_classes, mcfg["widths"], mcfg["blocks"])
        if weights:
            load_weights(model, weights, trust_pickle=mcfg["trust_pickle"])
        return model
    model = load_model(mcfg["name"], weights, trust_pickle=mcfg["trust_pickle"])
    if mcfg["num_classes"] is not None:
        _replace_head(model, mcfg["num_classes"])
    return model


def _check_outputs(model: nn.Module, data: Data, name: str) -> None:
    try:
        with torch.no_grad():
            width = model.eval()(torch.zeros(2, *data.input_shape)).shape[-1]
    except Exception as exc:
        raise RecipeError(f"{name} does not run on {data.input_shape} inputs: {type(exc).__name__}") from None
    if width != data.num_classes:
        raise RecipeError(f"{name} outputs {width} classes but the data has {data.num_classes}: pass --weights "
                          f"trained on it, or set model.num_classes={data.num_classes} (new head) with "
                          f"pretrain.epochs > 0")


def _dead(model: nn.Module, data: Data, cfg: dict[str, Any]) -> list[DeadUnits]:
    return dead_units(model, ordered_batches(data.train, 256), max_batches=cfg["dead_units"]["max_batches"])


def _test_accuracy(data: Data, amp: str):
    return lambda model: {"test_accuracy": evaluate(model, data.test, amp=amp)["accuracy"]}


def _fit(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data, train: dict[str, Any], cfg: dict[str, Any],
         path: Path, key: str, resume: bool, progress: Any, label: str) -> dict[str, Any]:
    return fit(model, optimizer, data.train, batch_size=train["batch_size"], epochs=train["epochs"],
               max_steps=train["max_steps"], seed=cfg["seed"], checkpoint=path, fingerprint=key, resume=resume,
               checkpoint_every=cfg["checkpoint_every"], on_epoch=_test_accuracy(data, cfg["amp"]),
               amp=cfg["amp"], compile=cfg["compile"], progress=progress, label=label)


def _compact_stage(result: ConversionResult, tuned: nn.Module, data: Data,
                   spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Compact the fine-tuned model at each target ("exact" or a MAC budget such as "1.2x" of
    the original), calibrated on the first ``spec["calibration"]`` training images; test
    accuracy and MACs per target, next to the fine-tuned model's."""
    finetuned = copy.copy(result)
    finetuned.model = merge_twins(copy.deepcopy(tuned))  # plain weights: compaction moves columns
    calibration, seen = [], 0
    for x, _ in ordered_batches(data.train, 256):
        if seen >= spec["calibration"]:
            break
        calibration.append(x[: spec["calibration"] - seen])
        seen += len(calibration[-1])
    reference = evaluate(finetuned.model, data.test)["accuracy"]
    rows = []
    for target in spec["targets"]:
        budget = None if str(target).lower() == "exact" else target
        compacted = compact(finetuned, data=calibration, target_macs=budget)
        accuracy = evaluate(compacted.model, data.test)["accuracy"]
        r = compacted.report
        rows.append({"target": str(target), "test_accuracy": accuracy, "accuracy_change": accuracy - reference,
                     "macs": r.macs_after, "macs_vs_original": r.macs_after / r.macs_original,
                     "params": r.params_after, "max_rel_deviation": r.max_rel_deviation, "removed": r.removed,
                     "notes": r.notes})
    return rows


# --- convert, then fine-tune BN-free -----------------------------------------------------
@distributed.data_parallel
def convert_finetune(cfg: dict[str, Any], out: Path, resume: bool, console: Console) -> dict[str, Any]:
    """Train (optionally) a BN model, convert it with BN dropped, prove test accuracy is
    unchanged, fine-tune the BN-free model at each configured batch size, time train steps."""
    started = time.perf_counter()
    torch.manual_seed(cfg["seed"])
    data = build_data(cfg["data"], cfg["seed"])
    mcfg = cfg["model"]
    model = architecture(mcfg, data.input_shape[0], data.num_classes, mcfg["weights"])
    _check_outputs(model, data, mcfg["name"])
    console.print(f"[bold]{cfg['name']}[/bold]: {data.description}; model {mcfg['name']}")
    base_key = fingerprint(cfg["data"], mcfg, cfg["seed"], cfg["amp"])
    histories: dict[str, dict[str, Any]] = {}

    with progress_bar(console) as progress:
        pre = cfg["pretrain"]
        if pre["epochs"] > 0:
            opt = make_optimizer(pre["optimizer"], model.parameters(), pre["lr"], pre["weight_decay"])
            histories["pretrain (BN)"] = _fit(model, opt, data, pre, cfg, out / "checkpoints" / "pretrain.pt",
                                              fingerprint(base_key, pre), resume, progress, "pretrain (BN)")
        model.eval()
        before, train_before = evaluate(model, data.test), evaluate(model, data.train)
        dead_before = _dead(model, data, cfg)

        conv = cfg["convert"]
        example = torch.stack([data.test[i][0] for i in range(min(8, len(data.test)))])
        result = convert(model, example_inputs=example, drop_bn=conv["drop_bn"], policy=conv["policy"],
                         residual=conv["residual"], activations=conv["activations"], tolerance=conv["tolerance"],
                         name=cfg["name"])
        converted = result.model.eval()
        after, train_after = evaluate(converted, data.test), evaluate(converted, data.train)
        differ = int((after["predictions"] != before["predictions"]).sum())
        if after["accuracy"] != before["accuracy"]:
            raise ParityError(f"test accuracy changed by the conversion: {before['accuracy']:.4f} -> "
                              f"{after['accuracy']:.4f} ({differ} predictions differ)", result.report)
        dead_after = _dead(converted, data, cfg)
        write_json(out / "conversion-report.json", result.report.to_dict())

        tuned_rows, final, dead_tuned = [], converted, {}
        for i, entry in enumerate(cfg["finetune"]):
            label = f"finetune bs{entry['batch_size']}" + (f" #{i}" if any(
                e["batch_size"] == entry["batch_size"] for e in cfg["finetune"][:i]) else "")
            tuned = copy.deepcopy(converted)
            groups = param_groups(tuned, base_lr=entry["lr"], weight_decay=entry["weight_decay"],
                                  twin_lr=entry["lr"] if entry["twin_lr"] is None else entry["twin_lr"],
                                  twin_weight_decay=entry["twin_weight_decay"])
            opt = make_optimizer(entry["optimizer"], groups, entry["lr"], entry["weight_decay"])
            key = fingerprint(base_key, pre, conv, entry)
            history = _fit(tuned, opt, data, entry, cfg, out / "checkpoints" / f"{label.replace(' ', '-')}.pt",
                           key, resume, progress, label)
            histories[label] = history
            test, train = evaluate(tuned, data.test, amp=cfg["amp"]), evaluate(tuned, data.train, amp=cfg["amp"])
            tuned_rows.append({"label": label, "batch_size": entry["batch_size"], "steps": history["steps"],
                               "test_accuracy": test["accuracy"], "train_loss_before": train_after["loss"],
                               "train_loss_after": train["loss"],
                               "ms_per_step": 1e3 * history["seconds"] / max(1, len(history["step_loss"]))})
            dead_tuned[label] = _dead(tuned, data, cfg)
            final = tuned
        compacted = _compact_stage(result, final, data, cfg["compact"]) \
            if cfg["compact"] is not None and final is not converted else []

    timing = None
    if cfg["timing"] is not None and distributed.is_main():  # alone: other ranks' work would skew it
        t = cfg["timing"]
        n = min(t["batch_size"], len(data.train))
        x = torch.stack([data.train[i][0] for i in range(n)])
        y = torch.tensor([int(data.train[i][1]) for i in range(n)])
        free = convert(model, example_inputs=example, link=False, verify=True, name="bn-free").model
        seconds = time_train_steps({"bn": model, "bn_free": free, "linked": converted}, x, y, t["steps"], t["repeats"])
        timing = {"batch_size": n, "seconds_per_step": seconds,
                  "bn_over_bn_free": seconds["bn"] / seconds["bn_free"],
                  "linked_over_bn": seconds["linked"] / seconds["bn"]}

    files = {"metrics": "metrics.json", "curves": "curves.png", "dead_units": "dead_units.png",
             "conversion_report": "conversion-report.json"}
    if cfg["save_model"] and distributed.is_main():
        path = out / f"{cfg['name']}-linked.safetensors"
        renamed = mcfg["name"] == BUILTIN or mcfg["num_classes"] is not None  # not rebuildable by name alone
        spec = spec_for(None if renamed else mcfg["name"], mcfg["weights"], result.report.options,
                        [[1, *data.input_shape]], result.report.to_dict())
        spec["recipe"] = {"name": cfg["name"], "model": mcfg, "in_channels": data.input_shape[0],
                          "num_classes": data.num_classes}
        save_with_spec(final, path, spec, force=True)
        files["model"] = path.name

    dead = {"BN model": dead_before, "converted": dead_after, **dead_tuned}
    if histories:
        plot_curves(histories, out / "curves.png", cfg["name"])
    else:
        files.pop("curves")
    plot_dead(dead, out / "dead_units.png", f"{cfg['name']}: dead units per layer", primary_of=("converted",))
    report = result.report
    metrics = {
        "recipe": cfg["name"], "data": data.description,
        "accuracy": {"before_conversion": before["accuracy"], "after_conversion": after["accuracy"],
                     **{r["label"]: r["test_accuracy"] for r in tuned_rows}},
        "predictions_changed_by_conversion": differ,
        "train_loss": {"before_conversion": train_before["loss"], "after_conversion": train_after["loss"]},
        "conversion": {"status": report.status, "max_rel_error": report.max_rel_error,
                       "params_before": report.params_before, "params_after": report.params_after,
                       "linked": report.count(report.activations).get("linked", 0),
                       "batchnorm": report.count(report.batchnorm)},
        "finetune": tuned_rows, "timing": timing, "compact": compacted,
        "macs": {"original": report.macs_before, "converted": report.macs_after},
        "dead_units": {label: {"overall": overall_dead(rows), "layers": dead_rows(rows)}
                       for label, rows in dead.items()},
        "histories": histories, "files": files, "seconds": time.perf_counter() - started,
        **distributed.describe(),
    }
    write_json(out / "metrics.json", metrics)

    rows = [("BN model (before conversion)", before["accuracy"], train_before["loss"], overall_dead(dead_before)),
            ("converted, BN-free (right after)", after["accuracy"], train_after["loss"], overall_dead(dead_after))]
    rows += [(r["label"], r["test_accuracy"], r["train_loss_after"], overall_dead(dead[r["label"]]))
             for r in tuned_rows]
    console.print(table(f"{cfg['name']}: conversion {report.status}, max rel error {report.max_rel_error:.1e}, "
                        f"{differ} test predictions changed", ["model", "test acc", "train loss", "dead units"], rows))
    if compacted:
        console.print(table(f"compaction of '{tuned_rows[-1]['label']}' (MACs per sample; original "
                            f"{report.macs_before:,}, converted {report.macs_after:,})",
                            ["target", "test acc", "change", "MACs", "x original", "removed"],
                            [(c["target"], c["test_accuracy"], f"{c['accuracy_change']:+.4f}", f"{c['macs']:,}",
                              f"{c['macs_vs_original']:.2f}", ", ".join(f"{k} {v}" for k, v in c["removed"].items()))
                             for c in compacted]))
    if timing:
        s = timing["seconds_per_step"]
        console.print(table(f"train step at batch {timing['batch_size']} (median)", ["model", "ms / step"],
                            [("BN (batch statistics)", 1e3 * s["bn"]), ("BN-free, equal width", 1e3 * s["bn_free"]),
                             ("BN-free, linked", 1e3 * s["linked"]), ("BN / BN-free", timing["bn_over_bn_free"])]))
    console.print(f"outputs in {out}/: {', '.join(files.values())}")
    return metrics

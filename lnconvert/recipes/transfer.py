"""Transfer fine-tuning at small batch: converting against what users do today.

A BN ResNet is pretrained on a source domain (digits as they are) and fine-tuned on a
shifted target domain (the same kind of digits with intensities inverted, so the BN running
statistics no longer fit) from a small labelled set. Every arm starts from the same
pretrained weights and sees the same target batches (fixed by the seed), for the same number
of target samples at each batch size:

- ``no-finetune``: the pretrained model as it is (the floor);
- ``bn-train``: BN in train mode (batch statistics, running statistics updated);
- ``bn-frozen``: BN in eval mode (running statistics), affine trainable (timm's
  ``freeze_batch_norm_2d`` with a trainable affine, detectron2's default);
- ``groupnorm``: every BatchNorm2d replaced by ``GroupNorm(min(32, C), C)`` (Opacus's
  ``ModuleValidator.fix``: the pretrained statistics and affine are discarded);
- ``folded``: ``convert(link=False)`` (the frozen-BN function, BN folded into the convs);
- ``linked-mirror`` / ``linked-minmax`` / ``linked-mirror-gate``: ``convert`` with linked
  activations (twins zero), the last with ``residual="gate"``; twins get ``twin_lr``;
- ``linked-mirror-compact``: ``linked-mirror``, then compacted back to the original model's
  MACs (``compact(target_macs="1.0x")`` with the fine-tuning images as calibration data) before
  it is evaluated: what a user deploying at the original cost keeps of the fine-tuning;
- ``normprop`` / ``deep-control``: ``convert(norm=..., link=False)``.

Learning rates (and twin learning rates) are chosen per arm and batch size on a validation
split of the target training data, never on the test set.

Under ``torchrun`` the (arm, batch size) tasks run one after another, each fine-tuning data
parallel (:mod:`.distributed`: ``batch_sizes`` are global batches) with the same results as
one process, except ``bn-train``: its BatchNorm layers normalise with each rank's own rows
(DistributedDataParallel without SyncBatchNorm, which needs GPUs), so its result depends on
the number of processes and is stored apart from one-process results.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.utils.data import TensorDataset

from ..analysis import dead_units
from ..compact import compact
from ..convert import convert
from ..finetune import param_groups
from . import distributed
from .config import RecipeError, fingerprint
from .nets import DigitsResNet
from .output import _figure, _save, plot_bands, run_tasks, table, write_json
from .train import epoch_batches, evaluate, fit, make_optimizer

LINKED = {"linked-mirror": {"policy": "mirror"}, "linked-minmax": {"policy": "minmax"},
          "linked-mirror-gate": {"policy": "mirror", "residual": "gate"},
          "linked-mirror-compact": {"policy": "mirror"}}
COMPACTED = ("linked-mirror-compact",)  # evaluated after compaction to the original MACs
CONVERTED = {"folded": {"link": False}, "normprop": {"norm": "normprop", "link": False},
             "deep-control": {"norm": "deep-control", "link": False}, **LINKED}
BN_ARMS = ("bn-train", "bn-frozen", "groupnorm")
ARMS = ("no-finetune", *BN_ARMS, *CONVERTED)
PER_RANK_STATISTICS = ("bn-train",)  # under torchrun: normalised with each rank's rows, not the global batch


# --- data --------------------------------------------------------------------------------
def shift_inputs(x: torch.Tensor, shift: str) -> torch.Tensor:
    """The target domain from raw inputs in [0, 1]: ``invert`` (1 - x: white background, dark
    strokes), ``none`` (no shift, a control)."""
    if shift == "invert":
        return 1.0 - x
    if shift == "none":
        return x
    raise RecipeError(f"unknown shift {shift!r}; choose invert or none")


def transfer_data(cfg: dict[str, Any]) -> dict[str, TensorDataset]:
    """Disjoint stratified splits of scikit-learn's digits: ``source_train`` / ``source_test``
    (the source domain) and, from the other images, the shifted target domain's ``target_fit``
    (fine-tuning), ``target_val`` (hyper-parameter choice) and ``target_test`` (held out).
    All inputs are standardised with the source training set's mean and std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d, s = cfg["data"], cfg["split"]
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / float(d["scale"])
    y = torch.tensor(bunch.target, dtype=torch.long)
    if int(d["size"]) != 8:
        x = F.interpolate(x, size=(int(d["size"]),) * 2, mode="bilinear", align_corners=False)
    seed, idx = cfg["seed"], torch.arange(len(y)).numpy()

    def split(pool, size):
        return train_test_split(pool, test_size=size, stratify=y[pool].numpy(), random_state=seed)

    source, target = split(idx, s["target_fraction"])
    source_train, source_test = split(source, s["source_test"])
    target_rest, target_train = split(target, s["target_train"])
    target_fit, target_val = split(target_train, s["target_val"])
    target_test = target_rest[: s["target_test"]] if s["target_test"] else target_rest
    mean, std = x[source_train].mean(), x[source_train].std()

    def dataset(indices, shifted: bool) -> TensorDataset:
        inputs = shift_inputs(x[indices], cfg["shift"]) if shifted else x[indices]
        return TensorDataset((inputs - mean) / std, y[indices])

    return {"source_train": dataset(source_train, False), "source_test": dataset(source_test, False),
            "target_fit": dataset(target_fit, True), "target_val": dataset(target_val, True),
            "target_test": dataset(target_test, True)}


@torch.no_grad()
def bn_input_shift(model: nn.Module, source: TensorDataset, target: TensorDataset) -> list[dict[str, Any]]:
    """How far each BatchNorm's input statistics move from source to target, in units of its
    running std: per layer the channel mean of |mean_target - running_mean| / sqrt(running_var)
    and of the target-to-running variance ratio (1 and 0 mean the statistics still fit); the
    same on source data shows the baseline."""
    rows, stats = [], {}
    # training recipes act on torch's trainable BN (statistics, train/eval mode), not on conversion
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]

    def hook(name):
        def record(module, inputs, output):
            z = inputs[0].transpose(0, 1).flatten(1)
            stats[name] = (z.mean(1), z.var(1))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in bns]
    model.eval()
    measured = {}
    for domain, data in (("source", source), ("target", target)):
        model(data.tensors[0])
        measured[domain] = dict(stats)
    for handle in handles:
        handle.remove()
    for name, m in bns:
        std = (m.running_var + m.eps).sqrt()
        row = {"layer": name}
        for domain in ("source", "target"):
            mu, var = measured[domain][name]
            row[f"{domain}_mean_shift"] = float(((mu - m.running_mean).abs() / std).mean())
            row[f"{domain}_var_ratio"] = float((var / std ** 2).mean())
        rows.append(row)
    return rows


# --- arms --------------------------------------------------------------------------------
def dead_unit_count(model: nn.Module, data: TensorDataset) -> dict[str, int]:
    """ReLU units of ``model`` that output zero for every image of ``data`` (see
    :func:`lnconvert.analysis.dead_units`): the units linking can revive."""
    rows = dead_units(model, data.tensors[0].split(64))
    return {"dead": sum(r.dead for r in rows), "units": sum(r.units for r in rows)}


def to_groupnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by a fresh ``GroupNorm(min(32, C), C)`` (Opacus's fix), in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):  # the arm replaces trainable 2-D BNs only
                setattr(module, child_name, nn.GroupNorm(min(32, child.num_features), child.num_features))
    return model


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """BN layers to eval mode (running statistics used, not updated); their affine stays trainable."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):  # every trainable BN has a train mode
            module.eval()


def build_arm(arm: str, pretrained: nn.Module, example: torch.Tensor
              ) -> tuple[nn.Module, Callable[[nn.Module], None] | None]:
    """The arm's starting model (a fresh copy) and what to apply after ``model.train()``."""
    if arm in CONVERTED:
        return convert(pretrained, example_inputs=example, name=arm, **CONVERTED[arm]).model, None
    model = copy.deepcopy(pretrained)
    if arm == "groupnorm":
        return to_groupnorm(model), None
    return model, freeze_batchnorm_statistics if arm == "bn-frozen" else None


def optimizer_for(arm: str, model: nn.Module, name: str, lr: float, twin_lr: float | None
                  ) -> torch.optim.Optimizer:
    if arm in LINKED:
        groups = param_groups(model, base_lr=lr, twin_lr=lr if twin_lr is None else twin_lr)
        return make_optimizer(name, groups, lr, 0.0)
    return make_optimizer(name, model.parameters(), lr, 0.0)


def peak_step_bytes(model: nn.Module, after_train: Callable | None, x: torch.Tensor, y: torch.Tensor,
                    optimizer: torch.optim.Optimizer) -> int:
    """Peak CPU memory allocated by torch during one train step (forward, backward, update),
    above what was live before it: the running sum of the profiler's allocations and frees."""
    from torch.profiler import ProfilerActivity, profile

    model.train()
    if after_train:
        after_train(model)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:  # self allocations only: a parent's total already counts its children's
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return int(peak)


def finetune(arm: str, pretrained: nn.Module, data: dict[str, TensorDataset], batch_size: int, samples: int,
             lr: float, twin_lr: float | None, seed: int, cfg: dict[str, Any], eval_on: str,
             points: int, measure_memory: bool = False) -> dict[str, Any]:
    """Fine-tune one arm from the pretrained weights on ``samples`` target samples in the batch
    order of ``seed`` (new parameters are initialised from ``seed`` too); accuracy on
    ``eval_on`` at ``points`` evenly spaced sample counts (and at 0)."""
    torch.manual_seed(seed)
    example = data["target_val"].tensors[0][:8]
    model, after_train = build_arm(arm, pretrained, example)
    train = data["target_fit"]
    steps = samples // batch_size
    if steps < 1 or batch_size > len(train):
        raise RecipeError(f"transfer: batch size {batch_size} needs at least {batch_size} samples "
                          f"(samples {samples}, fine-tuning set {len(train)})")
    at = sorted({round(steps * k / points) for k in range(points + 1)})
    curve = [[0, evaluate(model, data[eval_on])["accuracy"]]] if arm != "no-finetune" else []
    result = {"arm": arm, "batch_size": batch_size, "seed": seed, "lr": lr, "twin_lr": twin_lr, "steps": 0,
              "samples_seen": 0, "ms_per_step": None, "peak_step_bytes": None}
    if arm != "no-finetune":
        optimizer = optimizer_for(arm, model, cfg["optimizer"], lr, twin_lr)
        trainer = distributed.wrap(model)  # the model itself in one process
        rows, weight = distributed.batch_part(batch_size)
        model.train()
        if after_train:
            after_train(model)
        step, seconds, losses, epoch = 0, 0.0, [], 0
        while step < steps:
            for x, y in epoch_batches(train, batch_size, seed, epoch, rows=rows):
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(trainer(x), y)
                if weight != 1.0:  # uneven shares of the global batch (see distributed.batch_part)
                    loss = loss * weight
                loss.backward()
                optimizer.step()
                seconds += time.perf_counter() - start
                losses.append(float(distributed.average(loss.detach())))  # the global batch's loss
                step += 1
                if step in at and step > 0:
                    curve.append([step * batch_size, evaluate(model, data[eval_on])["accuracy"]])
                    model.train()
                    if after_train:
                        after_train(model)
                if step == steps:
                    break
            epoch += 1
        distributed.sync_from_main(model)  # bn-train: running statistics of rank 0 on every rank
        x, y = next(epoch_batches(train, batch_size, seed, 0))  # the global batch: memory of one process
        result.update(steps=steps, samples_seen=steps * batch_size, ms_per_step=1e3 * seconds / steps,
                      final_train_loss=statistics.fmean(losses[-max(1, steps // 10):]),
                      finite=all(v == v and abs(v) != float("inf") for v in losses))
        if measure_memory:
            result["peak_step_bytes"] = peak_step_bytes(copy.deepcopy(model), after_train, x, y,
                                                        optimizer_for(arm, copy.deepcopy(model), cfg["optimizer"],
                                                                      lr, twin_lr))
        if arm in COMPACTED:
            model, result["compaction"] = compact_to_original(model, train)
    final = evaluate(model, data[eval_on])
    result.update({f"{eval_on.removeprefix('target_')}_accuracy": final["accuracy"],
                   f"{eval_on.removeprefix('target_')}_loss": final["loss"], "curve": curve})
    return result


def compact_to_original(model: nn.Module, train: TensorDataset) -> tuple[nn.Module, dict[str, Any]]:
    """The fine-tuned linked model compacted to the original model's MACs, calibrated on the
    fine-tuning images; what was removed and the MAC ratio reached."""
    compacted = compact(model, data=train.tensors[0].split(32), target_macs="1.0x")
    report = compacted.report
    return compacted.model, {"removed": dict(report.removed), "macs_ratio": report.macs_after / report.macs_original,
                             "max_rel_deviation": report.max_rel_deviation}


def _grid(arm: str, cfg: dict[str, Any]) -> list[tuple[float, float | None]]:
    if arm == "no-finetune":
        return [(0.0, None)]
    lrs = [float(v) for v in cfg["lr_grid"]]
    if arm in LINKED:
        return [(lr, lr * float(f)) for lr in lrs for f in cfg["twin_lr_factors"]]
    return [(lr, None) for lr in lrs]


def task_key(cfg: dict[str, Any], arm: str, batch_size: int) -> str:
    """Everything one (arm, batch size) result depends on (not ``arms``, ``batch_sizes``, ``jobs``;
    the number of processes only for ``bn-train``, whose batch statistics are per rank)."""
    keys = ("data", "shift", "split", "model", "pretrain", "seed", "samples", "curve_points", "optimizer", "lr_grid",
            "twin_lr_factors", "seeds", "selection_seed")
    world_size = distributed.current().world_size
    per_rank = {"world_size": world_size} if arm in PER_RANK_STATISTICS and world_size > 1 else {}
    return fingerprint({**{k: cfg[k] for k in keys}, **per_rank}, arm, batch_size)


def run_arm(cfg: dict[str, Any], arm: str, batch_size: int, pretrained_path: Path, resume: bool = True
            ) -> dict[str, Any]:
    """One task: choose (lr, twin_lr) for ``arm`` at ``batch_size`` on the validation split
    (selection seed), then fine-tune with every seed and test on the held-out target test set.
    The result is kept in ``checkpoints/`` next to the pretrained model; with ``resume`` a
    result of the same configuration is reused."""
    import json

    from ..files import atomic_path

    previous = distributed.from_main(lambda: cached_result(cfg, arm, batch_size, pretrained_path) if resume else None)
    if previous is not None:
        return previous
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    data = transfer_data(cfg)
    pretrained = pretrained_model(cfg)
    # rank 0 wrote it; the other ranks may be on machines without it
    pretrained.load_state_dict(distributed.from_main(
        lambda: torch.load(pretrained_path, map_location="cpu", weights_only=True)["model"]))
    pretrained.eval()
    samples, points = int(cfg["samples"]), int(cfg["curve_points"])
    candidates = [finetune(arm, pretrained, data, batch_size, samples, lr, twin_lr, cfg["selection_seed"], cfg,
                           "target_val", 1) for lr, twin_lr in _grid(arm, cfg)]
    # highest validation accuracy; ties go to the lower validation loss
    best = max(candidates, key=lambda r: (r["val_accuracy"], -r["val_loss"] if r["val_loss"] == r["val_loss"]
                                          else float("-inf")))
    runs = [finetune(arm, pretrained, data, batch_size, samples, best["lr"], best["twin_lr"], seed, cfg,
                     "target_test", points, measure_memory=i == 0) for i, seed in enumerate(cfg["seeds"])]
    memory = runs[0]["peak_step_bytes"]
    for run in runs:
        run["peak_step_bytes"] = memory  # one deterministic measurement per arm and batch size
    result = {"arm": arm, "batch_size": batch_size, "runs": runs,
              "selection": [{"lr": c["lr"], "twin_lr": c["twin_lr"], "val_accuracy": c["val_accuracy"],
                             "val_loss": c["val_loss"]} for c in candidates]}
    if distributed.is_main():
        with atomic_path(_cache_path(arm, batch_size, pretrained_path)) as tmp:
            Path(tmp).write_text(json.dumps({"fingerprint": task_key(cfg, arm, batch_size), "result": result}))
    return result


def _cache_path(arm: str, batch_size: int, pretrained_path: Path) -> Path:
    return pretrained_path.parent / f"{arm}-bs{batch_size}.json"


def cached_result(cfg: dict[str, Any], arm: str, batch_size: int, pretrained_path: Path) -> dict[str, Any] | None:
    """The stored result of this (arm, batch size) under the same configuration, else None."""
    import json

    path = _cache_path(arm, batch_size, pretrained_path)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["result"] if saved.get("fingerprint") == task_key(cfg, arm, batch_size) else None


def pretrained_model(cfg: dict[str, Any]) -> nn.Module:
    m = cfg["model"]
    return DigitsResNet(1, 10, m["widths"], m["blocks"])


# --- the pipeline ------------------------------------------------------------------------
def _check(cfg: dict[str, Any]) -> None:
    unknown = [a for a in cfg["arms"] if a not in ARMS]
    if unknown:
        raise RecipeError(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    if not isinstance(cfg["jobs"], int) or cfg["jobs"] < 1:
        raise RecipeError(f"jobs must be a positive integer, got {cfg['jobs']!r}")
    if cfg["jobs"] > 1 and distributed.current().active:
        raise RecipeError(f"jobs {cfg['jobs']} cannot be combined with torchrun (each task is already data "
                          f"parallel): use jobs 1, or run without torchrun")
    if not cfg["seeds"] or not all(isinstance(s, int) for s in cfg["seeds"]):
        raise RecipeError(f"seeds must be a non-empty list of integers, got {cfg['seeds']!r}")


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for arm, batch_size in dict.fromkeys((r["arm"], r["batch_size"]) for r in runs):
        mine = sorted((r for r in runs if r["arm"] == arm and r["batch_size"] == batch_size), key=lambda r: r["seed"])
        accs = [r["test_accuracy"] for r in mine]
        rows.append({"arm": arm, "batch_size": batch_size, "seeds": len(mine), "mean": statistics.fmean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "per_seed": {r["seed"]: r["test_accuracy"] for r in mine},
                     "lr": mine[0]["lr"], "twin_lr": mine[0]["twin_lr"],
                     "ms_per_step": statistics.median(r["ms_per_step"] for r in mine) if mine[0]["steps"] else None,
                     "peak_step_bytes": mine[0]["peak_step_bytes"]})
    return rows


@distributed.main_only
def plot_transfer(runs: list[dict[str, Any]], batch_sizes: list[int], path: Path, title: str) -> None:
    """Target test accuracy vs target samples seen, one panel per batch size: mean over seeds,
    band min..max; the no-finetune floor as a dotted line."""
    plt, fig, axes = _figure(len(batch_sizes), width=5.2)
    for ax, batch_size in zip(axes, batch_sizes):
        mine = [r for r in runs if r["batch_size"] == batch_size]
        for arm in dict.fromkeys(r["arm"] for r in mine):
            seeds = [r for r in mine if r["arm"] == arm]
            if arm == "no-finetune":
                ax.axhline(statistics.fmean(r["test_accuracy"] for r in seeds), color="grey", linestyle=":",
                           label="no-finetune")
                continue
            xs = [point[0] for point in seeds[0]["curve"]]
            plot_bands(ax, xs, [[point[1] for point in r["curve"]] for r in seeds], arm)
        ax.set(xlabel="target samples seen", ylabel="target test accuracy", title=f"{title}: batch {batch_size}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    _save(plt, fig, path)


@distributed.data_parallel
def transfer(cfg: dict[str, Any], out: Path, resume: bool, console: Console) -> dict[str, Any]:
    """Pretrain on the source domain, measure how far the BN statistics move on the target
    domain, then fine-tune every arm at every batch size (``jobs`` (arm, batch size) tasks at a
    time); per-seed target test accuracies, chosen hyper-parameters, ms per step, memory."""
    started = time.perf_counter()
    _check(cfg)
    data = transfer_data(cfg)
    torch.manual_seed(cfg["seed"])  # the pretrained model's initialisation and everything after it
    model = pretrained_model(cfg)
    console.print(f"[bold]{cfg['name']}[/bold]: source digits {len(data['source_train'])}+"
                  f"{len(data['source_test'])}; target ({cfg['shift']}) fit {len(data['target_fit'])}, val "
                  f"{len(data['target_val'])}, test {len(data['target_test'])}; {len(cfg['arms'])} arms x "
                  f"batch {cfg['batch_sizes']} x {len(cfg['seeds'])} seeds, {cfg['samples']} samples each")
    pre, path = cfg["pretrain"], out / "checkpoints" / "pretrain.pt"
    opt = make_optimizer(pre["optimizer"], model.parameters(), pre["lr"], pre["weight_decay"])
    fit(model, opt, data["source_train"], batch_size=pre["batch_size"], epochs=pre["epochs"],
        max_steps=pre["max_steps"], seed=cfg["seed"], checkpoint=path,
        fingerprint=fingerprint(cfg["data"], cfg["split"], cfg["model"], pre, cfg["seed"]), resume=resume,
        checkpoint_every=cfg["checkpoint_every"])
    model.eval()
    source_acc = evaluate(model, data["source_test"])["accuracy"]
    shift = bn_input_shift(model, data["source_test"], data["target_test"])
    dead = {split: dead_unit_count(model, data[split]) for split in ("source_test", "target_fit")}
    console.print(f"pretrained: source test acc {source_acc:.4f}, target test acc (no fine-tuning) "
                  f"{evaluate(model, data['target_test'])['accuracy']:.4f}; first BN input mean shift "
                  f"{shift[0]['target_mean_shift']:.2f} running std (source {shift[0]['source_mean_shift']:.2f}); "
                  f"dead ReLU units on target data {dead['target_fit']['dead']} of {dead['target_fit']['units']}")

    tasks = [(arm, bs) for bs in cfg["batch_sizes"] for arm in cfg["arms"]]
    results: list[dict[str, Any]] = []
    limit = cfg["time_limit_minutes"]
    deadline = None if limit is None else started + 60.0 * float(limit)

    def in_time() -> bool:  # rank 0's clock decides for every rank, so all run the same tasks
        return distributed.from_main(lambda: deadline is None or time.perf_counter() < deadline)

    def done(result: dict[str, Any]) -> None:
        results.append(result)
        accs = [r["test_accuracy"] for r in result["runs"]]
        best = result["runs"][0]
        console.print(f"  {result['arm']:<18} batch {result['batch_size']:>2}: test acc "
                      f"{statistics.fmean(accs):.4f} +- {statistics.stdev(accs) if len(accs) > 1 else 0:.4f} "
                      f"(lr {best['lr']:g}, twin_lr {best['twin_lr']}) ({len(results)}/{len(tasks)})")

    # stored results first (they cost nothing and do not count against the time limit)
    stored = distributed.from_main(lambda: {task: cached_result(cfg, *task, path) if resume else None
                                            for task in tasks})
    for result in stored.values():
        if result is not None:
            done(result)
    todo = [task for task, result in stored.items() if result is None]
    run_tasks(todo, cfg["jobs"], lambda arm, bs: (run_arm, cfg, arm, bs, path, resume), done, in_time,
              start_first=not results)  # with stored results a passed time limit starts nothing new
    not_run = [{"arm": a, "batch_size": b} for a, b in tasks if not any(r["arm"] == a and r["batch_size"] == b
                                                                        for r in results)]
    order = {task: i for i, task in enumerate(tasks)}
    results.sort(key=lambda r: order[(r["arm"], r["batch_size"])])
    runs = [run for result in results for run in result["runs"]]
    summary = summarise(runs)
    plot_transfer(runs, cfg["batch_sizes"], out / "transfer.png", cfg["name"])
    metrics = {"recipe": cfg["name"], "shift": cfg["shift"], "samples_per_run": cfg["samples"],
               "sizes": {k: len(v) for k, v in data.items()}, "source_test_accuracy": source_acc,
               "bn_input_shift": shift, "pretrained_dead_units": dead, "threads": cfg["threads"],
               "torch": torch.__version__,
               "summary": summary, "selection": [{"arm": r["arm"], "batch_size": r["batch_size"],
                                                  "grid": r["selection"]} for r in results],
               "runs": runs, "not_run": not_run, "time_limit_minutes": limit, **distributed.describe(),
               "per_rank_statistics": [a for a in cfg["arms"] if a in PER_RANK_STATISTICS]
               if distributed.current().active else [],
               "files": {"metrics": "metrics.json", "plot": "transfer.png"},
               "seconds": time.perf_counter() - started}
    write_json(out / "metrics.json", metrics)
    console.print(table(f"{cfg['name']}: target test accuracy over {len(cfg['seeds'])} seeds "
                        f"({cfg['samples']} target samples seen)",
                        ["arm", "batch", "mean", "std", "lr", "twin lr", "ms/step", "per seed"],
                        [(r["arm"], r["batch_size"], r["mean"], r["std"], f"{r['lr']:g}",
                          "-" if r["twin_lr"] is None else f"{r['twin_lr']:g}",
                          "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.1f}",
                          " ".join(f"{a:.3f}" for a in r["per_seed"].values())) for r in summary]))
    if not_run:
        console.print(f"not run (time_limit_minutes {limit}): " + ", ".join(f"{r['arm']} batch {r['batch_size']}"
                                                                           for r in not_run))
    console.print(f"outputs in {out}/: metrics.json, transfer.png")
    return metrics

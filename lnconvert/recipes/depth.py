"""The depth experiment (Linked Neurons, section 4): the plain deep net per variant and seed.

Every (variant, seed) pair is one independent task with its own checkpoint, so tasks run as
parallel processes (``jobs``) and an interrupted run resumes where each task stopped. The
train/test split is fixed by the recipe's ``seed``; a run seed changes the initialisation
and the batch order, and run seed = recipe seed reproduces a single-seed run.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..analysis import dead_units
from .config import RecipeError, fingerprint
from .data import Data, build_data
from .nets import VARIANTS, plain_deep_net
from .output import dead_rows, overall_dead, plot_depth, run_tasks, table, write_json
from .train import evaluate, fit, make_optimizer, ordered_batches

PAPER_CIFAR10 = {"relu": 0.10, "prelu": 0.10, "silu": 0.10, "linked_relu": 0.567, "linked_selu": 0.588,
                 "selu": 0.565, "relu_bn": 0.520}
TRAINS = 0.5  # a seed "trains" when its final test accuracy exceeds this (chance is 0.10)


def _input_stats(data: Data) -> tuple[float, float]:
    """Mean and std of the training inputs: NormProp standardises its input once with them."""
    inputs = torch.cat([x for x, _ in ordered_batches(data.train, 256)])
    return float(inputs.mean()), float(inputs.std())


def run_seeds(cfg: dict[str, Any]) -> list[int]:
    """The run seeds: ``seeds`` when given, else the recipe's ``seed`` alone."""
    seeds = cfg["seeds"] if cfg["seeds"] is not None else [cfg["seed"]]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise RecipeError(f"seeds must be a non-empty list of non-negative integers, got {seeds!r}")
    return seeds


def variant_epochs(cfg: dict[str, Any], variant: str) -> int:
    """``variant_epochs[variant]`` when set (longer runs for the variants that train), else ``train.epochs``."""
    return int(cfg["variant_epochs"].get(variant, cfg["train"]["epochs"]))


def train_variant(cfg: dict[str, Any], variant: str, seed: int, out: Path, resume: bool) -> dict[str, Any]:
    """One task: train ``variant`` from ``seed`` (init and batch order); its flat result row."""
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))  # worker processes do not inherit the setting
    data = build_data(cfg["data"], cfg["seed"])  # one split for every seed
    m, train = cfg["model"], {**cfg["train"], "epochs": variant_epochs(cfg, variant)}
    input_stats = _input_stats(data) if VARIANTS[variant][1] == "normprop" else (0.0, 1.0)
    torch.manual_seed(seed)
    net = plain_deep_net(variant, m["depth"], m["width"], data.input_shape[0], data.num_classes,
                         data.input_shape[-1], m["stem_kernel"], m["stem_stride"], input_stats)
    opt = make_optimizer(train["optimizer"], net.parameters(), train["lr"], train["weight_decay"])
    key = fingerprint(cfg["data"], m, train, variant, seed, cfg["amp"])
    # seed == recipe seed keeps the single-seed checkpoint name (resumes runs made before seeds existed)
    name = variant if seed == cfg["seed"] else f"{variant}-seed{seed}"
    history = fit(net, opt, data.train, batch_size=train["batch_size"], epochs=train["epochs"],
                  max_steps=train["max_steps"], seed=seed, checkpoint=out / "checkpoints" / f"{name}.pt",
                  fingerprint=key, resume=resume, checkpoint_every=cfg["checkpoint_every"],
                  on_epoch=lambda model: {"test_accuracy": evaluate(model, data.test)["accuracy"]}, amp=cfg["amp"])
    test, fit_train = evaluate(net, data.test), evaluate(net, data.train)
    dead = dead_units(net, ordered_batches(data.train, 256), max_batches=cfg["dead_units"]["max_batches"])
    return {"variant": variant, "seed": seed, "epochs": train["epochs"], "test_accuracy": test["accuracy"],
            "train_loss": fit_train["loss"], "trains": test["accuracy"] > TRAINS,
            "dead_fraction": overall_dead(dead), "dead_layers": sum(r.fraction == 1.0 for r in dead),
            "layers": len(dead), "ms_per_step": 1e3 * history["seconds"] / max(1, len(history["step_loss"])),
            "test_accuracy_per_epoch": [r["test_accuracy"] for r in history["epochs"]],
            "train_loss_per_epoch": [r["train_loss"] for r in history["epochs"]],
            "dead_units": dead_rows(dead)}


def summarise(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Per variant: mean and sample std of the final test accuracy over seeds, the fraction of
    seeds that train, and every per-seed number."""
    rows = []
    for variant in variants:
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        accs = [r["test_accuracy"] for r in mine]
        rows.append({"variant": variant, "epochs": sorted({r["epochs"] for r in mine}), "seeds": len(mine),
                     "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "trained_fraction": sum(r["trains"] for r in mine) / len(mine),
                     "per_seed": {r["seed"]: r["test_accuracy"] for r in mine},
                     "dead_fraction_mean": statistics.fmean(r["dead_fraction"] for r in mine),
                     "paper_cifar10": PAPER_CIFAR10.get(variant)})
    return rows


def depth(cfg: dict[str, Any], out: Path, resume: bool, console: Console) -> dict[str, Any]:
    """Train the plain deep net per variant and seed (``jobs`` tasks at a time); final test
    accuracy per run, mean / std / fraction that trains per variant, and a band plot."""
    started = time.perf_counter()
    unknown = [v for v in [*cfg["variants"], *cfg["variant_epochs"]] if v not in VARIANTS]
    if unknown:
        raise RecipeError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    jobs = cfg["jobs"]
    if not isinstance(jobs, int) or jobs < 1:
        raise RecipeError(f"jobs must be a positive integer, got {jobs!r}")
    seeds = run_seeds(cfg)
    data = build_data(cfg["data"], cfg["seed"])
    m = cfg["model"]
    console.print(f"[bold]{cfg['name']}[/bold]: {data.description}; {m['depth']} 3x3 convs of {m['width']} "
                  f"filters after a {m['stem_kernel']}x{m['stem_kernel']}/{m['stem_stride']} stem; "
                  f"{len(cfg['variants'])} variants x {len(seeds)} seeds, {jobs} process(es)")
    # variant-major, in the order listed: list first what matters most when time_limit_minutes may stop the run
    tasks = [(variant, seed) for variant in cfg["variants"] for seed in seeds]
    runs: list[dict[str, Any]] = []
    limit = cfg["time_limit_minutes"]
    deadline = None if limit is None else started + 60.0 * float(limit)

    def in_time() -> bool:
        return deadline is None or time.perf_counter() < deadline

    def done(row: dict[str, Any]) -> None:
        runs.append(row)
        console.print(f"  {row['variant']:<13} seed {row['seed']}: test acc {row['test_accuracy']:.4f} "
                      f"after {row['epochs']} epochs ({len(runs)}/{len(tasks)})")

    run_tasks(tasks, jobs, lambda variant, seed: (train_variant, cfg, variant, seed, out, resume), done, in_time)
    finished = {(r["variant"], r["seed"]) for r in runs}
    not_run = [{"variant": v, "seed": s} for v, s in tasks if (v, s) not in finished]
    order = {task: i for i, task in enumerate(tasks)}
    runs.sort(key=lambda r: order[(r["variant"], r["seed"])])
    summary = summarise(runs, [v for v in cfg["variants"] if any(r["variant"] == v for r in runs)])
    plot_depth(runs, out / "depth.png", cfg["name"], TRAINS)
    metrics = {"recipe": cfg["name"], "data": data.description, "split_seed": cfg["seed"], "seeds": seeds,
               "trains_threshold": TRAINS, "threads": cfg["threads"], "torch": torch.__version__,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "summary": summary, "runs": runs,
               "not_run": not_run, "time_limit_minutes": limit,
               "files": {"metrics": "metrics.json", "plot": "depth.png"}, "seconds": time.perf_counter() - started}
    write_json(out / "metrics.json", metrics)
    console.print(table(f"{cfg['name']}: final test accuracy over {len(seeds)} seed(s) (chance 0.10)",
                        ["variant", "epochs", "mean", "std", "trains", "per seed", "paper CIFAR-10"],
                        [(r["variant"], ",".join(map(str, r["epochs"])), r["mean"], r["std"],
                          f"{r['trained_fraction']:.0%}", " ".join(f"{a:.3f}" for a in r["per_seed"].values()),
                          "-" if r["paper_cifar10"] is None else r["paper_cifar10"]) for r in summary]))
    if not_run:
        console.print(f"not run (time_limit_minutes {limit}): " + ", ".join(f"{r['variant']} seed {r['seed']}"
                                                                           for r in not_run))
    console.print(f"outputs in {out}/: metrics.json, depth.png")
    return metrics

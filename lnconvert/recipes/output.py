"""Recipe outputs: metrics JSON, PNG plots (matplotlib Agg), rich tables and progress.

In a multi-process run only rank 0 writes files (the other ranks hold the same results)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..analysis import DeadUnits
from ..files import atomic_path
from .distributed import main_only


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=console, transient=False)


def run_tasks(tasks: Sequence[tuple], jobs: int, call: Callable[..., tuple], done: Callable[[Any], None],
              in_time: Callable[[], bool], start_first: bool = True) -> None:
    """Run ``call(*task)`` (a function and its arguments) for each task, ``jobs`` processes at a
    time (spawned; 1: in this process), handing each result to ``done`` as it finishes. A task
    starts only while ``in_time()``, except (with ``start_first``) the first ``jobs``; a started
    task always finishes."""
    if not start_first and not in_time():
        return
    if jobs == 1:
        for i, task in enumerate(tasks):
            if i == 0 or in_time():
                function, *args = call(*task)
                done(function(*args))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = list(tasks)
        running = set()
        while pending and len(running) < jobs:
            function, *args = call(*pending.pop(0))
            running.add(pool.submit(function, *args))
        while running:
            future = next(as_completed(running))
            running.remove(future)
            done(future.result())
            if pending and in_time():
                function, *args = call(*pending.pop(0))
                running.add(pool.submit(function, *args))


@main_only
def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, default=str))


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    out = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        out.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        out.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    return out


def dead_rows(rows: list[DeadUnits]) -> list[dict[str, Any]]:
    return [{"layer": r.layer, "kind": r.kind, "units": r.units, "dead": r.dead, "primary_dead": r.primary_dead,
             "fraction": r.fraction} for r in rows]


def overall_dead(rows: list[DeadUnits]) -> float:
    """Dead units over all layers together (each unit counts once)."""
    units = sum(r.units for r in rows)
    return sum(r.dead for r in rows) / units if units else 0.0


def _figure(ncols: int, width: float = 6.0):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4.2))
    return plt, fig, list(axes) if ncols > 1 else [axes]


def _smooth(values: list[float], points: int = 200) -> tuple[list[float], list[float]]:
    """Mean loss over windows, so a batch-size-1 curve stays readable."""
    window = max(1, len(values) // points)
    xs, ys = [], []
    for i in range(0, len(values), window):
        chunk = values[i:i + window]
        xs.append(i + len(chunk) / 2)
        ys.append(sum(chunk) / len(chunk))
    return xs, ys


@main_only
def plot_curves(histories: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Training loss per step (window-averaged, x = samples seen) and test accuracy per epoch."""
    plt, fig, (loss_ax, acc_ax) = _figure(2)
    for label, history in histories.items():
        xs, ys = _smooth(history["step_loss"])
        loss_ax.plot([x * history["batch_size"] for x in xs], ys, label=label)
        epochs = [r for r in history["epochs"] if "test_accuracy" in r]
        acc_ax.plot([r["epoch"] for r in epochs], [r["test_accuracy"] for r in epochs], marker="o", label=label)
    loss_ax.set(xlabel="training samples seen", ylabel="train loss (window mean)", yscale="log", title=title)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(plt, fig, path)


@main_only
def plot_dead(dead: dict[str, list[DeadUnits]], path: Path, title: str, primary_of: Sequence[str] = ()) -> None:
    """Dead-unit fraction per activation layer for each model; for models named in
    ``primary_of`` also the primary half alone (what the original's units do)."""
    plt, fig, (ax,) = _figure(1, width=9.0)
    for label, rows in dead.items():
        ax.plot(range(len(rows)), [r.fraction for r in rows], marker=".", label=label)
        if label in primary_of:
            ax.plot(range(len(rows)), [r.primary_fraction for r in rows], linestyle="--", label=f"{label}: primaries")
    ax.set(xlabel="activation layer (input to output)", ylabel="dead-unit fraction", ylim=(-0.03, 1.03), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_bands(ax: Any, xs: Sequence[float], curves: Sequence[Sequence[float]], label: str) -> None:
    """Mean over seeds as a line, min..max over seeds as a shaded band (curves of equal length)."""
    columns = list(zip(*curves))
    mean = [sum(c) / len(c) for c in columns]
    line, = ax.plot(xs, mean, marker=".", label=f"{label} (n={len(curves)})")
    ax.fill_between(xs, [min(c) for c in columns], [max(c) for c in columns], color=line.get_color(), alpha=0.2)


@main_only
def plot_depth(runs: list[dict[str, Any]], path: Path, title: str, threshold: float) -> None:
    """Depth experiment, one figure: test accuracy per epoch per variant (mean over seeds, band
    min..max) and the final accuracy of every seed."""
    plt, fig, (acc_ax, seed_ax) = _figure(2)
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    for i, variant in enumerate(variants):
        mine = [r["test_accuracy_per_epoch"] for r in runs if r["variant"] == variant]
        n = min(len(c) for c in mine)
        plot_bands(acc_ax, range(1, n + 1), [c[:n] for c in mine], variant)
        finals = [r["test_accuracy"] for r in runs if r["variant"] == variant]
        seed_ax.scatter([i] * len(finals), finals, alpha=0.7)
    for ax in (acc_ax, seed_ax):
        ax.axhline(0.1, color="grey", linestyle=":", label="chance")
    seed_ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8, label=f"trains (> {threshold:g})")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", title=f"{title}: mean and min..max over seeds")
    seed_ax.set(ylabel="final test accuracy", title="every seed", ylim=(-0.03, 1.03))
    seed_ax.set_xticks(range(len(variants)), variants, rotation=45, ha="right", fontsize=8)
    for ax in (acc_ax, seed_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

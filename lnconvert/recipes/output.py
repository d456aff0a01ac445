"""Recipe outputs: metrics JSON, PNG plots (matplotlib Agg), rich tables and progress.

In a multi-process run only rank 0 writes files (the other ranks hold the same results)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..analysis import DeadUnits
from ..io import atomic_path
from .distributed import main_only


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=console, transient=False)


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


@main_only
def plot_depth(histories: dict[str, dict[str, Any]], dead: dict[str, list[DeadUnits]], path: Path, title: str) -> None:
    """Depth experiment, one figure: test accuracy per epoch and dead units per layer, per variant."""
    plt, fig, (acc_ax, dead_ax) = _figure(2)
    for variant, history in histories.items():
        epochs = history["epochs"]
        acc_ax.plot([r["epoch"] for r in epochs], [r["test_accuracy"] for r in epochs], marker=".", label=variant)
        dead_ax.plot(range(len(dead[variant])), [r.fraction for r in dead[variant]], label=variant)
    acc_ax.axhline(0.1, color="grey", linestyle=":", label="chance")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", title=f"{title}: test accuracy")
    dead_ax.set(xlabel="activation layer (stem = 0)", ylabel="dead-unit fraction", ylim=(-0.03, 1.03),
                title="dead units per layer (after training)")
    for ax in (acc_ax, dead_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

"""Training loop with resumable checkpoints, evaluation and train-step timing."""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..files import atomic_path
from . import distributed
from .config import RecipeError


def autocast(amp: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CPU for ``amp: bf16`` (float16 autocast is a GPU feature)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int, start: int = 0,
                  rows: slice = slice(None)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of one epoch in a shuffled order fixed by (seed, epoch), from batch ``start``
    on, incomplete last batch dropped: a resumed run sees exactly the batches it missed.

    ``rows`` picks this process's rows of every batch (:func:`distributed.batch_part`); only
    those samples are loaded."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    order = order[: len(dataset) // batch_size * batch_size][start * batch_size:]
    batches = [idx[rows] for idx in order.split(batch_size)]
    if isinstance(dataset, TensorDataset):  # in memory: index directly, no per-sample calls
        for idx in batches:
            yield dataset.tensors[0][idx], dataset.tensors[1][idx]
    else:
        yield from DataLoader(dataset, batch_sampler=[idx.tolist() for idx in batches])


def ordered_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(dataset, TensorDataset):
        for i in range(0, len(dataset), batch_size):
            yield dataset.tensors[0][i:i + batch_size], dataset.tensors[1][i:i + batch_size]
    else:
        yield from DataLoader(dataset, batch_size=batch_size)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, amp: str = "none"
             ) -> dict[str, Any]:
    """Mean cross-entropy, accuracy and predictions over ``dataset`` in eval mode."""
    training = model.training
    model.eval()
    losses, preds, labels = [], [], []
    try:
        for x, y in ordered_batches(dataset, batch_size):
            with autocast(amp):
                logits = model(x)
            losses.append(F.cross_entropy(logits.float(), y, reduction="sum"))
            preds.append(logits.argmax(1))
            labels.append(y)
    finally:
        model.train(training)
    pred, label = torch.cat(preds), torch.cat(labels)
    return {"loss": float(torch.stack(losses).sum()) / len(label), "accuracy": float((pred == label).float().mean()),
            "predictions": pred}


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise RecipeError(f"unknown optimizer {name!r}; choose adam, adamw or sgd")


def total_steps(dataset: Dataset, batch_size: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, total steps) with incomplete batches dropped."""
    per_epoch = len(dataset) // batch_size
    if per_epoch == 0:
        raise RecipeError(f"batch_size {batch_size} is larger than the training set ({len(dataset)} samples)")
    total = per_epoch * epochs
    return per_epoch, total if max_steps is None else min(total, int(max_steps))


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, train: Dataset, *, batch_size: int, epochs: int,
        seed: int, checkpoint: Path, fingerprint: str, resume: bool = True, max_steps: int | None = None,
        checkpoint_every: int = 500, on_epoch: Callable[[nn.Module], dict[str, float]] | None = None,
        amp: str = "none", compile: bool = False, progress: Any = None, label: str = "train") -> dict[str, Any]:
    """Train ``model`` in train mode; returns the history (per-step loss, per-epoch metrics).

    Checkpoints (model, optimiser, step, history) are written atomically every
    ``checkpoint_every`` steps and at the end; with ``resume`` an existing checkpoint of the
    same ``fingerprint`` continues where it stopped (a finished one only restores).

    Under torchrun (:mod:`.distributed`) ``batch_size`` is the global batch: each rank trains
    on its rows of every batch in DistributedDataParallel, rank 0 reads and writes the
    checkpoint, and the step losses are those of the global batch.
    """
    per_epoch, total = total_steps(train, batch_size, epochs, max_steps)
    history: dict[str, Any] = {"step_loss": [], "epochs": [], "seconds": 0.0, "steps": total,
                               "batch_size": batch_size}
    step = 0
    state = distributed.from_main(lambda: _read_checkpoint(checkpoint, fingerprint) if resume else None)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        # a row written where an earlier run stopped mid-epoch (max_steps) is redone at the real epoch end
        history["epochs"] = [r for r in history["epochs"] if r["step"] % per_epoch == 0 or r["step"] == total]
        history["steps"] = total
    trainer = distributed.wrap(model)
    runner = torch.compile(trainer) if compile else trainer
    rows, weight = distributed.batch_part(batch_size)

    def save() -> None:
        if not distributed.is_main():
            return
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(checkpoint) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "history": history, "fingerprint": fingerprint}, tmp)

    task = progress.add_task(label, total=total, completed=step, loss=float("nan")) if progress else None
    model.train()
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        for x, y in epoch_batches(train, batch_size, seed, epoch, offset, rows):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast(amp):
                loss = F.cross_entropy(runner(x).float(), y)
            if weight != 1.0:  # uneven shares of the global batch (see distributed.batch_part)
                loss = loss * weight
            loss.backward()
            optimizer.step()
            value = float(distributed.average(loss.detach()))
            history["seconds"] += time.perf_counter() - start
            history["step_loss"].append(value)
            step += 1
            if task is not None:
                progress.update(task, completed=step, loss=value)
            end_of_epoch = step % per_epoch == 0 or step == total
            if end_of_epoch:
                recent = history["step_loss"][-(step - epoch * per_epoch):]
                row = {"epoch": epoch + 1, "step": step, "train_loss": sum(recent) / len(recent)}
                row.update(on_epoch(model) if on_epoch else {})
                history["epochs"].append(row)
                model.train()
            if end_of_epoch or step % checkpoint_every == 0:
                save()
            if step == total:
                break
    if task is not None:
        progress.update(task, completed=total)
    distributed.sync_from_main(model)
    return history


def _read_checkpoint(checkpoint: Path, fingerprint: str) -> dict[str, Any] | None:
    if not checkpoint.is_file():
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise RecipeError(f"{checkpoint} was written by a different recipe configuration; "
                          f"rerun with --fresh or another --out")
    return state


def time_train_steps(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int = 10,
                     repeats: int = 5) -> dict[str, float]:
    """Median seconds per SGD train step (forward, backward, update) of each model on one batch.

    Models are timed on private copies in train mode, interleaved per repeat so that load
    from other processes hits them alike."""
    copies = {name: copy.deepcopy(m).train() for name, m in models.items()}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-4) for name, m in copies.items()}
    samples: dict[str, list[float]] = {name: [] for name in copies}

    def run(name: str, n: int) -> float:
        model, opt = copies[name], optimizers[name]
        start = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return (time.perf_counter() - start) / n

    for name in copies:
        run(name, 2)  # warm-up: allocator, first-call dispatch
    for _ in range(repeats):
        for name in copies:
            samples[name].append(run(name, steps))
    return {name: statistics.median(values) for name, values in samples.items()}

"""Data-parallel recipe runs under ``torchrun`` (``torch.distributed`` + DistributedDataParallel).

One process per rank runs the whole pipeline; only training is split. The semantics, chosen
so that a recipe computes the same thing on any number of processes:

- ``batch_size`` in a recipe is the **global** batch. Every rank walks the same fixed-order
  batches (:func:`lnconvert.recipes.train.epoch_batches`) and takes its contiguous share of
  the rows of each (:func:`batch_part`); DDP averages the gradients. Each rank's mean loss is
  weighted by its share, so the averaged gradient is the global batch mean even when the
  batch does not divide evenly. A global batch equal to the world size is one sample per rank.
- Only rank 0 writes: checkpoints, metrics, plots, models (:func:`is_main`, :func:`main_only`).
  Resuming, rank 0 reads the checkpoint and broadcasts it (:func:`from_main`): every rank
  continues from the same state without needing a shared file system.
- A failure on one rank ends every rank with a non-zero exit; the first rank to fail prints the
  one message (:func:`report_once`), a lost peer reads as :class:`DistributedError`.

A pipeline opts in with :func:`data_parallel`; :func:`lnconvert.recipes.run_recipe` refuses
to run other pipelines on more than one process.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DistributedError, LnConvertError

TIMEOUT_ENV = "LNCONVERT_DIST_TIMEOUT"  # seconds a rank waits for the others (init and every collective)
DEFAULT_TIMEOUT = 900
FAILURES_KEY = "lnconvert/failures"

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process stands in the run; ``world_size == 1`` is a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_context = Context()


def current() -> Context:
    return _context


def is_main() -> bool:
    """True on the process that writes outputs (rank 0; the only process of a plain run)."""
    return _context.is_main


def main_only(function: F) -> F:
    """``function`` runs on rank 0 only (returning None elsewhere): for functions that write files."""
    @functools.wraps(function)
    def on_main(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs) if _context.is_main else None
    return on_main  # type: ignore[return-value]


def describe() -> dict[str, Any]:
    """``{"world_size": N, "backend": "gloo" | "nccl" | None}`` for a run's metrics."""
    return {"world_size": _context.world_size, "backend": _context.backend}


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA tensors, ``gloo`` for CPU ones (nccl cannot reduce CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"


def _timeout() -> timedelta:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT))
    try:
        seconds = float(text)
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    return timedelta(seconds=seconds)


def init_from_env(device: torch.device = torch.device("cpu")) -> Context:
    """Join the process group described by torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a no-op without it or with one process.

    ``device`` is where the pipeline trains: it picks the backend (recipes train on CPU: gloo).
    """
    global _context
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or _context.active:
        return _context
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, timeout=_timeout())
    except (RuntimeError, ValueError) as exc:  # rendezvous failed: bad address, peers never came
        raise DistributedError(f"cannot join the {world_size}-process run at {os.environ.get('MASTER_ADDR')}:"
                               f"{os.environ.get('MASTER_PORT')}: {str(exc).strip().splitlines()[0]}") from None
    _context = Context(rank, world_size, local_rank, backend)
    return _context


def finish() -> None:
    """Wait for every rank (so none reports success while another still fails), then leave."""
    global _context
    if _context.active:
        dist.barrier()
        dist.destroy_process_group()
    _context = Context()


def data_parallel(pipeline: F) -> F:
    """Mark a recipe pipeline as able to run on several processes: its training goes through
    :func:`lnconvert.recipes.train.fit` (or :func:`wrap` + :func:`batch_part`), its files through
    ``output.write_json``/plots or behind :func:`is_main`, and it puts :func:`describe` in its metrics."""
    pipeline.data_parallel = True  # type: ignore[attr-defined]
    return pipeline


# --- training --------------------------------------------------------------------------
def batch_part(batch_size: int) -> tuple[slice, float]:
    """This rank's rows of every global batch of ``batch_size``, and the weight of its mean loss.

    Rows are contiguous, near-equal parts (sizes differ by at most one). The weight
    ``rows * world_size / batch_size`` makes DDP's gradient average equal the global batch
    mean (1.0 when the batch divides evenly). A rank left without rows (global batch smaller
    than the world size) computes the batch's first sample with weight 0: it still joins the
    gradient all-reduce, contributing nothing.
    """
    n, rank = _context.world_size, _context.rank
    if n == 1:
        return slice(None), 1.0
    base, extra = divmod(batch_size, n)
    size = base + (rank < extra)
    if size == 0:
        return slice(0, 1), 0.0
    start = rank * base + min(rank, extra)
    return slice(start, start + size), size * n / batch_size


def _has_running_stats(model: nn.Module) -> bool:
    # any torch norm layer that updates running statistics in training (a training-time question)
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats for m in model.modules())


def wrap(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes run, else ``model`` itself.

    Construction broadcasts rank 0's parameters and buffers, so every rank starts equal.
    Buffers are re-broadcast before each forward (``forward_sync_buffers``) only for models with
    BatchNorm running statistics (BN-free converted models have none worth the traffic). Converted models
    (twin-split parameters, gates, compacted) use every parameter in every forward, so the
    default keeps DDP's cheaper ``find_unused_parameters=False``.
    """
    if not _context.active:
        return model
    device_ids = [_context.local_rank] if _context.backend == "nccl" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               forward_sync_buffers=_has_running_stats(model),
                                               find_unused_parameters=find_unused_parameters)


def average(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (the global-batch loss from the weighted per-rank losses)."""
    if not _context.active:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / _context.world_size


def sync_from_main(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (after training: BatchNorm running
    statistics are updated by each rank's own shard, and rank 0's are the checkpointed ones)."""
    if not _context.active:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def from_main(load: Callable[[], T]) -> T:
    """``load()`` run on rank 0 only, its result (or its :class:`LnConvertError`) on every rank."""
    if not _context.active:
        return load()
    box: list[Any] = [None]
    if _context.is_main:
        try:
            box[0] = ("ok", load())
        except LnConvertError as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


# --- failures ----------------------------------------------------------------------------
_LOST_PEER = ("closed by peer", "reset by peer", "connection refused", "broken pipe")
_HUNG = ("timed out", "timeout")


def explain(exc: BaseException) -> BaseException:
    """A collective that failed in a multi-process run (another rank died or hung) becomes one
    clear :class:`DistributedError`; anything else is returned unchanged."""
    if not _context.active or isinstance(exc, LnConvertError) or not isinstance(exc, RuntimeError):
        return exc
    text = str(exc).strip()
    lowered = text.lower()
    if not (isinstance(exc, dist.DistError) or "gloo" in lowered or "nccl" in lowered):
        return exc
    if any(s in lowered for s in _LOST_PEER):
        why = "another process of this run was killed or crashed"
    elif any(s in lowered for s in _HUNG):
        why = f"another process of this run stopped responding for {_timeout().total_seconds():.0f} s ({TIMEOUT_ENV})"
    else:
        why = f"communication between the processes failed: {text.splitlines()[0] if text else type(exc).__name__}"
    return DistributedError(f"{why}; checkpoints written so far are intact: run the same command again to resume")


def report_once(report: Callable[[], None]) -> bool:
    """Call ``report`` (print the error) on the first rank of the run to fail only; True there.

    Failures are counted in the run's key-value store: torchrun's agent hosts it, so it outlives
    every rank. When rank 0 hosts it (ranks started by hand), rank 0 first leaves the process
    group, so that ranks blocked in a collective with it fail now, and waits a few seconds for
    them to count themselves before its exit takes the store away. A rank that cannot reach
    the store reports: a second message is better than none.
    """
    if not _context.active:
        report()
        return True
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        first = store.add(FAILURES_KEY, 1) == 1
    except Exception:  # noqa: BLE001 - any store failure means: report here
        store, first = None, True
    try:
        if first:
            report()
    finally:
        if store is not None and _context.is_main and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            _wait_for_peers(store)
    return first


def _wait_for_peers(store: Any, seconds: float = 5.0) -> None:
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
        deadline = time.monotonic() + seconds
        while store.add(FAILURES_KEY, 0) < _context.world_size and time.monotonic() < deadline:
            time.sleep(0.05)


def where() -> str:
    """`` (rank R of N)`` for messages of a multi-process run, else empty."""
    return f" (rank {_context.rank} of {_context.world_size})" if _context.active else ""


__all__ = ["Context", "average", "backend_for", "batch_part", "current", "data_parallel", "describe", "explain",
           "finish", "from_main", "init_from_env", "is_main", "main_only", "report_once", "sync_from_main", "where",
           "wrap"]

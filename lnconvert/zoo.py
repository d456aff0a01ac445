"""Zoo runner: convert many models, each in its own subprocess with a time limit, into one table.

The parent process selects model names, runs ``python -m lnconvert.zoo NAME RESULT OPTIONS``
per model (``jobs`` at a time) and appends one row per model to ``PREFIX.csv`` (rewritten
atomically after every model, so an interrupted run resumes where it stopped) and
``PREFIX.md``. A child that hangs, runs out of memory or crashes becomes a ``failed`` row
naming what happened; it never stops the run.
"""
from __future__ import annotations

import csv
import fnmatch
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import LnConvertError, OutputError, ParityError, UsageError, one_line

COLUMNS = (
    "model", "library", "input_size", "traced", "bn_before", "bn_after", "bn_folded", "bn_affine", "bn_kept",
    "act_linked", "act_skipped", "consumers_widened", "boundaries_slice", "boundaries_gate",
    "params_before", "params_after", "macs_before", "macs_after", "max_rel_error", "float32_floor", "onnx_max_rel",
    "onnx_layout_ops", "convert_seconds", "verify_seconds", "status", "error_class", "reason", "note",
)
STATUSES = ("exact", "partial", "failed")
# tried in order when no input size is given: the first the model runs at is used
SIZE_LADDER = (64, 96, 128, 160, 192, 224)
_LADDER_TEXT = "the first of " + "/".join(map(str, SIZE_LADDER)) + " (below the model’s own) or its own size it runs at"


@dataclass(frozen=True)
class ZooOptions:
    """How every model of a zoo run is converted and checked (also what the child receives)."""

    drop_bn: bool = True
    policy: str = "mirror"
    residual: str = "slice"
    input_size: int | None = None  # square side; None: the first of SIZE_LADDER the model runs at
    onnx: bool = False
    timeout: float = 600.0
    memory_gb: float = 12.0
    threads: int = 1


# -- selecting models ------------------------------------------------------------------------

def torchvision_classification() -> list[str]:
    """Every torchvision classification model (``torchvision.models.list_models(module=models)``)."""
    from .models import torchvision_names

    return [f"torchvision/{n}" for n in torchvision_names()]


def torchvision_tasks(tasks: Iterable[str] | None = None) -> list[str]:
    """Every torchvision builder of the given tasks (default: all, classification included)."""
    from .tasks import TASKS, task_names

    chosen = list(tasks) if tasks is not None else list(TASKS)
    unknown = [t for t in chosen if t not in TASKS]
    if unknown:
        raise UsageError(f"unknown torchvision task {unknown[0]!r}; tasks: {', '.join(TASKS)}")
    return [f"torchvision/{n}" if t == "classification" else f"torchvision/{t}/{n}"
            for t in chosen for n in task_names()[t]]


def timm_matching(pattern: str) -> list[str]:
    """timm models whose name matches the glob ``pattern``."""
    from .models import timm_names

    return [f"timm/{n}" for n in timm_names() if fnmatch.fnmatch(n, pattern)]


def timm_family(name: str) -> str:
    """The family of a timm model: its timm module plus the name's stem without the depth,
    e.g. ``efficientnet:mixnet`` for mixnet_s, ``resnet:resnet`` for resnet18d and resnet50."""
    tokens = name.split("_")
    stem = "_".join(tokens[:2]) if tokens[0] == "tf" and len(tokens) > 1 else tokens[0]
    stem = re.sub(r"\d{2,}[a-z]?$", "", stem)  # resnet18d -> resnet; mobilenetv3 keeps its version
    return f"{_timm_modules().get(name, '?')}:{stem}"


@lru_cache(maxsize=1)
def _timm_modules() -> dict[str, str]:
    """timm model name -> its module, from timm's public list_modules / list_models(module=)."""
    import timm

    return {n: module for module in timm.list_modules() for n in timm.list_models(module=module)}


def _meta_param_count(name: str) -> float:
    """Parameters of a timm model built on the meta device (no memory, no init); inf if it cannot be."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # an architecture that computes on tensors in __init__: rank it last
        return float("inf")
    return float(sum(p.numel() for p in model.parameters()))


@lru_cache(maxsize=1)
def timm_families() -> dict[str, str]:
    """Family -> its smallest timm model by parameter count (ties: the shorter, then first name)."""
    from .models import timm_names

    members: dict[str, list[str]] = {}
    for name in timm_names():
        members.setdefault(timm_family(name), []).append(name)
    return {family: min(names, key=lambda n: (_meta_param_count(n) if len(names) > 1 else 0, len(n), n))
            for family, names in sorted(members.items())}


def select_models(names: Iterable[str] = (), *, torchvision: bool = False, timm_patterns: Iterable[str] = (),
                  timm_smallest_per_family: bool = False, torchvision_task_list: Iterable[str] = ()) -> list[str]:
    """Canonical ``library/name`` list, in the order asked, without repeats. Explicit names are
    resolved like ``lnconvert MODEL`` (an unknown name raises ModelSourceError)."""
    from .models import resolve

    chosen: list[str] = []
    for name in names:
        library, arch = resolve(name)
        if library == "import":
            raise UsageError(f"the zoo runs torchvision and timm models; {name!r} is an import path")
        chosen.append(f"{library}/{arch}")
    if torchvision:
        chosen += torchvision_classification()
    task_list = list(torchvision_task_list)
    if task_list:
        chosen += torchvision_tasks(None if "all" in task_list else task_list)
    for pattern in timm_patterns:
        matched = timm_matching(pattern)
        if not matched:
            raise UsageError(f"no timm model matches {pattern!r}")
        chosen += matched
    if timm_smallest_per_family:
        chosen += [f"timm/{n}" for n in timm_families().values()]
    return list(dict.fromkeys(chosen))


# -- one model (runs in the child process) ------------------------------------------------------

def _runs_at(model, channels: int, side: int) -> bool:
    """Whether ``model`` runs on a side x side input in train mode (auxiliary heads, as
    randomize_batchnorm runs it) and in eval mode."""
    import torch

    was_training = model.training
    try:
        with torch.no_grad():
            for training in (True, False):
                model.train(training)
                model(torch.zeros(2, channels, side, side))
        return True
    except Exception:  # too small for this architecture
        return False
    finally:
        model.train(was_training)


def _configured_side(name: str, model) -> tuple[int, int]:
    """(channels, side) the model was made for: timm's pretrained_cfg, torchvision's weights
    transforms (inception_v3: 299), else 3 x 224."""
    from .trace import example_input_size

    channels, *sides = example_input_size(model)
    library, _, arch = name.partition("/")
    if library == "torchvision":
        import torchvision

        weights = torchvision.models.get_model_weights(arch.rpartition("/")[2]).DEFAULT
        crop = weights.transforms.keywords.get("crop_size", 224)
        sides = [crop]
    return channels, max(sides)


def _run_size(name: str, model, options: ZooOptions) -> tuple[int, int]:
    """(channels, side) of the input used: ``options.input_size``, else the first of SIZE_LADDER
    (below the model's configured size, then that size) the model runs at."""
    channels, configured = _configured_side(name, model)
    if options.input_size:
        sides = [options.input_size]
    else:
        sides = [s for s in SIZE_LADDER if s < configured] + [configured]
    for side in sides:
        if _runs_at(model, channels, side):
            return channels, side
    raise UsageError(f"the model does not run at input sizes {sides} (train and eval mode)")


def _count_batchnorm(model) -> int:
    import torch

    from .convert import remaining_batchnorm
    from .rules import is_frozen_batchnorm

    modules = {n for n, m in model.named_modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or is_frozen_batchnorm(m)}
    functional = set(remaining_batchnorm(model)) if hasattr(model, "graph") else set()
    return len(modules | functional)


def _report_columns(report) -> dict[str, Any]:
    bn, acts, kinds = report.count(report.batchnorm), report.count(report.activations), \
        report.count(report.boundaries, "kind")
    floors = [p.native_noise for p in report.parity if p.native_noise is not None]
    return {
        "bn_folded": bn.get("folded", 0), "bn_affine": bn.get("affine", 0), "bn_kept": bn.get("kept", 0),
        "act_linked": acts.get("linked", 0), "act_skipped": sum(v for k, v in acts.items() if k != "linked"),
        "consumers_widened": len(report.consumers),
        "boundaries_slice": kinds.get("slice", 0), "boundaries_gate": kinds.get("gate", 0),
        "params_before": report.params_before, "params_after": report.params_after,
        "macs_before": report.macs_before, "macs_after": report.macs_after,
        "max_rel_error": "" if report.max_rel_error is None else f"{report.max_rel_error:.2e}",
        "float32_floor": f"{max(floors):.2e}" if floors else "",
        "verify_seconds": f"{report.pass_seconds.get('verify', 0.0):.2f}",
    }


def _onnx_max_rel(result, original) -> tuple[float, bool, str]:
    """ORT's worst relative error, whether every output passed, and the layout ops the export
    added to the original's (``+0`` or ``+3 (Concat 2, Slice 1)``)."""
    from .export import added_layout_ops, describe_layout_ops, export_onnx, verify_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(result, Path(tmp) / "model.onnx")
        rows = verify_onnx(path, original, sample_shape=result.example_inputs[0].shape[1:])
        added = describe_layout_ops(added_layout_ops(path, original, result.example_inputs))
    return max(r.max_rel for r in rows), all(r.ok for r in rows), added


def _float64_conversion(error: ParityError, model, x) -> str:
    """Tells float32 weight rounding (amplified by an ill-conditioned model) from a wrong graph,
    when convert's own float32-rounding check did not already measure it (and say so)."""
    from .convert import float64_conversion_error
    from .options import ConvertOptions

    worst = float64_conversion_error(model, ConvertOptions.from_dict(error.report.options), (x,))
    return f"; a float64 copy converts to max rel {worst:.1e}"


def convert_one(name: str, options: ZooOptions) -> dict[str, Any]:
    """Load ``name`` (random init), randomise its BN statistics, convert and verify it: one row."""
    import torch

    from .convert import convert
    from .errors import ParityError, TraceError
    from .models import load_model
    from .tasks import task_of
    from .testing import randomize_batchnorm
    torch.set_num_threads(options.threads)
    row: dict[str, Any] = {"model": name, "library": name.partition("/")[0], "status": "failed"}
    x = None  # the image batch of a classification row (task rows make their own inputs)
    try:
        torch.manual_seed(0)  # the architecture's own random init, the same every run
        model = load_model(name)
        row["bn_before"] = _count_batchnorm(model)
        if task_of(model) not in ("classification", "quantization"):
            return row | _convert_task_model(name, model, options)
        channels, side = _run_size(name, model, options)
        row["input_size"] = f"{channels}x{side}x{side}"
        generator = torch.Generator().manual_seed(0)
        randomize_batchnorm(model, torch.randn(4, channels, side, side, generator=generator))
        x = torch.randn(2, channels, side, side, generator=generator)
        start = time.perf_counter()
        result = convert(model, drop_bn=options.drop_bn, policy=options.policy, residual=options.residual,
                         example_inputs=x, name=name, partial=True)  # BN in opaque leaves / untraceable parts
        row["convert_seconds"] = f"{time.perf_counter() - start:.2f}"
        row["traced"] = "parts" if result.report.parts is not None else "yes"
        row.update(_report_columns(result.report), bn_after=_count_batchnorm(result.model),
                   status=result.report.status, reason="; ".join(result.report.status_reasons))
        if result.report.float64_conversion_error is not None:  # passed by the float32-rounding rule
            row["note"] = (f"above 1e-5 only by float32 rounding (<= the original's own); a float64 copy "
                           f"converts to {result.report.float64_conversion_error:.1e}")
        if result.report.parts is not None:
            row["note"] = "; ".join(filter(None, (row.get("note"), _parts_note(result.report))))
        if options.onnx:
            worst, ok, row["onnx_layout_ops"] = _onnx_max_rel(result, model)
            row["onnx_max_rel"] = f"{worst:.2e}"
            if not ok:
                row.update(status="failed", error_class="OnnxParity", reason=f"ONNX Runtime max rel {worst:.2e}")
    except Exception as exc:  # every failure is a row: the class and one line
        row.update(error_class=type(exc).__name__, reason=one_line(exc))
        if isinstance(exc, TraceError):
            row["traced"] = "no"
        elif isinstance(exc, ParityError):
            row["traced"] = "yes"
            if exc.report is not None:
                row.update(_report_columns(exc.report))
            try:
                if exc.report.float64_conversion_error is None and x is not None:
                    row["reason"] += _float64_conversion(exc, model, x)
            except Exception as diagnosis:  # e.g. no memory for a float64 copy: the row stands
                row["reason"] += f"; no float64 check ({type(diagnosis).__name__})"
        elif "can't allocate memory" in str(exc) or isinstance(exc, MemoryError):
            row["error_class"] = "MemoryError"
    if row.get("bn_before") == 0 and options.drop_bn:
        row["note"] = "no BatchNorm: --drop-bn is a no-op"
    return row


# small task inputs for the zoo (the task defaults of lnconvert.tasks, shrunk where the model allows)
_ZOO_DETECTION_SIDE = 128
_ZOO_TASK_SIZES = {"segmentation": (3, 64, 64), "detection": (3, 96, 128), "video": (3, 4, 56, 56),
                   "optical_flow": (3, 128, 128)}


def _convert_task_model(name: str, model, options: ZooOptions) -> dict[str, Any]:
    """A detection / segmentation / video / flow row: the task's inputs, BN statistics measured
    on another batch of them, partial conversion where the whole model does not trace, and
    every output tensor of the whole model compared (detections after NMS)."""
    from .convert import convert
    from .tasks import task_of
    from .testing import randomize_batchnorm
    from .trace import default_example_inputs

    task = task_of(model)
    size = None if type(model).__name__ in ("S3D", "MViT") else _ZOO_TASK_SIZES[task]  # those need their clip
    transform = getattr(model, "transform", None)
    if task == "detection" and getattr(transform, "fixed_size", True) is None:
        # R-CNN / RetinaNet / FCOS resize images to a side of 800: 128 keeps a CPU row to minutes
        transform.min_size, transform.max_size = (_ZOO_DETECTION_SIDE,), _ZOO_DETECTION_SIDE
    for holder in (model, getattr(model, "roi_heads", None)):  # random init scores ~1/91: keep every detection
        if task == "detection" and hasattr(holder, "score_thresh"):
            holder.score_thresh = 0.0
    inputs = default_example_inputs(model, input_size=size)
    randomize_batchnorm(model, default_example_inputs(model, batch=2, input_size=size, seed=1))
    start = time.perf_counter()
    result = convert(model, drop_bn=options.drop_bn, policy=options.policy, residual=options.residual,
                     example_inputs=inputs, name=name, partial=True)
    report = result.report
    shape = inputs[0][0].shape if isinstance(inputs[0], list) else inputs[0].shape[1:]
    row = {"input_size": "x".join(map(str, shape)) + (" (x2 frames)" if task == "optical_flow" else ""),
           "traced": "parts" if report.parts is not None else "yes",
           "convert_seconds": f"{time.perf_counter() - start:.2f}", "status": report.status,
           "reason": "; ".join(report.status_reasons), **_report_columns(report),
           "bn_after": _count_batchnorm(result.model)}
    if report.parts is not None:
        row["note"] = _parts_note(report)
    if task == "detection":  # the comparison is only as strong as the number of detections in it
        import torch

        with torch.no_grad():
            found = sum(len(d["boxes"]) for d in model.eval()(*inputs))
        row["note"] = f"{found} detections compared; {row.get('note', '')}"
    return row


def _parts_note(report) -> str:
    """What a partial conversion converted and kept (kept ones with their reason)."""
    converted = [p["module"] for p in report.parts if p["action"] == "converted"]
    kept = [f"{p['module']} ({p['detail'][:120]})" for p in report.parts if p["action"] == "kept"]
    shown = ", ".join(converted[:4]) + (f" and {len(converted) - 4} more" if len(converted) > 4 else "")
    return "; ".join([f"converted {shown}"] * bool(converted) + [f"kept {k}" for k in kept])


def _limit_memory(gigabytes: float) -> None:
    """Cap the child's address space so one huge model fails alone instead of swapping the machine."""
    import resource

    limit = int(gigabytes * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def child_main(argv: Sequence[str]) -> int:
    """``python -m lnconvert.zoo NAME RESULT_JSON OPTIONS_JSON``: write one row as JSON."""
    name, result_path, options_json = argv
    options = ZooOptions(**json.loads(options_json))
    if options.memory_gb > 0:
        _limit_memory(options.memory_gb)
    import warnings

    warnings.filterwarnings("ignore")  # a child's stderr is only read when it dies
    row = convert_one(name, options)
    Path(result_path).write_text(json.dumps(row))
    return 0


# -- running many (parent process) ---------------------------------------------------------------

def run_child(name: str, options: ZooOptions, running: set | None = None) -> dict[str, Any]:
    """Convert ``name`` in a fresh interpreter; a timeout, a kill or a crash becomes a failed row.
    The child is in ``running`` while it runs, so an interrupted parent can end it."""
    failed = {"model": name, "library": name.partition("/")[0], "status": "failed"}
    with tempfile.TemporaryDirectory(prefix="lnconvert-zoo-") as tmp:
        result_path = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "lnconvert.zoo", name, str(result_path), json.dumps(asdict(options))]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)  # Ctrl-C reaches the parent only; it ends the children
        if running is not None:
            running.add(process)
        try:
            _, stderr = process.communicate(timeout=options.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return failed | {"error_class": "Timeout", "reason": f"no result within {options.timeout:g} s"}
        finally:
            if running is not None:
                running.discard(process)
        if result_path.is_file():
            return json.loads(result_path.read_text())
    elapsed = time.perf_counter() - start
    if process.returncode < 0:
        import signal

        signame = signal.Signals(-process.returncode).name
        hint = " (out of memory?)" if signame == "SIGKILL" else ""
        return failed | {"error_class": "Killed", "reason": f"{signame} after {elapsed:.0f} s{hint}"}
    last = (stderr or "").strip().splitlines()[-1:] or [f"exit code {process.returncode}"]
    return failed | {"error_class": "Crashed", "reason": last[0][:300]}


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of an existing zoo CSV ([] if there is none); refuses a file that is not one. Columns
    added since the file was written read as empty."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"model", "library", "status"} <= set(reader.fieldnames or ()):
            raise OutputError(f"{path} is not a zoo report (no model/library/status columns); "
                              f"use another --out or delete it")
        return list(reader)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})


def coverage(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per library: models, count per status, median and max conversion seconds (converted rows)."""
    out: dict[str, dict[str, Any]] = {}
    for library in sorted({r["library"] for r in rows}):
        mine = [r for r in rows if r["library"] == library]
        seconds = [float(r["convert_seconds"]) for r in mine if r.get("convert_seconds")]
        out[library] = {"models": len(mine), **{s: sum(r["status"] == s for r in mine) for s in STATUSES},
                        "median_s": statistics.median(seconds) if seconds else None,
                        "max_s": max(seconds) if seconds else None}
    return out


def _ratio(after: Any, before: Any) -> str:
    return f"{int(after) / int(before):.2f}x" if str(before).isdigit() and int(before) and str(after).isdigit() else ""


def markdown(rows: Sequence[dict[str, Any]], options: ZooOptions | None = None) -> str:
    """The coverage summary and one line per model, as a markdown document."""
    lines = ["# lnconvert zoo report", ""]
    if options is not None:
        lines += [f"Options: drop_bn={options.drop_bn}, policy={options.policy}, residual={options.residual}, "
                  f"input size {options.input_size or _LADDER_TEXT}, "
                  f"ONNX {'checked' if options.onnx else 'not checked'}; BN statistics randomised.", ""]
    lines += ["| library | models | exact | partial | failed | median s | max s |", "|---|---|---|---|---|---|---|"]
    for library, c in coverage(rows).items():
        seconds = [f"{c[k]:.2f}" if c[k] is not None else "-" for k in ("median_s", "max_s")]
        lines.append(f"| {library} | {c['models']} | {c['exact']} | {c['partial']} | {c['failed']} | "
                     f"{seconds[0]} | {seconds[1]} |")
    lines += ["", "| model | input | traced | BN before -> after (folded/affine/kept) | act linked/skipped | "
                  "widened | boundaries slice/gate | params x | MACs x | max rel (float32 floor) | ONNX max rel | s | "
                  "status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = lambda k: r.get(k, "")  # noqa: E731
        shown = g("error_class") and not g("reason").startswith(g("error_class"))  # one_line names the class
        status = g("status") + (f" ({g('error_class')})" if shown else "")
        detail = "; ".join(x for x in (g("reason"), g("note")) if x).replace("|", "/")
        lines.append(
            f"| {g('model')} | {g('input_size')} | {g('traced')} | {g('bn_before')} -> {g('bn_after')} "
            f"({g('bn_folded')}/{g('bn_affine')}/{g('bn_kept')}) | {g('act_linked')}/{g('act_skipped')} | "
            f"{g('consumers_widened')} | {g('boundaries_slice')}/{g('boundaries_gate')} | "
            f"{_ratio(g('params_after'), g('params_before'))} | {_ratio(g('macs_after'), g('macs_before'))} | "
            f"{g('max_rel_error')}{f' ({fl})' if (fl := g('float32_floor')) else ''} | "
            f"{g('onnx_max_rel')}{f', layout {lo}' if (lo := g('onnx_layout_ops')) else ''} | "
            f"{g('convert_seconds')} | "
            f"{status}{': ' + detail if detail else ''} |")
    return "\n".join(lines) + "\n"


def run_zoo(models: Sequence[str], options: ZooOptions, *, out: str | Path = "zoo-report", jobs: int = 1,
            rerun: bool = False, console=None) -> list[dict[str, Any]]:
    """Convert ``models`` (``library/name``), ``jobs`` subprocesses at a time, into ``out``.csv/.md.

    Models already in the CSV are skipped unless ``rerun``; the CSV and markdown are rewritten
    atomically after every model. Returns all rows (old and new) in CSV order.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    csv_path, md_path = Path(f"{out}.csv"), Path(f"{out}.md")
    rows = {r["model"]: r for r in read_rows(csv_path)}
    todo = [m for m in models if rerun or m not in rows]
    counts = {s: sum(r["status"] == s for r in rows.values()) for s in STATUSES}

    def describe() -> str:
        return " ".join(f"{s} {n}" for s, n in counts.items())

    with Progress(TextColumn("zoo"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=False) as progress, \
            ThreadPoolExecutor(max_workers=jobs) as pool:
        task = progress.add_task(describe(), total=len(todo))
        running: set[subprocess.Popen] = set()
        futures = {pool.submit(run_child, m, options, running): m for m in todo}
        try:
            for future in as_completed(futures):
                row = future.result()
                rows[row["model"]] = row
                counts[row["status"]] += 1
                write_csv(list(rows.values()), csv_path)
                md_path.write_text(markdown(list(rows.values()), options))
                progress.update(task, advance=1, description=f"{describe()} | last: {row['model']} {row['status']}")
        except BaseException:
            for future in futures:  # queued models never start
                future.cancel()
            for process in list(running):
                process.kill()
            raise
    if not todo:
        md_path.write_text(markdown(list(rows.values()), options))
    return list(rows.values())


if __name__ == "__main__":
    try:
        sys.exit(child_main(sys.argv[1:]))
    except LnConvertError as exc:  # a bad argument to the child (the parent never sends one)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)

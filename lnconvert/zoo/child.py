"""One model, in the child process: load, randomise BN statistics, convert, verify: one row."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError, one_line
from .config import SIZE_LADDER, ZooOptions


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
    from ..trace import example_input_size

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
    from ..convert import remaining_batchnorm
    from ..rules import is_batchnorm_like

    modules = {n for n, m in model.named_modules() if is_batchnorm_like(m)}
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
    from ..export import added_layout_ops, describe_layout_ops, export_onnx, layout_ops_why, verify_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(result, Path(tmp) / "model.onnx")
        rows = verify_onnx(path, original, sample_shape=result.example_inputs[0].shape[1:])
        added = describe_layout_ops(added_layout_ops(path, original, result.example_inputs), layout_ops_why(path))
    return max(r.max_rel for r in rows), all(r.ok for r in rows), added


def convert_one(name: str, options: ZooOptions) -> dict[str, Any]:
    """Load ``name`` (random init), randomise its BN statistics, convert and verify it: one row."""
    import torch

    from ..convert import convert
    from ..errors import ParityError, TraceError
    from ..models import load_model
    from ..tasks import task_of
    from ..testing import randomize_batchnorm  # public helper: the zoo has no trained weights
    torch.set_num_threads(options.threads)
    row: dict[str, Any] = {"model": name, "library": name.partition("/")[0], "status": "failed"}
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
            row["note"] = _float32_storage_note(result.report)
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
            if exc.report is not None:  # its message says what the float64 copy measured
                row.update(_report_columns(exc.report))
        elif "can't allocate memory" in str(exc) or isinstance(exc, MemoryError):
            row["error_class"] = "MemoryError"
    if row.get("bn_before") == 0 and options.drop_bn:
        row["note"] = "no BatchNorm: --drop-bn is a no-op"
    return row


# small task inputs for the zoo (the task defaults of lnconvert.tasks, shrunk where the model allows)
_ZOO_DETECTION_SIDE = 128
_ZOO_TASK_SIZES = {"segmentation": (3, 64, 64), "detection": (3, 96, 128), "video": (3, 4, 56, 56),
                   "optical_flow": (3, 128, 128)}
_ZOO_CLIPS = {"S3D": None, "MViT": None}  # clips of models that need their own (None: the task default)
# Mask / Keypoint R-CNN run their mask / keypoint head on every detection: at score threshold 0
# and 100 per image the keypoint head alone took 29 s (float32) and 56 s (float64) per run of
# keypointrcnn_resnet50_fpn (151 detections, 2 images of 128 px); 10 per image keeps a row to minutes
_ZOO_DETECTIONS_WITH_PER_DETECTION_HEADS = 10
# R-CNN box heads run on every RPN proposal (1000 per image by default); the _v2 box head is 4
# convolutions with BatchNorm: fasterrcnn_resnet50_fpn_v2's row took 553 s at 1000 per image
_ZOO_RPN_PROPOSALS = 100


def _detection_setup(model) -> None:
    """Small images and detections to compare: random-init scores are about 1/91, under every
    default score threshold, so the threshold is 0 (nothing compared otherwise)."""
    transform = model.transform
    if getattr(transform, "fixed_size", True) is None:
        # R-CNN / RetinaNet / FCOS resize images to a side of 800: 128 keeps a CPU row to minutes
        transform.min_size, transform.max_size = (_ZOO_DETECTION_SIDE,), _ZOO_DETECTION_SIDE
    roi_heads = getattr(model, "roi_heads", None)
    for holder in (model, roi_heads):
        if hasattr(holder, "score_thresh"):
            holder.score_thresh = 0.0
    if roi_heads is not None and (roi_heads.has_mask() or roi_heads.has_keypoint()):
        roi_heads.detections_per_img = _ZOO_DETECTIONS_WITH_PER_DETECTION_HEADS
    rpn = getattr(model, "rpn", None)
    if rpn is not None:  # the constructor's rpn_post_nms_top_n_test
        rpn._post_nms_top_n = dict(rpn._post_nms_top_n, testing=min(rpn._post_nms_top_n["testing"],
                                                                     _ZOO_RPN_PROPOSALS))


def _convert_task_model(name: str, model, options: ZooOptions) -> dict[str, Any]:
    """A detection / segmentation / video / flow row: the task's inputs, BN statistics measured
    on another batch of them, partial conversion where the whole model does not trace, and the
    whole model's outputs compared (detections before NMS and, as sets, after it)."""
    from ..convert import convert
    from ..tasks import task_of
    from ..testing import randomize_batchnorm  # public helper: the zoo has no trained weights
    from ..trace import default_example_inputs

    task = task_of(model)
    size = _ZOO_CLIPS.get(type(model).__name__, _ZOO_TASK_SIZES[task])
    if task == "detection":
        _detection_setup(model)
    inputs = default_example_inputs(model, input_size=size)
    randomize_batchnorm(model, default_example_inputs(model, batch=2, input_size=size, seed=1))
    start = time.perf_counter()
    result = convert(model, drop_bn=options.drop_bn, policy=options.policy, residual=options.residual,
                     example_inputs=inputs, name=name, partial=True)
    report = result.report
    shape = inputs[0][0].shape if isinstance(inputs[0], list) else inputs[0].shape[1:]
    compared = [w for w in report.warnings if w.startswith("detections compared") or "near-tie" in w]
    row = {"input_size": "x".join(map(str, shape)) + (" (x2 frames)" if task == "optical_flow" else ""),
           "traced": "parts" if report.parts is not None else "yes",
           "convert_seconds": f"{time.perf_counter() - start:.2f}", "status": report.status,
           "reason": "; ".join(report.status_reasons), **_report_columns(report),
           "bn_after": _count_batchnorm(result.model),
           "note": "; ".join(filter(None, compared + [_parts_note(report) if report.parts is not None else ""]))}
    if report.float64_conversion_error is not None and report.status != "failed":
        row["note"] = f"{_float32_storage_note(report)}; {row['note']}"
    return row


def _float32_storage_note(report) -> str:
    """A row passed by the float32-rounding rule: its two measurements."""
    return (f"above 1e-5 only by float32 storage of the weights: a float64 copy converts to "
            f"{report.float64_conversion_error:.1e} and, rounded to float32, is this model (max rel "
            f"{report.rounded_copy_error:.1e})")


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


"""What every model of a zoo run is converted and checked with, and the table's columns."""
from __future__ import annotations

from dataclasses import dataclass

COLUMNS = (
    "model", "library", "input_size", "traced", "bn_before", "bn_after", "bn_folded", "bn_affine", "bn_kept",
    "act_linked", "act_skipped", "consumers_widened", "boundaries_slice", "boundaries_gate",
    "params_before", "params_after", "macs_before", "macs_after", "max_rel_error", "float32_floor", "onnx_max_rel",
    "onnx_layout_ops", "convert_seconds", "verify_seconds", "status", "error_class", "reason", "note",
)
STATUSES = ("exact", "partial", "unverified", "failed")  # unverified: nothing compared (0 detections)
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


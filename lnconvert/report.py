"""ConversionReport: everything a conversion did, JSON-serialisable, plus a rich rendering."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

# max rel error (max|delta| / max(1, max|y|)) that every check accepts by default: convert,
# compact, verify_onnx and the CLI
DEFAULT_TOLERANCE = 1e-5


@dataclass
class OutputParity:
    """One output on one input batch. ``max_rel`` = max|delta| / max(1, max|reference|),
    evaluated in ``precision``; ``native_rel`` is the same in the model's own dtype, and
    ``native_noise`` the original's own deviation between its dtype and ``precision``
    (its rounding floor), when the two differ."""

    output: str
    inputs: str
    max_abs: float
    max_rel: float
    ok: bool
    precision: str = "float64"
    native_rel: float | None = None
    native_noise: float | None = None


@dataclass
class ConversionReport:
    model: str
    options: dict[str, Any]
    lnconvert_version: str = ""
    status: str = "unverified"  # exact | partial | changed (LCW, by design) | unverified | failed
    status_reasons: list[str] = field(default_factory=list)
    batchnorm: list[dict[str, str]] = field(default_factory=list)      # name, action, detail
    activations: list[dict[str, str]] = field(default_factory=list)    # node, type, action, reason/layout
    consumers: list[dict[str, Any]] = field(default_factory=list)      # node, type, before, after
    boundaries: list[dict[str, str]] = field(default_factory=list)     # consumer, producer, kind, reason
    norm_layers: list[dict[str, str]] = field(default_factory=list)   # layer, strategy, action, detail
    lcw_layers: list[dict[str, Any]] = field(default_factory=list)     # layer, rel_weight_change
    # partial conversion (lnconvert.partial): module, type, action (converted | kept), detail
    parts: list[dict[str, str]] | None = None
    calibrated: list[str] = field(default_factory=list)  # BNs given running statistics on calibration data
    lcw_deviation: float | None = None  # max rel output change caused by LCW (vs the original)
    # set when outputs exceeded the tolerance in a precision wider than the model's dtype (the
    # float32-rounding rule): a float64 copy's conversion error, and this model's distance from
    # that conversion rounded to the model's dtype
    float64_conversion_error: float | None = None
    rounded_copy_error: float | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    parity: list[OutputParity] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE
    pass_seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    # -- recording helpers used by passes -------------------------------------
    def bn(self, name: str, action: str, detail: str = "") -> None:
        self.batchnorm.append({"name": name, "action": action, "detail": detail})

    def activation(self, node: str, kind: str, action: str, detail: str = "") -> None:
        self.activations.append({"node": node, "type": kind, "action": action, "detail": detail})

    def norm_layer(self, layer: str, strategy: str, action: str, detail: str = "") -> None:
        self.norm_layers.append({"layer": layer, "strategy": strategy, "action": action, "detail": detail})

    def boundary(self, consumer: str, producer: str, kind: str, reason: str) -> None:
        self.boundaries.append({"consumer": consumer, "producer": producer, "kind": kind, "reason": reason})

    # -- summaries --------------------------------------------------------------
    def count(self, items: list[dict[str, str]], key: str = "action") -> dict[str, int]:
        out: dict[str, int] = {}
        for item in items:
            out[item[key]] = out.get(item[key], 0) + 1
        return out

    @property
    def max_rel_error(self) -> float | None:
        return max((p.max_rel for p in self.parity), default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "ConversionReport":
        data = dict(data)
        data["parity"] = [OutputParity(**p) for p in data.get("parity", [])]
        return ConversionReport(**data)


def _strategy_rows(report: ConversionReport, counts) -> list[tuple[str, str]]:
    """Rows for the normalisation strategy (``norm``) and LCW, when they were used."""
    rows = []
    norm = report.options.get("norm", "fold")
    if norm != "fold":
        rows.append((f"norm: {norm}", counts(report.norm_layers)))
    if report.options.get("lcw"):
        changes = [layer["rel_weight_change"] for layer in report.lcw_layers]
        deviation = "not measured" if report.lcw_deviation is None else f"{report.lcw_deviation:.2e}"
        rows.append(("lcw", f"{len(changes)} layers projected, rel weight change "
                            f"{min(changes, default=0):.2e}..{max(changes, default=0):.2e}, "
                            f"output deviation {deviation} (by design)"))
    return rows


def summary_rows(report: ConversionReport) -> list[tuple[str, str]]:
    """(label, value) rows for the CLI table and the README."""
    def counts(items, key="action"):
        return ", ".join(f"{v} {k}" for k, v in sorted(report.count(items, key).items())) or "none"

    rel = report.max_rel_error
    rows = [
        ("status", report.status + (f" ({'; '.join(report.status_reasons)})" if report.status_reasons else "")),
        *[(f"part {p['action']}", f"{p['module']} ({p['type']}): {p['detail']}") for p in report.parts or ()],
        ("batchnorm", counts(report.batchnorm)),
        ("activations", counts(report.activations)),
        ("consumers widened", str(len(report.consumers))),
        ("boundaries", counts(report.boundaries, "kind")),
        *_strategy_rows(report, counts),
        ("params", f"{report.params_before:,} -> {report.params_after:,} "
                   f"({report.params_after / max(report.params_before, 1):.2f}x)"),
        ("MACs / sample", f"{report.macs_before:,} -> {report.macs_after:,} "
                          f"({report.macs_after / max(report.macs_before, 1):.2f}x)"),
        ("parity (max rel)", "not verified" if rel is None else
         f"{rel:.2e} in {report.parity[0].precision} (tolerance {report.tolerance:.0e})"),
        ("time", f"{sum(report.pass_seconds.values()):.2f} s"),
    ]
    native = [p for p in report.parity if p.native_rel is not None]
    if native:
        worst = max(native, key=lambda p: p.native_rel)
        rows.append(("float32 deviation", f"{worst.native_rel:.2e} (the original's own float32 rounding: "
                                          f"{worst.native_noise:.2e})"))
    return rows

"""The zoo's CSV (read, written atomically) and its markdown summary."""
from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any, Sequence

from ..errors import OutputError
from .config import _LADDER_TEXT, COLUMNS, STATUSES, ZooOptions


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
    from ..files import atomic_path

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
    lines += ["| library | models | exact | partial | unverified | failed | median s | max s |",
              "|---|---|---|---|---|---|---|---|"]
    for library, c in coverage(rows).items():
        seconds = [f"{c[k]:.2f}" if c[k] is not None else "-" for k in ("median_s", "max_s")]
        counts = " | ".join(str(c[s]) for s in STATUSES)
        lines.append(f"| {library} | {c['models']} | {counts} | {seconds[0]} | {seconds[1]} |")
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


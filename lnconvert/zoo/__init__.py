"""Zoo runner: convert many models, each in its own subprocess with a time limit, into one table.

The parent process selects model names (:mod:`.select`), runs ``python -m lnconvert.zoo NAME
RESULT OPTIONS`` per model (:mod:`.child`), ``jobs`` at a time (:mod:`.runner`), and appends
one row per model to ``PREFIX.csv`` (rewritten atomically after every model, so an interrupted
run resumes where it stopped) and ``PREFIX.md`` (:mod:`.render`). A child that hangs, runs out
of memory or crashes becomes a ``failed`` row naming what happened; it never stops the run.
"""
from __future__ import annotations

from .child import child_main, convert_one
from .config import COLUMNS, SIZE_LADDER, STATUSES, ZooOptions
from .render import coverage, markdown, read_rows, write_csv
from .runner import run_child, run_zoo
from .select import (
           select_models,
           timm_families,
           timm_family,
           timm_matching,
           torchvision_classification,
           torchvision_tasks,
)

__all__ = ["COLUMNS", "SIZE_LADDER", "STATUSES", "ZooOptions", "child_main", "convert_one", "coverage", "markdown",
           "read_rows", "run_child", "run_zoo", "select_models", "timm_families", "timm_family", "timm_matching",
           "torchvision_classification", "torchvision_tasks", "write_csv"]

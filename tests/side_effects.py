"""A model source with visible side effects, for the load-safety tests: importing this module
or calling :func:`build` creates a marker file named by ``LNCONVERT_TEST_MARKER``. A saved
file naming ``tests.side_effects:build`` must not trigger either unless the user trusts it."""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn


def _mark(what: str) -> None:
    marker = os.environ.get("LNCONVERT_TEST_MARKER")
    if marker:
        with Path(marker).open("a") as handle:
            handle.write(what + "\n")


_mark("imported")


def build() -> nn.Module:
    _mark("called")
    from .bad_models import small

    return small()

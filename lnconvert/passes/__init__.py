"""Graph passes, each ``run(gm, ctx[, plan]) -> gm`` with one job (see each docstring)."""
from . import boundaries, decompose_normact, deep_control, fold_bn, lcw, link, modularize, normprop, relayout, widen

__all__ = ["boundaries", "decompose_normact", "deep_control", "fold_bn", "lcw", "link", "modularize", "normprop",
           "relayout", "widen"]

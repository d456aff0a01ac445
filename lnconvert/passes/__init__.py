"""Graph passes, each ``run(gm, ctx[, plan]) -> gm`` with one job (see each docstring)."""
from . import boundaries, decompose_normact, fold_bn, link, modularize, relayout, widen

__all__ = ["boundaries", "decompose_normact", "fold_bn", "link", "modularize", "relayout", "widen"]

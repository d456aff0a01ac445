"""The conversion pipeline as data: the passes in order, and a runner that checks after each.

A :class:`Pass` is a name, a function ``run(gm, ctx) -> gm`` and a predicate on the options
saying when it runs. :func:`run_pipeline` runs a list of them, times each one into
``report.pass_seconds``, and after every pass checks the graph (the way torch.fx's
``PassManager`` does): it lints, re-propagates shapes (:func:`~lnconvert.analysis.propagate_shapes`,
on meta tensors shaped like the example inputs) when the pass changed the graph and left it
consistent, checks every conv / linear's input width against its weights, and runs the pass's
own invariant. Any failure raises :class:`PassError` naming the pass.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from torch import fx

from . import passes
from .analysis import channel_mismatch, propagate_shapes
from .errors import PassError, one_line
from .options import ConvertOptions, PassContext
from .plan import plan_links
from .report import ConversionReport
from .rewrite import eliminate_dead_code
from .rules import is_batchnorm

Run = Callable[[fx.GraphModule, PassContext], fx.GraphModule]


def always(options: ConvertOptions) -> bool:
    return True


@dataclass(frozen=True)
class Pass:
    """One step of the pipeline.

    ``needs_shapes``: the runner makes ``tensor_meta`` current before it runs (the plan reads
    shapes). ``consistent_after``: the graph runs again after it (link and widen leave a graph
    mid-rewrite that only ``boundaries`` / ``relayout`` make consistent), so shapes and channels
    are checked. ``invariant``: a check of its own, returning the problem found or None.
    """

    name: str
    run: Run
    enabled: Callable[[ConvertOptions], bool] = always
    needs_shapes: bool = False
    consistent_after: bool = True
    invariant: Callable[[fx.GraphModule, PassContext], str | None] | None = None


@contextlib.contextmanager
def timed(report: ConversionReport, name: str) -> Iterator[None]:
    """Add the time spent inside to ``report.pass_seconds[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        report.pass_seconds[name] = report.pass_seconds.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------- the steps that are not passes/ modules
def _plan(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Decide what to link and where every linked tensor goes (:func:`lnconvert.plan.plan_links`);
    the plan is kept on ``ctx.plan`` for the rewrite passes. Changes nothing in the graph."""
    ctx.plan = plan_links(gm, ctx.options)
    return gm


def _planned(run: Callable) -> Run:
    """A rewrite pass that carries out ``ctx.plan``."""
    return lambda gm, ctx: run(gm, ctx, ctx.plan)


def _remove_dead_code(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Remove nodes and submodules nothing reads any more, and the boundaries that were on them
    (e.g. a shuffle's ``size()`` calls died with the shuffle). Preserves: every output."""
    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    alive = {n.name for n in gm.graph.nodes}
    ctx.report.boundaries = [b for b in ctx.report.boundaries if b["consumer"] in alive]
    gm.recompile()
    return gm


def _batchnorm_accounted(gm: fx.GraphModule, ctx: PassContext) -> str | None:
    """Every BatchNorm left in the graph was reported as kept (the rest were to be removed)."""
    kept = {bn["name"] for bn in ctx.report.batchnorm if bn["action"] == "kept"}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in kept and is_batchnorm(gm.get_submodule(node.target)):
            return f"BatchNorm {node.target} is still in the graph and not reported as kept"
    return None


def _linking(options: ConvertOptions) -> bool:
    return options.link


PIPELINE: tuple[Pass, ...] = (
    Pass("decompose_normact", passes.decompose_normact.run),
    Pass("modularize", passes.modularize.run),
    Pass("deep_control", passes.deep_control.run, lambda o: o.norm == "deep-control"),
    Pass("fold_bn", passes.fold_bn.run, lambda o: o.drop_bn, invariant=_batchnorm_accounted),
    Pass("plan", _plan, _linking, needs_shapes=True),
    Pass("link", _planned(passes.link.run), _linking, consistent_after=False),
    Pass("widen", _planned(passes.widen.run), _linking, consistent_after=False),
    Pass("boundaries", _planned(passes.boundaries.run), _linking, consistent_after=False),
    Pass("relayout", _planned(passes.relayout.run), _linking),
    # reads the widths of linked tensors, which the plan's shapes predate
    Pass("normprop", passes.normprop.run, lambda o: o.norm == "normprop", needs_shapes=True),
    Pass("remove_dead_code", _remove_dead_code),
)
"""What ``convert()`` runs before verification, in order."""

AFTER_VERIFY: tuple[Pass, ...] = (Pass("lcw", passes.lcw.run, lambda o: o.lcw),)
"""What ``convert()`` runs after verification: LCW changes the function by design."""


# ---------------------------------------------------------------- the runner
def _fingerprint(gm: fx.GraphModule) -> tuple[tuple, tuple]:
    """What the recorded shapes depend on: the graph's structure (what lint checks) and the
    module each call_module node calls (a weak reference to the module itself: not its id, which
    a freed module's replacement could reuse, and not the module, which would keep every replaced
    module's weights alive; None for a target that does not exist)."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    nodes = gm.graph.nodes
    return (tuple((n.name, n.op, n.target, tuple(n.all_input_nodes)) for n in nodes),
            tuple(weakref.ref(module) if (module := modules.get(n.target)) is not None else None
                  for n in nodes if n.op == "call_module"))


class _Shapes:
    """Keeps ``tensor_meta`` current: propagates again only when the graph changed. Also
    remembers the structure last linted, which needs no second lint."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext):
        self.ctx, self.described = ctx, _fingerprint(gm)
        self.linted: tuple | None = None

    def refresh(self, gm: fx.GraphModule, pass_name: str, fingerprint: tuple | None = None) -> None:
        fingerprint = fingerprint or _fingerprint(gm)
        if fingerprint == self.described:
            return
        try:
            propagate_shapes(gm, self.ctx.example_inputs)
        except Exception as exc:
            raise PassError(pass_name, f"the graph no longer runs on the example inputs: "
                                       f"{one_line(exc.__cause__ or exc)}") from exc
        self.described = fingerprint


def check(gm: fx.GraphModule, ctx: PassContext, step: Pass, shapes: _Shapes) -> None:
    """The invariants every pass keeps; raises :class:`PassError` naming ``step``. The graph is
    linted unless its structure is the one linted last and every called module exists (the pass
    changed nothing, or only replaced modules under their names); after a pass that leaves it
    consistent, its shapes are made current and every conv / linear's input width checked."""
    fingerprint = _fingerprint(gm)
    if fingerprint[0] != shapes.linted or None in fingerprint[1]:
        try:
            gm.graph.lint()
        except Exception as exc:
            raise PassError(step.name, f"the graph does not lint: {one_line(exc)}") from exc
        shapes.linted = fingerprint[0]
    if not step.consistent_after:
        return
    shapes.refresh(gm, step.name, fingerprint)
    problem = channel_mismatch(gm) or (step.invariant(gm, ctx) if step.invariant is not None else None)
    if problem:
        raise PassError(step.name, problem)


@contextlib.contextmanager
def _code_generated_once(gm: fx.GraphModule) -> Iterator[None]:
    """Every pass ends with ``gm.recompile()``, so that it can also run on its own; inside the
    pipeline, whose checks run the graph node by node (not its code), the code is generated once,
    after the last pass (a recompile costs 10 ms for a ResNet-50, 25 ms for a DenseNet-121). A
    failing pass leaves the graph as it failed, its code not regenerated."""
    changed = []
    gm.recompile = lambda: changed.append(True)  # shadows the method, on this instance only
    try:
        yield
    finally:
        del gm.recompile
    if changed:
        gm.recompile()


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, pipeline: Sequence[Pass] = PIPELINE) -> fx.GraphModule:
    """Run each enabled pass of ``pipeline`` on ``gm`` (whose shapes are propagated), timing it
    into ``ctx.report.pass_seconds[name]`` and the checks after it into ``["check"]``. Passes
    edit ``gm`` in place and return it."""
    shapes = _Shapes(gm, ctx)
    with _code_generated_once(gm):
        for step in pipeline:
            if not step.enabled(ctx.options):
                continue
            if step.needs_shapes:
                with timed(ctx.report, "check"):
                    shapes.refresh(gm, f"before {step.name}")
            with timed(ctx.report, step.name):
                edited = step.run(gm, ctx)
            if edited is not gm:
                raise PassError(step.name, "returned another GraphModule instead of editing the one it was given")
            with timed(ctx.report, "check"):
                check(gm, ctx, step, shapes)
    return gm


__all__ = ["AFTER_VERIFY", "PIPELINE", "Pass", "always", "check", "run_pipeline", "timed"]

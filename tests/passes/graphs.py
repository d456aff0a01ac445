"""Tiny hand-built fx graphs and a pass context, so each pass can be called on its own.

``traced(net, shape)`` gives the GraphModule exactly as ``convert`` hands it to the first pass
(traced, eval mode, shapes propagated); ``until(gm, ctx, step)`` runs the pipeline's steps before ``step``
(:data:`lnconvert.pipeline.PIPELINE`), so a test sees the graph its pass receives in the pipeline.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn

from lnconvert import passes
from lnconvert.analysis import propagate_shapes
from lnconvert.options import ConvertOptions, PassContext
from lnconvert.pipeline import AFTER_VERIFY, PIPELINE, run_pipeline
from lnconvert.plan import LinkPlan
from lnconvert.report import ConversionReport
from lnconvert.testing import randomize_batchnorm
from lnconvert.trace import private_eval_copy, trace

ALL_STEPS = PIPELINE + AFTER_VERIFY
STEPS = [step.name for step in ALL_STEPS]


def traced(net: nn.Module, shape: tuple[int, ...] = (2, 3, 8, 8), **options) -> tuple[fx.GraphModule, PassContext]:
    """``net`` (BN statistics randomised) traced and shape-annotated, with a fresh context."""
    net = net.eval()
    generator = torch.Generator().manual_seed(0)
    randomize_batchnorm(net, torch.randn((8,) + tuple(shape[1:]), generator=generator))
    x = torch.randn(shape, generator=generator)
    opts = ConvertOptions(**options)
    ctx = PassContext(opts, ConversionReport(model=type(net).__name__, options=opts.to_dict()), (x,))
    gm = trace(private_eval_copy(net), opts.leaf_modules)
    propagate_shapes(gm, (x,))
    return gm, ctx


def until(gm: fx.GraphModule, ctx: PassContext, step: str) -> tuple[fx.GraphModule, LinkPlan | None]:
    """Run the pipeline's steps before ``step`` (the enabled ones, checked after each, as in
    ``convert``); returns the graph and the link plan, if one was made."""
    gm = run_pipeline(gm, ctx, ALL_STEPS[:STEPS.index(step)])
    return gm, ctx.plan


def run_planned_pass(net: nn.Module, step: str, shape: tuple[int, ...] = (2, 3, 8, 8),
                     **options) -> tuple[fx.GraphModule, PassContext, LinkPlan | None]:
    """``net`` traced, taken through the steps before ``step``, then ``step`` itself (a pass that
    takes the link plan: link, widen, boundaries, relayout)."""
    gm, ctx = traced(net, shape, **options)
    gm, plan = until(gm, ctx, step)
    return getattr(passes, step).run(gm, ctx, plan), ctx, plan


class BnAfterAdd(nn.Module):
    """A BN whose producer is an add of two convs: nothing to fold into, no single conv output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x))


def module_types(gm: fx.GraphModule) -> Counter:
    """How many call sites of each module type the graph has (what a pass fired on)."""
    return Counter(type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module")


def functions(gm: fx.GraphModule) -> Counter:
    """How many call_function / call_method nodes of each target the graph has."""
    return Counter(n.target if isinstance(n.target, str) else n.target.__name__
                   for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def outputs_match(a: nn.Module, b: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> bool:
    """Eval outputs agree within ``tol`` (relative to max(1, |y|)), in float64 to isolate the rewrite."""
    with torch.no_grad():
        ya, yb = copy.deepcopy(a).double()(x.double()), copy.deepcopy(b).double()(x.double())
    return float((ya - yb).abs().max() / max(1.0, float(ya.abs().max()))) <= tol


def conv_bn_relu(cin: int = 3, cout: int = 4) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

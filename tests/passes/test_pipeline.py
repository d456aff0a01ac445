"""The pipeline runner: passes as data, timed, checked after each one, errors naming the pass."""
import dataclasses

import pytest
import torch
from torch import fx, nn

import lnconvert
from lnconvert.errors import PassError
from lnconvert.pipeline import AFTER_VERIFY, PIPELINE, Pass, run_pipeline

from .graphs import conv_bn_relu, module_types, traced


def _net() -> nn.Module:
    return nn.Sequential(*conv_bn_relu(3, 4), nn.Conv2d(4, 2, 1))


def _widen_first_conv_wrongly(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    gm.add_submodule("0", nn.Conv2d(5, 4, 3, padding=1))  # expects 5 channels, gets 3
    return gm


def _forget_the_width_attribute(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    gm.get_submodule("0").in_channels = 6  # the forward still runs (the weight reads 3): only the check sees it
    return gm


def _read_a_later_node(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    calls[0].args = (calls[-1],)  # used before it is defined
    return gm


def _keep_bn_silently(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    return gm  # a "fold" that folds nothing and reports nothing


def _fold_step() -> Pass:
    return next(p for p in PIPELINE if p.name == "fold_bn")


@pytest.mark.parametrize("broken,problem", [
    (_widen_first_conv_wrongly, "no longer runs on the example inputs: RuntimeError: .* expected input"),
    (_forget_the_width_attribute, "node _0 [(]0[)] gets 3 channels but its module expects 6"),
    (_read_a_later_node, "does not lint"),
])
def test_the_runner_names_the_pass_that_broke_an_invariant(broken, problem):
    gm, ctx = traced(_net())
    steps = [PIPELINE[0], Pass("broken_pass", broken), *PIPELINE[1:]]
    with pytest.raises(PassError, match=problem) as info:
        run_pipeline(gm, ctx, steps)
    assert info.value.pass_name == "broken_pass" and str(info.value).startswith("pass broken_pass: ")


def test_a_pass_invariant_is_checked_after_it():
    gm, ctx = traced(_net())
    silent = dataclasses.replace(_fold_step(), run=_keep_bn_silently)
    with pytest.raises(PassError, match="pass fold_bn: BatchNorm 1 is still in the graph and not reported as kept"):
        run_pipeline(gm, ctx, [silent])


def test_a_kept_batchnorm_that_is_reported_passes_the_invariant():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    gm, ctx = traced(net)
    gm = run_pipeline(gm, ctx, [_fold_step()])
    assert module_types(gm)["BatchNorm2d"] == 1 and [b["action"] for b in ctx.report.batchnorm] == ["kept"]


def test_disabled_passes_are_skipped_and_enabled_ones_timed():
    gm, ctx = traced(_net(), link=False)
    ran = []
    steps = [Pass("always", lambda g, c: ran.append("always") or g),
             Pass("never", lambda g, c: ran.append("never") or g, enabled=lambda o: o.link)]
    run_pipeline(gm, ctx, steps)
    assert ran == ["always"] and "never" not in ctx.report.pass_seconds
    assert ctx.report.pass_seconds["always"] >= 0.0 and "check" in ctx.report.pass_seconds


def test_convert_reports_the_time_of_every_enabled_pass():
    x = torch.randn(2, 3, 8, 8)
    report = lnconvert.convert(_net().eval(), example_inputs=x, verify=False).report
    enabled = [p.name for p in PIPELINE + AFTER_VERIFY if p.enabled(lnconvert.options.ConvertOptions())]
    assert set(enabled) <= set(report.pass_seconds)
    assert {"deep_control", "normprop", "lcw"}.isdisjoint(report.pass_seconds)  # not enabled by default


def test_shapes_are_propagated_again_only_after_a_change():
    gm, ctx = traced(_net())
    calls = []
    from lnconvert import pipeline

    original = pipeline.propagate_shapes
    try:
        pipeline.propagate_shapes = lambda g, x: calls.append(1) or original(g, x)
        run_pipeline(gm, ctx, [Pass("noop", lambda g, c: g), Pass("noop_needing_shapes", lambda g, c: g,
                                                                   needs_shapes=True)])
    finally:
        pipeline.propagate_shapes = original
    assert calls == []


def test_the_code_is_generated_once_after_the_last_pass(monkeypatch):
    gm, ctx = traced(_net())
    x = ctx.example_inputs[0]
    expected = gm(x)
    generated = []
    original = fx.GraphModule.recompile
    monkeypatch.setattr(fx.GraphModule, "recompile", lambda self: generated.append(1) or original(self))
    gm = run_pipeline(gm, ctx)  # every pass recompiles: deferred to one
    assert generated == [1]
    assert torch.allclose(gm(x), expected, atol=1e-5)  # the code that runs is the final graph's
    gm.recompile()
    assert generated == [1, 1]  # outside the runner, recompile is the method again


def test_a_pass_must_edit_the_graph_module_it_is_given():
    gm, ctx = traced(_net())
    with pytest.raises(PassError, match="pass copying: returned another GraphModule"):
        run_pipeline(gm, ctx, [Pass("copying", lambda g, c: fx.GraphModule(g, g.graph))])

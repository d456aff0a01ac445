"""Property-based tests: random CNNs (tests/random_nets.py) under sampled conversion options.

For every generated network and option set, the conversion must either be exact (checked
here independently of the report, in float64 and float32, on the verification batch and on
a fresh one) or ``partial`` with its reason; any exception fails the test. The input model
(weights and every module's training flag) must be unchanged, and width never compounds:
each linked activation reads its original width and every consumer at most twice it.

Profiles: ``ci`` (default run, derandomized, so every CI run tries the same examples) and
``slow`` (``-m slow``: many more, random). Counterexamples found and fixed are kept below
as explicit ``@example``s.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lnconvert
from lnconvert.analysis import shape_of
from lnconvert.errors import ParityError, UnsupportedModelError
from lnconvert.layers import layer_spec
from lnconvert.nn import LinkedActivation

from .helpers import state_copy
from .random_nets import INPUT_SHAPE, build, networks

CI_EXAMPLES = 60  # the slow stage's profile runs 1000
settings.register_profile("ci", max_examples=CI_EXAMPLES, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("slow", parent=settings.get_profile("ci"), max_examples=1000, derandomize=False)

OPTIONS = [
    {"policy": policy, "residual": residual, "drop_bn": drop_bn}
    for policy in ("mirror", "minmax") for residual in ("slice", "gate") for drop_bn in (True, False)
] + [{"link": False}, {"activations": ["relu", "silu"]}]
option_sets = st.lists(st.sampled_from(OPTIONS), min_size=1, max_size=2, unique_by=repr)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs run several times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(seed: int) -> torch.Tensor:
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


def _assert_same_function(original: nn.Module, converted: nn.Module, inputs: list[torch.Tensor]) -> None:
    """Outputs agree within 1e-5 of max(1, max|y|) in float64 and 1e-4 in float32."""
    wide_original, wide_converted = copy.deepcopy(original).double(), copy.deepcopy(converted).double()
    with torch.no_grad():
        for x in inputs:
            expected, got = wide_original(x.double()), wide_converted(x.double())
            outputs = expected if isinstance(expected, tuple) else (expected,)
            scale = max(1.0, max(float(y.abs().max()) for y in outputs))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
            torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-4 * scale)


def _input_width(gm, node) -> int:
    module, shape = gm.get_submodule(node.target), shape_of(node.args[0])
    if isinstance(module, nn.Linear):
        return shape[-1]
    return shape[module.dim if isinstance(module, LinkedActivation) else 1]


def _assert_width_never_compounds(result, plain) -> None:
    """Against the same conversion without linking (same node names): every linked activation
    reads its original width and doubles it; every absorbing consumer reads at most 2x."""
    gm, reference = result.model, {n.name: n for n in plain.model.graph.nodes}
    linked = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, LinkedActivation):
            linked += 1
            width = _input_width(gm, node)
            assert width == shape_of(reference[node.name])[module.dim], f"{node.name} reads a linked tensor"
            assert shape_of(node)[module.dim] == 2 * width
        elif layer_spec(module) is not None:
            before = _input_width(plain.model, reference[node.name])
            assert before <= _input_width(gm, node) <= 2 * before, f"{node.name}: width compounded"
    assert linked == sum(a["action"] == "linked" for a in result.report.activations)


def _ill_conditioned(net: nn.Module) -> bool:
    """A BN scaling by more than 100 (a near-constant channel: running_var ~ 0, e.g. a saturated
    hardtanh) amplifies the float32 rounding of folded weights beyond 1e-5 when the channel's
    mean is not 0: verification must then refuse the conversion, which must never pass wrongly."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    return any(float((m.weight / (m.running_var + m.eps).sqrt()).abs().max()) > 100 for m in norms)


def check_random_network(spec: dict, options_list: list[dict], training: bool) -> None:
    net = build(spec)
    net.train(training)
    before, flags = state_copy(net), [m.training for m in net.modules()]
    x = _inputs(1)
    kept_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in net.modules())
    for options in options_list:
        if options.get("drop_bn", True) and kept_bn:  # BN using batch statistics cannot be removed: refused
            with pytest.raises(UnsupportedModelError, match="has no running statistics"):
                lnconvert.convert(net, example_inputs=x, **options)
            continue
        try:
            result = lnconvert.convert(net, example_inputs=x, **options)
        except ParityError as exc:  # refused by verification: only where float32 folding cannot be exact
            assert options.get("drop_bn", True) and _ill_conditioned(net), exc
            continue
        report = result.report
        assert report.status == "exact" and not report.status_reasons
        if options.get("drop_bn", True):
            assert not lnconvert.remaining_batchnorm(result.model)
        assert ("training mode" in " ".join(report.warnings)) == training
        assert result.model.training == training
        net.eval()
        _assert_same_function(net, result.model.eval(), [x, _inputs(2)])
        net.train(training)
        if options.get("link", True):
            plain = lnconvert.convert(net, example_inputs=x, verify=False, **{**options, "link": False})
            _assert_width_never_compounds(result, plain)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "input model was modified"
    assert [m.training for m in net.modules()] == flags, "input model's training flags were changed"


@settings(settings.get_profile("ci"))
@given(spec=networks(), options_list=option_sets, training=st.booleans())
def test_random_networks_convert_exactly_or_report_why(spec, options_list, training):
    check_random_network(spec, options_list, training)


@pytest.mark.slow
@settings(settings.get_profile("slow"))
@given(spec=networks(max_blocks=6), options_list=option_sets, training=st.booleans())
def test_random_networks_many(spec, options_list, training):
    check_random_network(spec, options_list, training)


# ---------------------------------------------------------------- regressions found by the properties
def test_split_with_sizes_computed_in_forward():
    """``torch.split(x, [k, x.shape[1] - k])``: a size is a graph value, not an int (was a TypeError)."""
    spec = {"stem": {"kind": "conv", "out": 3, "k": 1, "stride": 1, "groups": "1", "bn": "after", "bias": False,
                     "act": ("relu", "module")},
            "blocks": [{"kind": "split", "act": ("celu", "module"), "depthwise": False, "how": "split"}],
            "head": {"kind": "gap"}, "bn_stats": True}
    check_random_network(spec, [{"policy": "mirror", "residual": "slice", "drop_bn": True}], training=False)
    result = lnconvert.convert(build(spec), example_inputs=_inputs(1))
    assert [a["action"] for a in result.report.activations] == ["linked", "linked"]


def test_consecutive_channel_shuffles():
    """The second shuffle's rewire pointed at the first one, itself rewired: its views then ran on
    the linked tensor with the sliced width (a ShapeProp error)."""
    spec = {"stem": {"kind": "conv", "out": 4, "k": 1, "stride": 1, "groups": "1", "bn": "after", "bias": False,
                     "act": ("relu", "module")},
            "blocks": [{"kind": "shuffle"}, {"kind": "shuffle"}], "head": {"kind": "gap"}, "bn_stats": True}
    check_random_network(spec, [{"policy": "mirror", "residual": "slice", "drop_bn": True}], training=False)
    graph = lnconvert.convert(build(spec), example_inputs=_inputs(1)).model.graph
    ops = {getattr(n.target, "__name__", n.target) for n in graph.nodes}
    assert not {"view", "transpose"} & ops  # both shuffles became layout permutations


def test_bn_on_a_constant_channel_passes_only_by_the_float32_rounding_rule():
    """A depthwise conv + saturating hardtanh gives constant channels (running_var 0, mean 0.94),
    BNs on them scale by 348 and 423: the folded float32 weights move the output by 6.9e-4
    (relative), as much as running the original itself in float32 does. It passes only because a
    float64 copy converts exactly (lnconvert.convert's float32-rounding rule); keeping BN converts
    it within the tolerance outright."""
    spec = {"stem": {"kind": "conv", "out": 4, "k": 1, "stride": 1, "groups": "1", "bn": "after", "bias": False,
                     "act": None},
            "blocks": [{"kind": "residual", "out": 8, "act": ("celu", "module"), "preact": False,
                        "bn_after_add": False, "act_after_add": False, "add": "+"},
                       {"kind": "conv", "out": 1, "k": 1, "stride": 1, "groups": "depthwise", "bn": "after_act",
                        "bias": True, "act": ("hardtanh", "module")},
                       {"kind": "cat", "branches": [(1, None)], "identity": True, "bn_after": True}],
            "head": {"kind": "gap"}, "bn_stats": True}
    net = build(spec)
    assert _ill_conditioned(net)
    report = lnconvert.convert(net, example_inputs=_inputs(1)).report
    (row,) = report.parity
    assert row.max_rel > report.tolerance and row.max_rel <= row.native_noise
    assert report.float64_conversion_error is not None and report.float64_conversion_error < 1e-12
    assert any("only by float32 storage" in w for w in report.warnings)
    check_random_network(spec, [{"policy": "mirror", "residual": "slice", "drop_bn": False}], training=False)

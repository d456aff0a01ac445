"""The verification verdict: the tolerance, and outputs that exceed it only by float32 rounding;
float64 runs that hold one wide module at a time."""
import copy
import importlib

import pytest
import torch
from torch import nn

import lnconvert
from lnconvert import verify
from lnconvert.errors import ParityError
from lnconvert.passes import fold_bn
from lnconvert.passes.fold_bn import bn_scale_shift, fold_into
from lnconvert.testing import randomize_batchnorm
from tests import bad_models

convert_module = importlib.import_module("lnconvert.convert")  # the package's `convert` is the function
TIGHT = 1e-7  # below what float32 storage of the folded weights allows on this net


@pytest.fixture
def deep_net():
    """12 conv-BN-ReLU layers with randomised BN statistics: folding into float32 weights
    moves the output by ~3e-7 relative, the original's own float32 rounding by ~2e-6."""
    torch.manual_seed(0)
    layers = []
    for i in range(12):
        layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Conv2d(8, 4, 1)).eval()
    randomize_batchnorm(net, torch.randn(4, 3, 8, 8))
    return net, torch.randn(2, 3, 8, 8)


def test_within_float32_rounding_passes_when_a_float64_copy_converts_exactly(deep_net):
    net, x = deep_net
    report = lnconvert.convert(net, example_inputs=x, tolerance=TIGHT).report
    (row,) = report.parity
    assert row.max_rel > TIGHT  # the case this rule is for
    assert report.status == "exact" and row.ok
    assert report.float64_conversion_error is not None and report.float64_conversion_error <= TIGHT
    assert report.rounded_copy_error is not None and report.rounded_copy_error <= TIGHT
    assert any("only by float32 storage" in w for w in report.warnings)
    # at the default tolerance the check never needs the float64 copy
    default = lnconvert.convert(net, example_inputs=x).report
    assert default.float64_conversion_error is None and not default.warnings


def test_a_float64_copy_that_does_not_convert_exactly_keeps_the_failure(deep_net, monkeypatch):
    net, x = deep_net
    monkeypatch.setattr(convert_module, "float64_copy_errors", lambda *args, **kwargs: (1e-3, 0.0))
    with pytest.raises(ParityError, match="a float64 copy converts to max rel 1.0e-03") as caught:
        lnconvert.convert(net, example_inputs=x, tolerance=TIGHT)
    assert caught.value.report.status == "failed" and caught.value.report.float64_conversion_error == 1e-3


def test_float32_verification_excuses_nothing(deep_net, monkeypatch):
    net, x = deep_net
    calls = []
    monkeypatch.setattr(convert_module, "float64_copy_errors", lambda *args, **kwargs: calls.append(1) or (0.0, 0.0))
    with pytest.raises(ParityError):
        lnconvert.convert(net, example_inputs=x, tolerance=1e-12, precision="float32")
    assert calls == []  # compared as they are: nothing is wider than the model's own dtype


def test_float64_copy_errors_measure_the_same_options(deep_net):
    net, x = deep_net
    result = lnconvert.convert(net, example_inputs=x, policy="minmax")
    error, rounded = convert_module.float64_copy_errors(net, result.options, (x,), result.model, [("random", (x,))])
    assert error < 1e-12 and rounded < 1e-12  # the same graph; the same weights, rounded


class _Scaled(nn.Module):
    """Two convs and a parameter the traced graph reads itself (``get_attr``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)
        self.scale = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        return self.b(self.a(x) * self.scale)


def test_a_graph_runs_in_float64_one_module_at_a_time_and_ends_as_it_was():
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_Scaled().eval())
    x = torch.randn(2, 3, 6, 6)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    wide_while_b_runs = []
    seen = gm.b.register_forward_hook(lambda m, args, out: wide_while_b_runs.append(
        (gm.a.weight.dtype, m.weight.dtype, gm.scale.dtype)))  # runs before the hook narrowing b again
    with verify.cast_while_called(gm, torch.float64), torch.no_grad():
        got = gm(x.double())
    seen.remove()
    with torch.no_grad():
        expected = copy.deepcopy(gm).double()(x.double())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same as a float64 copy, bit for bit
    assert wide_while_b_runs == [(torch.float32, torch.float64, torch.float64)]  # a is narrow again
    after = gm.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)
    rows = verify.compare(_Scaled().eval(), gm, [("x", (x,))], 1e-5, candidate_in_place=True)
    assert rows[0].max_rel > 1e-3  # a different model (other weights): compared, not excused
    assert all(torch.equal(gm.state_dict()[k], before[k]) for k in before)


def _wrong_scale(bn):
    """A wrong fold in every dtype: each BN's scale 1e-8 (relative) too large, below float32's
    resolution (6e-8), so the float32 weights barely show it."""
    scale, shift = bn_scale_shift(bn)
    return scale * (1 + 1e-8), shift


def _float32_only(module, scale, shift):
    """A wrong fold in float32 only: the folded weights 5e-8 (relative) too large before their
    rounding to float32, a last-bit difference in some of them."""
    folded = fold_into(module, scale, shift)
    if folded.weight.dtype == torch.float32:
        folded.weight.data = (folded.weight.double() * (1 + 5e-8)).float()
    return folded


FAULTS = {"bn_scale_shift": (_wrong_scale, "float64_conversion_error"),  # fold_bn's name: (fault, what sees it)
          "fold_into": (_float32_only, "rounded_copy_error")}


@pytest.mark.parametrize("name", FAULTS)
def test_a_wrong_conversion_of_an_ill_conditioned_net_is_refused(deep_net, monkeypatch, name):
    """Both faults stay within the original's own float32 rounding (so comparing the error with
    that floor could not refuse them): the float64 copy refuses a wrong graph, the rounded copy a
    difference only the float32 conversion has."""
    net, x = deep_net
    fault, caught_by = FAULTS[name]
    monkeypatch.setattr(fold_bn, name, fault)
    with pytest.raises(ParityError, match="a float64 copy converts to") as caught:
        lnconvert.convert(net, example_inputs=x, tolerance=TIGHT)
    report = caught.value.report
    (row,) = report.parity
    assert TIGHT < row.max_rel <= row.native_noise
    assert getattr(report, caught_by) > TIGHT


@pytest.mark.parametrize("name", FAULTS)
def test_a_wrong_conversion_of_a_part_is_refused(deep_net, monkeypatch, name):
    """The same faults in a model converted in parts (a value-dependent gate after the layers):
    the part stays as it was, with the float64 measurements as the reason."""
    net, x = deep_net
    monkeypatch.setattr(fold_bn, name, FAULTS[name][0])
    report = lnconvert.convert(nn.Sequential(net, bad_models.DataDependent()), example_inputs=x,
                               tolerance=TIGHT).report
    assert report.status == "partial" and report.parts[0]["action"] == "kept"
    assert "a float64 copy converts to" in report.parts[0]["detail"]

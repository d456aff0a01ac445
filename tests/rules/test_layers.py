"""The layer registry: what each family says about its weight, and that a new layer type is one entry."""
import pytest
import torch
from torch import nn

import lnconvert
from lnconvert import layers
from lnconvert.analysis import count_macs, propagate_shapes
from lnconvert.layers import CONV, layer_spec, register_layer
from lnconvert.nn import NormPropConv2d, NormPropLinear
from lnconvert.testing import randomize_batchnorm
from lnconvert.trace import trace


@pytest.mark.parametrize("module,family,in_axis,channel_axis", [
    (nn.Conv1d(2, 4, 3), "conv", 1, 1), (nn.Conv3d(2, 4, 3, groups=2), "conv", 1, 1),
    (nn.ConvTranspose2d(2, 4, 3), "conv_transpose", 0, 1), (nn.Linear(2, 4), "linear", 1, -1),
    (NormPropConv2d(2, 4, 3), "conv", 1, 1), (NormPropLinear(2, 4), "linear", 1, -1),
])
def test_each_layer_type_has_its_family(module, family, in_axis, channel_axis):
    spec = layer_spec(module)
    assert (spec.family, spec.weight_in_axis, spec.input_channel_axis) == (family, in_axis, channel_axis)
    assert module.weight.shape[in_axis] * (spec.groups(module) if spec.grouped_input else 1) == spec.in_channels(module)


def test_strategy_forms_are_registry_entries():
    assert layer_spec(nn.Conv2d(2, 2, 1)).normprop is NormPropConv2d
    assert layer_spec(nn.Linear(2, 2)).normprop is NormPropLinear
    assert layer_spec(nn.ConvTranspose2d(2, 2, 1)).normprop is None and not layer_spec(nn.ConvTranspose2d(2, 2, 1)).lcw
    assert not layer_spec(NormPropConv2d(2, 2, 1)).folds_bn and layer_spec(nn.Conv2d(2, 2, 1)).folds_bn
    assert layer_spec(nn.ReLU()) is None and layer_spec(nn.BatchNorm2d(2)) is None


@pytest.mark.parametrize("groups", [1, 2])
def test_out_channel_view_scales_each_output_channel(groups):
    # scaling the weight along its output axis must equal scaling the output, for every family
    torch.manual_seed(0)
    for module, x in ((nn.Conv2d(4, 6, 3, groups=groups, bias=False), torch.randn(2, 4, 5, 5)),
                      (nn.ConvTranspose2d(4, 6, 3, groups=groups, bias=False), torch.randn(2, 4, 5, 5)),
                      (nn.Linear(4, 6, bias=False), torch.randn(2, 4))):
        scale = torch.rand(6) + 0.5
        expected = module(x) * scale.view(-1, *([1] * (x.dim() - 2)))
        with torch.no_grad():
            module.weight.mul_(layer_spec(module).out_channel_view(module, scale))
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)


def test_macs_per_family_match_hand_counts():
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ConvTranspose2d(6, 2, 2, stride=2),
                        nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    gm = trace(net.eval())
    propagate_shapes(gm, (torch.randn(1, 4, 4, 4),))
    conv = 6 * 4 * 4 * (4 // 2) * 9          # outputs x (in/groups) x kernel
    transposed = 6 * 4 * 4 * 2 * 4           # inputs x out x kernel
    assert count_macs(gm) == conv + transposed + 128 * 3


class ConvWithOwnForward(nn.Conv2d):
    """A conv subclass whose forward the registry cannot vouch for until it is registered."""

    def forward(self, x):
        return self._conv_forward(x, self.weight, self.bias)


def _net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), ConvWithOwnForward(4, 5, 3, padding=1),
                        nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).eval()
    randomize_batchnorm(net, torch.randn(8, 3, 6, 6))
    return net


def test_a_new_layer_type_is_one_registry_entry(monkeypatch):
    x = torch.randn(2, 3, 6, 6)
    before = lnconvert.convert(_net(), example_inputs=x).report
    assert [b["action"] for b in before.batchnorm] == ["affine"]  # no rule: BN cannot fold into it
    assert {c["type"] for c in before.consumers} == {"Linear"}    # and it is not widened

    monkeypatch.setattr(layers, "_LAYERS", dict(layers._LAYERS))  # the entry is undone after the test
    register_layer(ConvWithOwnForward, CONV)
    result = lnconvert.convert(_net(), example_inputs=x)
    assert [b["action"] for b in result.report.batchnorm] == ["folded"]
    assert sorted(c["type"] for c in result.report.consumers) == ["ConvWithOwnForward", "Linear"]
    assert result.report.status == "exact" and result.report.max_rel_error <= 1e-6
    widened = result.model.get_submodule("2")
    assert widened.in_channels == 8 and float(widened.weight.detach()[:, 4:].abs().max()) < 1e-12  # twin columns zero


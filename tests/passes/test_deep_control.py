"""deep_control on its own: a BN on conv feature maps becomes DeepControl2d (alpha 0); others are left."""
import copy

import pytest
import torch
from torch import nn

from lnconvert import passes

from .graphs import BnAfterAdd, module_types, outputs_match, traced, until


def control(net, shape=(2, 3, 8, 8)):
    gm, ctx = traced(net, shape, norm="deep-control")
    gm = until(gm, ctx, "deep_control")[0]
    before = copy.deepcopy(gm)
    return passes.deep_control.run(gm, ctx), ctx, before


def test_bn_on_conv_maps_becomes_deep_control_with_alpha_zero_and_the_conv_unfolded():
    gm, ctx, before = control(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    assert module_types(gm) == {"Conv2d": 1, "DeepControl2d": 1, "ReLU": 1}
    assert torch.equal(gm.get_submodule("0").weight, before.get_submodule("0").weight)
    control_layer = next(m for m in gm.modules() if type(m).__name__ == "DeepControl2d")
    assert not control_layer.alpha.detach().any()  # alpha starts at 0: the BN's function exactly
    assert [b["action"] for b in ctx.report.batchnorm] == ["deep-control"]
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_bn_on_conv1d_and_conv3d_maps_is_controlled_too():
    for conv, bn, shape in [(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), (2, 3, 9)),
                            (nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), (2, 3, 5, 5, 5))]:
        gm, ctx, before = control(nn.Sequential(conv, bn), shape)
        assert module_types(gm)["DeepControl2d"] == 1
        assert outputs_match(before, gm, ctx.example_inputs[0])


def test_bn_after_timm_conv2dsame_is_controlled():
    layers = pytest.importorskip("timm.layers")
    gm, ctx, before = control(nn.Sequential(layers.Conv2dSame(3, 4, 3, stride=2), nn.BatchNorm2d(4)), (2, 3, 9, 9))
    assert module_types(gm)["DeepControl2d"] == 1
    assert outputs_match(before, gm, ctx.example_inputs[0])


@pytest.mark.parametrize("net,shape", [
    (BnAfterAdd(), (2, 3, 8, 8)),
    (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), (2, 3, 8, 8)),      # pre-activation
    (nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), (4, 6)),                # no maps to average
])
def test_bn_elsewhere_is_left_to_fold_bn_and_recorded_not_applied(net, shape):
    gm, ctx, before = control(net, shape)
    assert "DeepControl2d" not in module_types(gm)
    assert module_types(gm) == module_types(before)  # negative: the graph is unchanged
    assert [r["action"] for r in ctx.report.norm_layers] == ["not applied"]
    assert ctx.report.batchnorm == []


def test_bn_without_running_statistics_is_skipped_silently_for_fold_bn_to_report():
    gm, ctx, _ = control(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    assert module_types(gm)["BatchNorm2d"] == 1
    assert ctx.report.batchnorm == [] and ctx.report.norm_layers == []

"""normprop on its own: folded layers become NormProp layers; ReLUs between two are re-normalised."""
import copy

import torch
from torch import nn

from lnconvert import passes

from .graphs import module_types, outputs_match, traced, until


def normprop(net, shape=(2, 3, 8, 8), **options):
    gm, ctx = traced(net, shape, norm="normprop", **options)
    gm, _ = until(gm, ctx, "normprop")
    before = copy.deepcopy(gm)
    return passes.normprop.run(gm, ctx), ctx, before


def actions(ctx) -> list[tuple[str, str]]:
    return [(r["action"], r["detail"]) for r in ctx.report.norm_layers if r["action"] != "normprop"]


def block(padding: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), act,
                         nn.Conv2d(4, 4, 3, padding=padding), nn.BatchNorm2d(4))


def test_folded_convs_become_normprop_and_the_relu_between_is_renormalised_into_the_bias():
    gm, ctx, before = normprop(block(0, nn.ReLU()), link=False)
    assert module_types(gm) == {"NormPropConv2d": 2, "ReLU": 1, "ReLURenorm": 1}
    assert actions(ctx) == [("renormalised", "shift into the bias")]
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_a_zero_padding_consumer_gets_an_explicit_shift_instead():
    gm, ctx, before = normprop(block(1, nn.ReLU()), link=False)
    assert module_types(gm)["ChannelAffine"] == 1
    assert actions(ctx) == [("renormalised", "explicit shift (a consumer zero-pads)")]
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_linked_mirror_relu_is_renormalised_too():
    gm, ctx, before = normprop(block(0, nn.ReLU()))
    assert module_types(gm)["ReLURenorm"] == 1 and module_types(gm)["LinkedActivation"] == 1
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_other_activations_and_minmax_twins_are_not_renormalised():
    gm, ctx, _ = normprop(block(0, nn.ReLU6()), link=False)
    assert "ReLURenorm" not in module_types(gm) and module_types(gm)["NormPropConv2d"] == 2
    gm, ctx, _ = normprop(block(0, nn.ReLU()), policy="minmax")
    assert "ReLURenorm" not in module_types(gm)
    assert actions(ctx) == [("not renormalised", "minmax twins are not ReLU outputs")]


class _ReluIntoAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1, self.r = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.c2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.r(self.bn1(self.c1(x)))
        return self.bn2(self.c2(y)) + y


def test_relu_feeding_a_residual_add_is_left_as_it_is():
    gm, ctx, before = normprop(_ReluIntoAdd(), link=False)
    assert "ReLURenorm" not in module_types(gm)
    assert actions(ctx) == [("not renormalised", "feeds something other than NormProp layers")]
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_layers_without_a_folded_bn_are_not_converted():
    gm, ctx, before = normprop(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), link=False)
    assert module_types(gm) == module_types(before) and ctx.report.norm_layers == []
    assert all(torch.equal(p, q) for p, q in zip(gm.parameters(), before.parameters()))

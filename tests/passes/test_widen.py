"""widen on its own: absorbing consumers get zero twin columns; per-channel parameters are duplicated."""
import copy

import pytest
import torch
from torch import nn

from lnconvert import passes

from .graphs import traced, until


def widen(net, shape=(2, 3, 8, 8), **options):
    gm, ctx = traced(net, shape, **options)
    gm, plan = until(gm, ctx, "widen")
    before = copy.deepcopy(gm)
    return passes.widen.run(gm, ctx, plan), ctx, plan, before


@pytest.mark.parametrize("consumer,shape", [
    (nn.Conv2d(4, 2, 1), (2, 3, 8, 8)),
    (nn.Conv2d(4, 4, 3, groups=2), (2, 3, 8, 8)),
    (nn.Conv2d(4, 4, 3, groups=4), (2, 3, 8, 8)),
    (nn.ConvTranspose2d(4, 2, 2), (2, 3, 8, 8)),
])
def test_consumer_is_widened_with_zero_twins_and_its_primaries_unchanged(consumer, shape):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), consumer)
    gm, ctx, plan, before = widen(net, shape)
    layout = plan.absorbers["_2"]
    wide, old = gm.get_submodule(next(n.target for n in gm.graph.nodes if n.name == "_2")), before.get_submodule("2")
    assert ctx.report.consumers == [{"node": "_2", "type": type(consumer).__name__, "in_before": 4, "in_after": 8,
                                     "groups": consumer.groups}]
    z = torch.randn(2, 4, 6, 6)
    linked = torch.zeros(2, 8, 6, 6)
    linked[:, list(layout.primary)] = z
    linked[:, list(layout.twin)] = torch.randn(2, 4, 6, 6)  # anything in the twins: their weights are zero
    with torch.no_grad():
        torch.testing.assert_close(wide(linked), old(z), rtol=1e-5, atol=1e-5)


def test_linear_after_flatten_is_widened_per_flattened_position():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    gm, ctx, plan, _ = widen(net)
    assert [(c["in_before"], c["in_after"]) for c in ctx.report.consumers] == [(4 * 36, 8 * 36)]
    linear = gm.get_submodule(next(n.target for n in gm.graph.nodes if n.name == "_3"))
    assert linear.in_features == 8 * 6 * 6
    twin_block = linear.weight.detach()[:, 4 * 36:]  # block layout: twins' flattened columns come second
    assert not twin_block.any()


class _AffineOnLinked(nn.Module):  # a BN after the activation cannot fold: its affine sees the linked tensor
    def __init__(self):
        super().__init__()
        self.c1, self.r, self.bn, self.c2 = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(self.bn(self.r(self.c1(x))))


def test_per_channel_parameters_on_a_linked_tensor_are_duplicated_into_the_layout():
    gm, ctx, plan, before = widen(_AffineOnLinked())
    assert len(plan.channel_params) == 1
    (name, layout), = plan.channel_params.items()
    affine = gm.get_submodule(next(n.target for n in gm.graph.nodes if n.name == name))
    old = before.get_submodule(next(n.target for n in before.graph.nodes if n.name == name))
    assert affine.scale.numel() == 8
    torch.testing.assert_close(affine.scale[list(layout.twin)], old.scale, rtol=0, atol=0)
    torch.testing.assert_close(affine.scale[list(layout.primary)], old.scale, rtol=0, atol=0)


def test_layers_outside_the_plan_keep_their_width():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    gm, ctx, plan, before = widen(net)
    assert gm.get_submodule("0").in_channels == 3  # the producer is not a consumer of the linked tensor
    assert torch.equal(gm.get_submodule("0").weight, before.get_submodule("0").weight)

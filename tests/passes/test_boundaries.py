"""boundaries on its own: slice shares one ChannelSelect per producer; gate inserts a GatedMerge per edge."""
import torch
from torch import nn

from lnconvert.nn import ChannelSelect, GatedMerge

from .graphs import module_types, run_planned_pass


def bounded(net, shape=(2, 3, 8, 8), **options):
    return run_planned_pass(net, "boundaries", shape, **options)


class _TwoResiduals(nn.Module):
    """One linked tensor read by two adds (two boundary edges from one producer) and a conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.r, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.r(self.c1(x))
        z = self.c2(y)
        return (z + y) * (z * 2 + y)


def test_slice_boundaries_share_one_select_per_producer():
    gm, ctx, plan = bounded(_TwoResiduals())
    assert len(plan.boundaries) == 2
    assert module_types(gm)["ChannelSelect"] == 1 and "GatedMerge" not in module_types(gm)
    select = next(m for m in gm.modules() if isinstance(m, ChannelSelect))
    assert [b["kind"] for b in ctx.report.boundaries] == ["slice", "slice"]
    z = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(select(z), z[:, :4], rtol=0, atol=0)  # the primaries of the block layout


def test_gate_boundaries_insert_one_gate_per_edge_starting_closed():
    gm, ctx, plan = bounded(_TwoResiduals(), residual="gate")
    assert module_types(gm)["GatedMerge"] == 2 and "ChannelSelect" not in module_types(gm)
    for gate in (m for m in gm.modules() if isinstance(m, GatedMerge)):
        z = torch.randn(2, 8, 3, 3)
        torch.testing.assert_close(gate(z), z[:, :4], rtol=0, atol=0)  # gate = 0: primaries only


def test_no_boundary_no_insertion():
    gm, ctx, plan = bounded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    assert plan.boundaries == [] and ctx.report.boundaries == []
    assert not {"ChannelSelect", "GatedMerge"} & set(module_types(gm))

"""lcw on its own: every conv/linear weight is projected onto zero sum per unit; twins stay zero."""
import copy

import torch
from torch import nn

from lnconvert import passes
from lnconvert.nn import is_lcw

from .graphs import traced, until


def projected(net, shape=(2, 3, 8, 8), **options):
    gm, ctx = traced(net, shape, lcw=True, **options)
    gm, _ = until(gm, ctx, "lcw")  # lcw runs last, after verification
    before = copy.deepcopy(gm)
    return passes.lcw.run(gm, ctx), ctx, before


def test_every_conv_and_linear_sums_to_zero_per_unit_and_stays_constrained():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    gm, ctx, _ = projected(net, link=False)
    layers = [m for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 3 and all(is_lcw(m) for m in layers)
    assert len(ctx.report.lcw_layers) == 3 and all(r["rel_weight_change"] > 0 for r in ctx.report.lcw_layers)
    for layer in layers:
        sums = layer.weight.detach().flatten(1).sum(1)
        assert float(sums.abs().max()) < 1e-5


def test_twin_columns_stay_zero_after_the_projection():
    gm, ctx, _ = projected(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    consumer = gm.get_submodule(next(n.target for n in gm.graph.nodes if n.name == "_2"))
    twins = next(n.meta["lnc_in_layout"].twin for n in gm.graph.nodes if n.name == "_2")
    assert consumer.in_channels == 8
    assert float(consumer.weight.detach()[:, list(twins)].abs().max()) < 1e-9


def test_transposed_convs_are_not_projected():
    gm, ctx, before = projected(nn.Sequential(nn.ConvTranspose2d(3, 4, 2)), link=False)
    assert [(r["action"], r["detail"]) for r in ctx.report.norm_layers] == [
        ("not applied", "no LCW form for ConvTranspose2d")]
    assert not is_lcw(gm.get_submodule("0")) and ctx.report.lcw_layers == []
    assert torch.equal(gm.get_submodule("0").weight, before.get_submodule("0").weight)

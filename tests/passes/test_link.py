"""link on its own: planned activations become LinkedActivation per call site; skipped ones stay."""
import copy

import torch
from torch import nn

from lnconvert import passes
from lnconvert.nn import LinkedActivation

from .graphs import module_types, traced, until


def link(net, shape=(2, 3, 8, 8), **options):
    gm, ctx = traced(net, shape, **options)
    gm, plan = until(gm, ctx, "link")
    before = copy.deepcopy(gm)
    return passes.link.run(gm, ctx, plan), ctx, before


class _SharedRelu(nn.Module):  # torchvision ResNet calls one self.relu several times
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3, self.relu = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1), nn.ReLU()

    def forward(self, x):
        return self.c3(self.relu(self.c2(self.relu(self.c1(x)))))


def test_each_planned_activation_is_linked_with_the_policy():
    for policy in ("mirror", "minmax"):
        gm, ctx, _ = link(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ELU(), nn.Conv2d(4, 2, 1)), policy=policy)
        linked = [m for m in gm.modules() if isinstance(m, LinkedActivation)]
        assert len(linked) == 1 and linked[0].policy == policy and type(linked[0].act) is nn.ELU
        assert [(a["node"], a["action"]) for a in ctx.report.activations] == [("_1", "linked")]


def test_primaries_of_a_linked_output_equal_the_activation():
    gm, ctx, before = link(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 2, 1)))
    act = next(m for m in gm.modules() if isinstance(m, LinkedActivation))
    z = torch.randn(2, 4, 5, 5)
    out = act(z)
    assert out.shape[1] == 8
    torch.testing.assert_close(out[:, :4], nn.SiLU()(z), rtol=0, atol=1e-7)
    torch.testing.assert_close(out[:, 4:], nn.SiLU()(-z), rtol=0, atol=1e-7)


def test_a_shared_module_gets_a_linked_copy_per_call_site():
    gm, ctx, _ = link(_SharedRelu())
    assert module_types(gm)["LinkedActivation"] == 2 and "ReLU" not in module_types(gm)
    sites = [n.target for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LinkedActivation)]
    assert len(sites) == 2 and sites[0] != sites[1]  # two modules: rewriting one site leaves the other alone


def test_skipped_activations_are_reported_and_left_as_they_are():
    gm, ctx, before = link(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert module_types(gm) == module_types(before) == {"Conv2d": 1, "ReLU": 1}
    assert [a["action"] for a in ctx.report.activations] == ["skipped"]

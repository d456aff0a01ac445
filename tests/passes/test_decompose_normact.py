"""decompose_normact on its own: timm's fused BN+act modules become BN, then the activation."""
import copy

import pytest
from torch import nn

from lnconvert import passes

from .graphs import module_types, outputs_match, traced

layers = pytest.importorskip("timm.layers")


def decompose(net):
    gm, ctx = traced(net)
    before = copy.deepcopy(gm)
    return passes.decompose_normact.run(gm, ctx), ctx, before


def test_batchnormact_becomes_plain_bn_then_its_activation():
    gm, ctx, before = decompose(nn.Sequential(nn.Conv2d(3, 4, 3), layers.BatchNormAct2d(4, act_layer=nn.SiLU)))
    assert module_types(gm) == {"Conv2d": 1, "BatchNorm2d": 1, "SiLU": 1}
    order = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert order == ["Conv2d", "BatchNorm2d", "SiLU"]  # the activation after the norm, as inside the module
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_identity_activation_is_not_inserted():
    gm, ctx, before = decompose(nn.Sequential(nn.Conv2d(3, 4, 3), layers.BatchNormAct2d(4, apply_act=False)))
    assert module_types(gm) == {"Conv2d": 1, "BatchNorm2d": 1}
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_every_fused_call_is_decomposed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), layers.BatchNormAct2d(4), nn.Conv2d(4, 4, 1), layers.BatchNormAct2d(4))
    gm, ctx, before = decompose(net)
    assert module_types(gm) == {"Conv2d": 2, "BatchNorm2d": 2, "ReLU": 2}
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_plain_batchnorm_and_other_modules_are_untouched():
    gm, ctx, before = decompose(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    assert [n.format_node() for n in gm.graph.nodes] == [n.format_node() for n in before.graph.nodes]

"""modularize on its own: functional, method and in-place activations become one module per call site."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lnconvert import passes
from lnconvert.errors import UnsupportedModelError

from .graphs import functions, module_types, outputs_match, traced


def modularize(net, shape=(2, 3, 8, 8)):
    gm, ctx = traced(net, shape)
    before = copy.deepcopy(gm)
    return passes.modularize.run(gm, ctx), ctx, before


class _Forms(nn.Module):
    """The same activation written four ways, plus one of another type."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        return F.relu(x) + torch.relu(x) + x.relu() + F.silu(x) + F.leaky_relu(x, 0.2)


def test_every_functional_and_method_activation_becomes_a_module():
    gm, ctx, before = modularize(_Forms())
    assert module_types(gm) == {"Conv2d": 1, "ReLU": 3, "SiLU": 1, "LeakyReLU": 1}
    assert not {"relu", "silu", "leaky_relu"} & set(functions(gm))
    assert gm.get_submodule(next(n.target for n in gm.graph.nodes
                                 if n.op == "call_module" and "leaky" in n.target)).negative_slope == 0.2
    assert outputs_match(before, gm, ctx.example_inputs[0])


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        z = y.relu_()      # overwrites y
        return y + z       # so this add reads relu(y) twice


def test_in_place_activation_redirects_its_later_readers():
    gm, ctx, before = modularize(_InPlace())
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "add")
    relu = next(n for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) is nn.ReLU)
    assert add.args == (relu, relu)
    assert outputs_match(before, gm, ctx.example_inputs[0])


class _InPlaceOnView(nn.Module):
    def forward(self, x):
        x[:, :2].relu_()   # writes through a view into x, which is read afterwards
        return x * 2


def test_in_place_activation_writing_through_a_view_is_refused():
    gm, ctx = traced(_InPlaceOnView())
    with pytest.raises(UnsupportedModelError, match="writes into a view"):
        passes.modularize.run(gm, ctx)


def test_module_activations_and_other_ops_are_left_as_they_are():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout())
    gm, ctx, before = modularize(net)
    assert [n.format_node() for n in gm.graph.nodes] == [n.format_node() for n in before.graph.nodes]

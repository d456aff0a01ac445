"""The rule registry: what each op is classified as, how subclasses are matched, and what has no rule."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from lnconvert.layers import layer_spec
from lnconvert.rules import (
    _RULES,
    BATCHNORM_MODULES,
    CAT_FUNCTIONS,
    FUNCTIONAL_ACTIVATIONS,
    Kind,
    is_kind,
    register_rule,
    rule_for,
)


class _EveryModuleALeaf(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def leaf_traced(net: nn.Module) -> fx.GraphModule:
    """Like lnconvert's tracer for modules with a rule: each submodule one call_module node."""
    return fx.GraphModule(net, _EveryModuleALeaf().trace(net))


def kind_of(net: nn.Module, node_name: str) -> Kind | None:
    gm = leaf_traced(net) if isinstance(net, nn.Sequential) else fx.symbolic_trace(net)
    rule = rule_for(gm, next(n for n in gm.graph.nodes if n.name == node_name))
    return rule.kind if rule is not None else None


@pytest.mark.parametrize("module,kind", [
    (nn.ReLU(), Kind.ACTIVATION), (nn.GELU(), Kind.ACTIVATION), (nn.PReLU(), Kind.ACTIVATION),
    (nn.Conv2d(2, 2, 1), Kind.ABSORB), (nn.ConvTranspose1d(2, 2, 1), Kind.ABSORB), (nn.Linear(2, 2), Kind.ABSORB),
    (nn.BatchNorm2d(2), Kind.CHANNEL_PARAMS), (nn.MaxPool2d(2), Kind.PASS), (nn.Dropout(), Kind.PASS),
    (nn.ZeroPad2d(1), Kind.PASS), (nn.Flatten(), Kind.FLATTEN),
])
def test_module_types_have_their_kind(module, kind):
    assert kind_of(nn.Sequential(module), "_0") is kind


class _Functions(nn.Module):
    def forward(self, x):
        a = torch.cat([x, x], 1)
        b = torch.concatenate([x, x], 1)
        c = x + x
        d = x.mean((2, 3), keepdim=True)
        e, f = x.chunk(2, 1)
        g = F.relu(x)
        return a, b, c, d, e, f, g, x.softmax(1)


@pytest.mark.parametrize("node,kind", [("cat", Kind.CAT), ("concatenate", Kind.CAT), ("add", Kind.BINARY),
                                       ("mean", Kind.REDUCE), ("chunk", Kind.SPLIT), ("getitem", Kind.INDEX),
                                       ("softmax", None)])
def test_functions_and_methods_have_their_kind(node, kind):
    assert kind_of(_Functions(), node) is kind


def test_functional_activations_have_no_rule_of_their_own_but_a_module_form():
    # modularize turns them into modules first, so one rule per activation type suffices
    assert kind_of(_Functions(), "relu") is None
    assert isinstance(FUNCTIONAL_ACTIVATIONS[F.relu]((), {}), nn.ReLU)


def test_the_three_cat_aliases_are_distinct_objects_and_all_cats():
    assert len(set(map(id, CAT_FUNCTIONS))) == 3
    assert all(_RULES[f].kind is Kind.CAT for f in CAT_FUNCTIONS)


def test_binary_rules_record_their_operator():
    assert _RULES[operator.add].op == "add" and _RULES[torch.mul].op == "mul" and _RULES["div_"].op == "div"


def test_a_subclass_gets_its_base_rule_only_while_it_inherits_the_computation():
    class ConvWithAHelper(nn.Conv2d):  # as torchvision's Conv3DSimple: adds a method, same forward
        @staticmethod
        def helper() -> int:
            return 1

    class ConvThatComputesMore(nn.Conv2d):  # may do anything in forward: no rule until registered
        def forward(self, x):
            return super().forward(x).relu()

    class ConvWithOwnConvForward(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, weight, bias) + 1.0

    assert kind_of(nn.Sequential(ConvWithAHelper(2, 2, 1)), "_0") is Kind.ABSORB
    assert kind_of(nn.Sequential(ConvThatComputesMore(2, 2, 1)), "_0") is None
    assert kind_of(nn.Sequential(ConvWithOwnConvForward(2, 2, 1)), "_0") is None


def test_timm_batchnormact_subclasses_bn_but_is_no_batchnorm_rule():
    layers = pytest.importorskip("timm.layers")
    assert issubclass(layers.BatchNormAct2d, nn.BatchNorm2d)
    assert layers.BatchNormAct2d not in BATCHNORM_MODULES and layers.BatchNormAct2d not in _RULES


def test_timm_conv2dsame_absorbs_and_folds():
    layers = pytest.importorskip("timm.layers")
    assert kind_of(nn.Sequential(layers.Conv2dSame(2, 2, 3)), "_0") is Kind.ABSORB
    assert layer_spec(layers.Conv2dSame(2, 2, 3)).folds_bn


def test_register_rule_makes_a_custom_module_an_activation(monkeypatch):
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    monkeypatch.setitem(_RULES, Square, _RULES[nn.ReLU])  # restored after the test
    del _RULES[Square]
    register_rule(Square, "activation", name="square")
    gm = leaf_traced(nn.Sequential(Square()))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert is_kind(gm, node, Kind.ACTIVATION) and rule_for(gm, node).name == "square"
    assert not is_kind(gm, node, Kind.ABSORB)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError):
        register_rule(nn.Tanhshrink, "not-a-kind")
    assert nn.Tanhshrink not in _RULES


def test_placeholders_and_outputs_have_no_rule():
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    assert [rule_for(gm, n) for n in gm.graph.nodes if n.op in ("placeholder", "output")] == [None, None]

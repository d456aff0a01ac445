"""One registry: op -> what it does to a linked tensor.

Keys are exact module types (a subclass such as timm's ``BatchNormAct2d`` does *not*
inherit its parent's rule), functions by identity, and method names. Conv / linear layers
(``absorb``) come from the layer registry, :mod:`lnconvert.layers`, which also says how
their weights read their input. Handlers are
stateless; per-node state lives in the plan. Anything without a rule is a ``slice``
boundary: exact, and listed in the report.

Users add their own modules with :func:`register_rule` (e.g. a custom activation).
"""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .layers import layer_spec, lookup_type
from .nn import ChannelAffine, ReLURenorm


class Kind(enum.Enum):
    ACTIVATION = "activation"        # elementwise g(x); may be linked
    ABSORB = "absorb"                # conv / linear: widened, twin weights zero
    PASS = "pass"                    # channel-wise op, layout unchanged
    CHANNEL_PARAMS = "channel_params"  # channel-wise op with per-channel params: duplicated
    FLATTEN = "flatten"              # flatten the channel axis with trailing dims
    BINARY = "binary"                # add / mul / sub / div
    CAT = "cat"                      # concatenation
    REDUCE = "reduce"                # mean / sum / max over non-channel dims
    SPLIT = "split"                  # chunk / split into pieces along an axis
    INDEX = "index"                  # x[...] basic slicing


@dataclass(frozen=True)
class Rule:
    kind: Kind
    name: str = ""  # activations: canonical name used by the ``activations=`` filter
    op: str = ""    # binary ops: "add" | "mul" | "sub" | "div"


_RULES: dict[Any, Rule] = {}


def register_rule(key: Any, kind: Kind | str, *, name: str = "", op: str = "") -> None:
    """Register how ``key`` (a module type, a function, or a method name) treats channels.

    Example: ``register_rule(MyAct, "activation", name="myact")`` lets lnconvert link
    ``MyAct`` wherever the tracer keeps it as a leaf module.
    """
    _RULES[key] = Rule(Kind(kind), name, op)


def layer_type(module: nn.Module) -> type:
    """The type the rules see for ``module``: its own, or the registered base whose computation
    it inherits unchanged (:func:`lnconvert.layers.lookup_type`)."""
    return lookup_type(type(module), _RULES)


def rule_for(gm: fx.GraphModule, node: fx.Node) -> Rule | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if layer_spec(module) is not None:  # conv / linear layers: the layer registry
            return _ABSORB_RULE
        rule = _RULES.get(layer_type(module))
        return rule if rule is not None or not is_frozen_batchnorm(module) else _FROZEN_BATCHNORM_RULE
    if node.op in ("call_function", "call_method"):
        try:
            return _RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def is_kind(gm: fx.GraphModule, node: fx.Node, kind: Kind) -> bool:
    rule = rule_for(gm, node)
    return rule is not None and rule.kind is kind


# --- activations ---------------------------------------------------------------
ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu",
    nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu", nn.SiLU: "silu", nn.GELU: "gelu",
    nn.Hardswish: "hardswish", nn.Hardtanh: "hardtanh", nn.Mish: "mish", nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid",
}
ALIASES = {"swish": "silu"}


def _timm_activations() -> dict[type, str]:
    try:
        from timm.layers import activations as A
        from timm.layers import activations_me as M
    except ImportError:  # timm is optional at run time
        return {}
    table = {
        A.Swish: "silu", A.Mish: "mish", A.Sigmoid: "sigmoid", A.Tanh: "tanh",
        A.HardSwish: "hardswish", A.HardSigmoid: "hardsigmoid", A.HardMish: "hardmish",
        A.GELU: "gelu", A.GELUTanh: "gelu", A.QuickGELU: "quick_gelu", A.PReLU: "prelu",
    }
    for cls_name, act in (("SwishMe", "silu"), ("MishMe", "mish"), ("HardSwishMe", "hardswish"),
                          ("HardSigmoidMe", "hardsigmoid"), ("HardMishMe", "hardmish")):
        if hasattr(M, cls_name):
            table[getattr(M, cls_name)] = act
    return table


ACTIVATION_MODULES.update(_timm_activations())
ACTIVATION_NAMES = frozenset(ACTIVATION_MODULES.values())
for _t, _n in ACTIVATION_MODULES.items():
    register_rule(_t, Kind.ACTIVATION, name=_n)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


# Functional / method activations -> equivalent module (built from the call's arguments).
# The inplace flag is dropped: the modularised call is out of place and
# ``modularize_activations`` redirects later readers of the input instead.
FUNCTIONAL_ACTIVATIONS: dict[Any, Callable[[tuple, dict], nn.Module]] = {}


def _functional(keys: tuple, factory: Callable[[tuple, dict], nn.Module]) -> None:
    for key in keys:
        FUNCTIONAL_ACTIVATIONS[key] = factory


_functional((F.relu, torch.relu, "relu", F.relu_, torch.relu_, "relu_"), lambda a, k: nn.ReLU())
_functional((F.relu6,), lambda a, k: nn.ReLU6())
_functional((F.leaky_relu, F.leaky_relu_, "leaky_relu", "leaky_relu_"),
            lambda a, k: nn.LeakyReLU(_arg(a, k, 1, "negative_slope", 0.01)))
_functional((F.elu, F.elu_), lambda a, k: nn.ELU(_arg(a, k, 1, "alpha", 1.0)))
_functional((F.selu, torch.selu, torch.selu_, F.selu_), lambda a, k: nn.SELU())
_functional((F.celu, F.celu_, torch.celu, torch.celu_), lambda a, k: nn.CELU(_arg(a, k, 1, "alpha", 1.0)))
_functional((F.silu,), lambda a, k: nn.SiLU())
_functional((F.gelu,), lambda a, k: nn.GELU(approximate=_arg(a, k, 1, "approximate", "none")))
_functional((F.hardswish,), lambda a, k: nn.Hardswish())
_functional((F.hardsigmoid,), lambda a, k: nn.Hardsigmoid())
_functional((F.hardtanh, F.hardtanh_),
            lambda a, k: nn.Hardtanh(_arg(a, k, 1, "min_val", -1.0), _arg(a, k, 2, "max_val", 1.0)))
_functional((F.mish,), lambda a, k: nn.Mish())
_functional((torch.tanh, F.tanh, "tanh", "tanh_", torch.tanh_), lambda a, k: nn.Tanh())
_functional((torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_", torch.sigmoid_), lambda a, k: nn.Sigmoid())


_INPLACE_OPERATORS = (operator.iadd, operator.imul, operator.isub, operator.itruediv)


def is_inplace_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does this node write into its first input (``x.relu_()``, ``ReLU(inplace=True)``, ...)?"""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


# --- batch norm ------------------------------------------------------------------
# SyncBatchNorm computes an ordinary BatchNorm in eval mode (it syncs batch statistics in training only)
BATCHNORM_MODULES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                                       FrozenBatchNorm2d)
for _t in BATCHNORM_MODULES + (ChannelAffine,):
    register_rule(_t, Kind.CHANNEL_PARAMS)
_FROZEN_BATCHNORM_RULE = Rule(Kind.CHANNEL_PARAMS)
_BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm with fixed statistics and affine under any class name: ``weight``, ``bias``,
    ``running_mean`` and ``running_var`` are 1-D floating-point *buffers* of one length and
    ``eps`` a number, with no parameters and no submodules (torchvision's FrozenBatchNorm2d,
    detectron2's, most detection code's). Nothing in it can use batch statistics, and a module
    with children (timm's FrozenBatchNormAct2d adds an activation) is not one."""
    if not isinstance(getattr(module, "running_var", None), torch.Tensor):  # the common case, answered first
        return False
    buffers = dict(module.named_buffers(recurse=False))
    tensors = [buffers.get(name) for name in _BATCHNORM_TENSORS]
    if any(t is None or t.dim() != 1 or not t.is_floating_point() for t in tensors):
        return False
    return (len({t.numel() for t in tensors}) == 1 and isinstance(getattr(module, "eps", None), (int, float))
            and next(module.parameters(recurse=False), None) is None and next(module.children(), None) is None)


def is_batchnorm(module: nn.Module) -> bool:
    """The one definition of a BatchNorm lnconvert removes: the exact ``nn.BatchNorm1d/2d/3d``
    types (a subclass may do more, e.g. add an activation) or a frozen BatchNorm of any class."""
    return layer_type(module) in BATCHNORM_MODULES or is_frozen_batchnorm(module)


def is_batchnorm_like(module: nn.Module) -> bool:
    """A BatchNorm, or a subclass of the nn types that may do more (timm's BatchNormAct2d, split
    by the decompose_normact pass where it is traced): what counts as BatchNorm left in a model."""
    return isinstance(module, BATCHNORM_MODULES) or is_frozen_batchnorm(module)


def batchnorm_channels(module: nn.Module) -> int:
    """Channels a BatchNorm normalises (frozen ones may not store ``num_features``)."""
    stats = module.running_mean if getattr(module, "running_mean", None) is not None else module.weight
    return stats.numel() if stats is not None else module.num_features


def batchnorm_statistics(module: nn.Module) -> tuple[str, ...]:
    """Names of the tensors defining a BatchNorm's eval function (checked for NaN/Inf)."""
    return _BATCHNORM_TENSORS if is_frozen_batchnorm(module) else ("running_mean", "running_var")

# --- absorbing consumers: every type in the layer registry (lnconvert.layers) -------------
_ABSORB_RULE = Rule(Kind.ABSORB)

# --- pass-through ------------------------------------------------------------------
PAD_MODULES = (
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)
_PASS_MODULES = PAD_MODULES + (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    ReLURenorm,  # elementwise and constant: the same on primaries and twins
)
_PASS_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.interpolate, F.pad, torch.clone,
)
try:
    from timm.layers import AvgPool2dSame, MaxPool2dSame

    _PASS_MODULES += (AvgPool2dSame, MaxPool2dSame)
except ImportError:
    pass
for _t in _PASS_MODULES + _PASS_FUNCTIONS + ("contiguous", "clone", "float", "detach"):
    register_rule(_t, Kind.PASS)

for _t in (torch.flatten, "flatten", nn.Flatten, "view", "reshape", torch.reshape):
    register_rule(_t, Kind.FLATTEN)

for _op, _keys in {
    "add": (operator.add, operator.iadd, torch.add, "add", "add_"),
    "mul": (operator.mul, operator.imul, torch.mul, "mul", "mul_"),
    "sub": (operator.sub, operator.isub, torch.sub, "sub", "sub_"),
    "div": (operator.truediv, operator.itruediv, torch.div, "div", "div_"),
}.items():
    for _t in _keys:
        register_rule(_t, Kind.BINARY, op=_op)

CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)  # three aliases, three distinct objects
for _t in CAT_FUNCTIONS:
    register_rule(_t, Kind.CAT)
for _t in ("mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin):
    register_rule(_t, Kind.REDUCE)
for _t in ("chunk", torch.chunk, "split", torch.split):
    register_rule(_t, Kind.SPLIT)
register_rule(operator.getitem, Kind.INDEX)
TRANSPOSES = (torch.transpose, "transpose")

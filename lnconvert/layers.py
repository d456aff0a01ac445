"""One registry of the layers lnconvert rewrites: how each layer type's weight reads its input.

Every pass, compaction, fine-tuning and the cost counts ask :func:`layer_spec` instead of
testing types: a :class:`LayerSpec` says which weight axis holds the input channels, whether
that axis is per group, which input-tensor axis carries channels, whether a BatchNorm after
it folds into it, and its NormProp / LCW forms. Three families cover torch's layers (dense
and grouped convolutions, transposed convolutions, linear layers); a new layer type is one
:func:`register_layer` call with the family it computes like (plus its tests), e.g.
``register_layer(MyConv2d, CONV)`` for a conv subclass with its own ``forward`` that still
computes ``conv(x, weight) + bias``. Layers lnconvert defines register themselves where they
are defined (the NormProp layers and their forms: :mod:`lnconvert.nn.normprop`), so this module
imports nothing of lnconvert's.

Lookup is by exact type, or by the registered base of a subclass that inherits the base's
computation unchanged (:func:`lookup_type`): a subclass that overrides ``forward`` may compute
something else and needs an entry of its own.

The metadata keys every pass shares live here too, as named constants.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, TypeVar

import torch
from torch import nn

# --- metadata keys -------------------------------------------------------------------
LAYOUT = "lnc_layout"          # node.meta: Layout of a linked activation's output (link pass)
IN_LAYOUT = "lnc_in_layout"    # node.meta: Layout of the linked input a widened node reads
FOLDED_BN = "lnc_folded_bn"    # node.meta: the BatchNorm folded into this conv / linear (read by normprop)
TWIN_BUFFER = "lnc_twin_channels"  # module buffer: physical input channels holding twins (widen pass)

# the methods through which an nn layer computes: a subclass that overrides none of them computes
# what its base computes
_COMPUTING_METHODS = ("forward", "_conv_forward")

K = TypeVar("K")


def lookup_type(cls: type, registry: Mapping[K, object]) -> type:
    """The key ``registry`` knows ``cls`` by: ``cls`` itself, or, for an unregistered subclass that
    inherits its registered base's computation unchanged (torchvision's ``Conv3DSimple`` only adds
    a static method to ``nn.Conv3d``), that base. A subclass that overrides ``forward`` (timm's
    ``BatchNormAct2d`` adds an activation) keeps its own type and needs an entry of its own."""
    if cls in registry:
        return cls
    for base in cls.__mro__[1:]:
        if base in registry:
            inherited = all(getattr(cls, m, None) is getattr(base, m, None) for m in _COMPUTING_METHODS)
            return base if inherited else cls
    return cls


@dataclass(frozen=True)
class LayerSpec:
    """How one layer type's ``weight`` reads its input channels, and what the strategies make of it.

    ``weight_in_axis``: the weight axis indexed by input channel (1 for ``(out, in/groups, *k)``
    convs and ``(out, in)`` linears, 0 for ``(in, out/groups, *k)`` transposed convs).
    ``grouped_input``: that axis holds only one group's channels (a grouped conv's filter spans
    its own group), so a column index is local to the group of the output row.
    ``input_channel_axis``: the axis of the *input tensor* holding channels (1, or -1 for a
    linear layer, which reads the last axis).
    """

    family: str
    in_attr: str
    out_attr: str
    weight_in_axis: int
    grouped_input: bool
    input_channel_axis: int
    # weight shaped for scaling along its output-channel axis by a per-output-channel vector
    out_channel_view: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    # MACs per sample that one input channel costs: (module, input shape, output shape) -> int
    macs_per_input_channel: Callable[[nn.Module, tuple, tuple], int]
    folds_bn: bool = True        # a following eval-mode BatchNorm folds into weight and bias
    feature_maps: bool = True    # its output has spatial axes (Deep Control's per-map mean exists)
    lcw: bool = True             # Linearly Constrained Weights apply (zero sum per output unit)
    normprop: type | None = None  # its NormProp form (a class with ``from_layer``), if any

    def in_channels(self, module: nn.Module) -> int:
        return getattr(module, self.in_attr)

    def out_channels(self, module: nn.Module) -> int:
        return getattr(module, self.out_attr)

    def set_in_channels(self, module: nn.Module, width: int) -> None:
        setattr(module, self.in_attr, width)

    def groups(self, module: nn.Module) -> int:
        return getattr(module, "groups", 1)

    def input_channel_dim(self, ndim: int) -> int:
        """The channel axis of an ``ndim``-dimensional input."""
        return ndim - 1 if self.input_channel_axis == -1 else self.input_channel_axis

    def macs(self, module: nn.Module, in_shape: tuple, out_shape: tuple) -> int:
        """Multiply-accumulates per sample."""
        return self.macs_per_input_channel(module, in_shape, out_shape) * self.in_channels(module)


def _trailing_ones(weight: torch.Tensor, lead: int) -> tuple[int, ...]:
    return (1,) * (weight.dim() - lead)


def _rows_view(module: nn.Module, scale: torch.Tensor) -> torch.Tensor:
    """Output channels are the weight's rows: ``(out, ...)``."""
    return scale.view(-1, *_trailing_ones(module.weight, 1))


def _transposed_view(module: nn.Module, scale: torch.Tensor) -> torch.Tensor:
    """Weight ``(in, out/groups, *k)``: group g's rows read inputs ``g*in/G ...`` and write its
    outputs ``g*out/G + j`` along axis 1."""
    weight, groups = module.weight, module.groups
    per_in, per_out = weight.shape[0] // groups, weight.shape[1]
    ones = _trailing_ones(weight, 2)
    view = scale.view(groups, 1, per_out, *ones)
    return view.expand(groups, per_in, per_out, *ones).reshape(weight.shape[0], per_out, *ones)


def _linear_macs(module: nn.Module, in_shape: tuple, out_shape: tuple) -> int:
    return module.out_features * math.prod(out_shape[1:-1])


def _conv_macs(module: nn.Module, in_shape: tuple, out_shape: tuple) -> int:
    return module.out_channels // module.groups * math.prod(out_shape[2:]) * math.prod(module.kernel_size)


def _transposed_macs(module: nn.Module, in_shape: tuple, out_shape: tuple) -> int:
    return module.out_channels // module.groups * math.prod(in_shape[2:]) * math.prod(module.kernel_size)


# The three families; entries for specific types are these with other NormProp / LCW forms.
CONV = LayerSpec("conv", "in_channels", "out_channels", weight_in_axis=1, grouped_input=True, input_channel_axis=1,
                 out_channel_view=_rows_view, macs_per_input_channel=_conv_macs)
CONV_TRANSPOSE = LayerSpec("conv_transpose", "in_channels", "out_channels", weight_in_axis=0, grouped_input=False,
                           input_channel_axis=1, out_channel_view=_transposed_view,
                           macs_per_input_channel=_transposed_macs, lcw=False)
LINEAR = LayerSpec("linear", "in_features", "out_features", weight_in_axis=1, grouped_input=False,
                   input_channel_axis=-1, out_channel_view=_rows_view, macs_per_input_channel=_linear_macs,
                   feature_maps=False)

_LAYERS: dict[type, LayerSpec] = {}


def register_layer(layer_type: type, spec: LayerSpec) -> None:
    """Register how ``layer_type``'s weight reads its input (one of :data:`CONV`,
    :data:`CONV_TRANSPOSE`, :data:`LINEAR`, possibly ``dataclasses.replace``-d). The type then
    absorbs linked tensors (widened with zero twin columns), stays a leaf when tracing, folds a
    following BatchNorm (``folds_bn``), and is compacted, fine-tuned and counted like its family.
    The layer must keep its weight in ``weight`` and its bias in ``bias`` and compute through them."""
    _LAYERS[layer_type] = spec


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The registered spec of ``module``'s type (see :func:`lookup_type`), or None."""
    return _LAYERS.get(lookup_type(type(module), _LAYERS))


def registered_layers() -> tuple[type, ...]:
    return tuple(_LAYERS)


def add_forms(layer_type: type, **forms: object) -> None:
    """Record strategy forms (``normprop=...``) for a registered type, from where they are
    defined (:mod:`lnconvert.nn.normprop` adds the NormProp forms of torch's layers)."""
    _LAYERS[layer_type] = replace(_LAYERS[layer_type], **forms)


def _register_torch_layers() -> None:
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        register_layer(cls, CONV)
    for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        register_layer(cls, CONV_TRANSPOSE)
    register_layer(nn.Linear, LINEAR)
    try:  # timm's "same"-padded conv pads spatially, then runs an ordinary conv with its own weight
        from timm.layers import Conv2dSame
    except ImportError:
        return
    register_layer(Conv2dSame, CONV)  # no NormProp form: NormPropConv2d would drop the padding


_register_torch_layers()

__all__ = ["CONV", "CONV_TRANSPOSE", "FOLDED_BN", "IN_LAYOUT", "LAYOUT", "LINEAR", "TWIN_BUFFER", "LayerSpec",
           "add_forms", "layer_spec", "lookup_type", "register_layer", "registered_layers"]

"""Layers inserted by the converter, usable in models written from scratch."""
from .affine import ChannelAffine
from .deep_control import DeepControl2d
from .lcw import ZeroSumFanIn, is_lcw, lcw
from .linked import (
    POLICIES,
    ChannelExpand,
    ChannelSelect,
    GatedMerge,
    LinkedActivation,
    LinkedELU,
    LinkedGELU,
    LinkedPReLU,
    LinkedReLU,
    LinkedSELU,
    LinkedSiLU,
)
from .normprop import (
    NORMPROP_C,
    NormPropConv1d,
    NormPropConv2d,
    NormPropConv3d,
    NormPropLinear,
    ReLURenorm,
    normprop_from,
)

__all__ = ["NORMPROP_C", "POLICIES", "ChannelAffine", "ChannelExpand", "ChannelSelect", "DeepControl2d", "GatedMerge",
           "LinkedActivation", "LinkedELU", "LinkedGELU", "LinkedPReLU", "LinkedReLU", "LinkedSELU", "LinkedSiLU",
           "NormPropConv1d", "NormPropConv2d", "NormPropConv3d", "NormPropLinear", "ReLURenorm", "ZeroSumFanIn",
           "is_lcw", "lcw", "normprop_from"]

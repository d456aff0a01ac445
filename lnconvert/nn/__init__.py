"""Layers inserted by the converter, usable in models written from scratch."""
from .linked import (
    POLICIES,
    ChannelAffine,
    ChannelExpand,
    ChannelSelect,
    GatedMerge,
    LinkedActivation,
)

__all__ = ["POLICIES", "ChannelAffine", "ChannelExpand", "ChannelSelect", "GatedMerge", "LinkedActivation"]

"""Odd models for the bad-input catalogue, loadable by the CLI as ``tests.bad_models:NAME``."""
from __future__ import annotations

import os
import time

import torch
from torch import nn

from lnconvert.testing import randomize_batchnorm

SIZE = (3, 16, 16)


def small(in_channels: int = 3, track_running_stats: bool = True) -> nn.Module:
    """conv-BN-ReLU-conv-BN-ReLU-pool-linear, the same weights at every call (so the CLI's
    copy and the test's match), randomised BN statistics, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = _small(in_channels, track_running_stats)
    randomize_batchnorm(net, torch.randn(8, in_channels, *SIZE[1:], generator=torch.Generator().manual_seed(0)))
    return net


def _small(in_channels: int, track_running_stats: bool) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1),
                         nn.BatchNorm2d(6, track_running_stats=track_running_stats),
                         nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def one_channel() -> nn.Module:
    return small(in_channels=1)


def no_running_stats() -> nn.Module:
    return small(track_running_stats=False)


def training() -> nn.Module:
    return small().train()


def half() -> nn.Module:
    return small().half()


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # control flow on a tensor value: fx cannot trace it


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.gate, self.head = small(), DataDependent(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gate(self.body(x)))


def untraceable() -> nn.Module:
    return Untraceable().eval()


class Slow(nn.Module):
    """Sleeps in every forward and touches ``$LNC_TEST_MARKER`` once running: a long conversion to interrupt."""

    def __init__(self):
        super().__init__()
        self.body = small()

    def forward(self, x):
        marker = os.environ.get("LNC_TEST_MARKER")
        if marker:
            open(marker, "w").close()
        time.sleep(0.5)
        return self.body(x)


def slow() -> nn.Module:
    return Slow().eval()



class TracedOtherwise(nn.Module):
    """Traces, but its traced graph fails on the inputs the model runs on: its code takes another
    path for fx's proxies (as code special-casing tracing does), which reshapes wrongly."""

    def __init__(self):
        super().__init__()
        self.body, self.head = small(), nn.Linear(4, 2)

    def forward(self, x):
        y = self.body(x)
        if isinstance(y, torch.fx.Proxy):
            y = y.view(-1, 8)
        return self.head(y)


def traced_otherwise() -> nn.Module:
    return TracedOtherwise().eval()

"""Frozen BatchNorms (torchvision's FrozenBatchNorm2d, detectron2-style classes) fold like BatchNorm."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import lnconvert
from lnconvert.errors import UnsupportedModelError
from lnconvert.rules import is_batchnorm, is_frozen_batchnorm
from lnconvert.testing import randomize_batchnorm
from tests.helpers import assert_exact


class Detectron2FrozenBN(nn.Module):
    """detectron2's FrozenBatchNorm2d as written there: buffers only, and a branch on a tensor
    attribute that fx cannot trace through (so it must be a leaf)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0 - eps)):
            self.register_buffer(name, torch.full((num_features,), value))

    def forward(self, x):
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ActAfterNorm(nn.Module):
    """Has the four buffers but also an activation child: not a BatchNorm."""

    def __init__(self):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.ones(4))
        self.eps, self.act = 1e-5, nn.ReLU()


def conv_frozen(frozen: type, after_add: bool = False) -> nn.Module:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.head = nn.Conv2d(3, 6, 3, padding=1), frozen(6), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            y = y + 1.0 if after_add else y  # an add between conv and norm: nothing to fold into
            return self.head(torch.relu(self.norm(y)))

    return Net().eval()


def test_the_batchnorm_rule():
    assert is_frozen_batchnorm(FrozenBatchNorm2d(4)) and is_frozen_batchnorm(Detectron2FrozenBN(4))
    assert is_batchnorm(nn.BatchNorm2d(4)) and not is_frozen_batchnorm(nn.BatchNorm2d(4))  # parameters
    assert not is_batchnorm(ActAfterNorm()) and not is_batchnorm(nn.Conv2d(3, 4, 1))


@pytest.mark.parametrize("frozen", [FrozenBatchNorm2d, Detectron2FrozenBN])
def test_frozen_bn_after_a_conv_folds_and_verifies(frozen):
    net = conv_frozen(frozen)
    x = torch.randn(2, 3, 12, 12)
    randomize_batchnorm(net, x)
    assert net.norm.running_var.min() < 0.9 or net.norm.running_var.max() > 1.1  # not the identity
    result = assert_exact(net, x)
    assert result.report.status == "exact"
    assert [b["action"] for b in result.report.batchnorm] == ["folded"]
    assert not lnconvert.remaining_batchnorm(result.model)
    assert not any(is_batchnorm(m) for m in result.model.modules())
    assert result.report.max_rel_error <= 1e-5


@pytest.mark.parametrize("frozen", [FrozenBatchNorm2d, Detectron2FrozenBN])
def test_frozen_bn_that_cannot_fold_becomes_an_affine(frozen):
    net = conv_frozen(frozen, after_add=True)
    x = torch.randn(2, 3, 12, 12)
    randomize_batchnorm(net, x)
    result = assert_exact(net, x)
    assert [b["action"] for b in result.report.batchnorm] == ["affine"]
    assert not any(is_batchnorm(m) for m in result.model.modules())


def test_frozen_bn_with_zero_variance_and_no_eps_is_refused():
    net = conv_frozen(FrozenBatchNorm2d)
    net.norm.running_var.zero_()
    net.norm.eps = 0.0
    with pytest.raises(UnsupportedModelError, match="folding BatchNorm 'norm' gives a non-finite weight"):
        lnconvert.convert(net, example_inputs=torch.randn(2, 3, 8, 8))


def test_nan_in_frozen_bn_statistics_is_refused():
    net = conv_frozen(Detectron2FrozenBN)
    net.norm.weight[0] = float("inf")  # a buffer, but one that defines the BatchNorm's function
    with pytest.raises(UnsupportedModelError, match="'norm.weight' contains NaN or Inf"):
        lnconvert.convert(net, example_inputs=torch.randn(2, 3, 8, 8))

import pytest
import torch
from torch import nn

from lnconvert.nn import ChannelAffine, ChannelExpand, ChannelSelect, GatedMerge, LinkedActivation


def test_mirror_is_crelu_for_relu():
    x = torch.tensor([[-2.0, 3.0]])
    out = LinkedActivation(nn.ReLU(), "mirror", dim=1)(x)
    assert torch.equal(out, torch.tensor([[0.0, 3.0, 2.0, 0.0]]))


def test_minmax_twin_is_min_x_0():
    x = torch.tensor([[-2.0, 3.0]])
    out = LinkedActivation(nn.ReLU(), "minmax", dim=1)(x)
    assert torch.equal(out, torch.tensor([[0.0, 3.0, -2.0, 0.0]]))


def test_at_least_one_twin_has_gradient_for_every_input():
    x = torch.randn(64, 8, requires_grad=True)
    LinkedActivation(nn.ReLU(), "mirror")(x).sum().backward()
    assert (x.grad.abs() > 0).all()


def test_prelu_gets_two_independent_parameter_copies():
    linked = LinkedActivation(nn.PReLU(4, init=0.1), "mirror")
    assert linked.twin_act is not None
    assert linked.twin_act.weight is not linked.act.weight
    linked.twin_act.weight.data.fill_(0.5)
    x = -torch.ones(1, 4)
    out = linked(x)
    assert torch.allclose(out[:, :4], torch.full((1, 4), -0.1)) and torch.allclose(out[:, 4:], torch.ones(1, 4))


def test_inplace_activation_is_not_applied_in_place():
    x = torch.randn(2, 3)
    before = x.clone()
    LinkedActivation(nn.ReLU(inplace=True))(x)
    assert torch.equal(x, before)


def test_grouped_layout_interleaves_per_group():
    x = torch.tensor([[1.0, -2.0, 3.0, -4.0]]).view(1, 4, 1, 1)
    out = LinkedActivation(nn.ReLU(), "mirror", dim=1, groups=2)(x).flatten()
    # group 0: primaries (1, 0), twins (0, 2); group 1: primaries (3, 0), twins (0, 4)
    assert out.tolist() == [1.0, 0.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]


def test_unknown_policy_refused():
    with pytest.raises(ValueError, match="unknown policy"):
        LinkedActivation(nn.ReLU(), "both")


def test_channel_modules():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert ChannelSelect([0, 1, 2])(x).flatten().tolist() == [0.0, 1.0, 2.0]
    assert ChannelSelect([4, 0])(x).flatten().tolist() == [4.0, 0.0]
    assert ChannelExpand([0, 1, 0, 1])(torch.tensor([[5.0, 7.0]])).tolist() == [[5.0, 7.0, 5.0, 7.0]]
    merge = GatedMerge([0, 1, 2], [3, 4, 5])
    assert merge(x).flatten().tolist() == [0.0, 1.0, 2.0]  # gate starts at 0
    merge.gate.data.fill_(1.0)
    assert merge(x).flatten().tolist() == [3.0, 5.0, 7.0]
    affine = ChannelAffine(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0]))
    assert affine(torch.ones(1, 2, 1, 1)).flatten().tolist() == [3.0, 3.0]

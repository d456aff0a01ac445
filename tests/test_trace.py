"""trace: forward arguments beyond the example inputs are fixed to their defaults."""
import pytest
import torch
from torch import nn

import lnconvert
from lnconvert.errors import TraceError
from lnconvert.testing import randomize_batchnorm
from lnconvert.trace import defaults_beyond, trace


class OptionalArguments(nn.Module):
    """An optional mask (hiera's ``forward(x, mask=None)``), a default scale and a keyword-only flag."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x, mask=None, scale: float = 2.0, *, flag: bool = True):
        y = torch.relu(self.bn(self.conv(x)))
        if mask is not None:
            y = y * mask.view(-1, 1, 1, 1)
        return y * scale if flag else y


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = OptionalArguments().eval()
    randomize_batchnorm(net, torch.randn(4, 3, 6, 6))
    return net


def test_arguments_beyond_the_example_inputs_keep_their_defaults(model):
    x = torch.randn(2, 3, 6, 6)
    gm = trace(model, inputs=1)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]  # no guards left for them
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    result = lnconvert.convert(model, example_inputs=x)
    assert result.report.status == "exact" and result.report.max_rel_error <= 1e-5


def test_given_arguments_stay_inputs(model):
    x, mask = torch.randn(2, 3, 6, 6), torch.rand(2)
    gm = trace(model, inputs=2)  # mask given: traced as a graph input, the rest fixed
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    torch.testing.assert_close(gm(x, mask), model(x, mask), rtol=0, atol=0)
    assert defaults_beyond(model, 2) == {"scale": 2.0, "flag": True}


def test_without_a_count_optional_arguments_are_graph_inputs(model):
    """What fx does by itself (why the count is needed): each optional argument is a Proxy, so
    ``if flag`` cannot be traced (and ``if mask is not None`` would take the masked branch)."""
    with pytest.raises(TraceError, match="data-dependent control flow"):
        trace(model)

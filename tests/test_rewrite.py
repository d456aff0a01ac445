"""rewrite: dead-code elimination keeps calls that write into their arguments."""
import copy

import torch
from torch import fx, nn

from lnconvert.rewrite import eliminate_dead_code

from .helpers import assert_exact


def _add_in_place(x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    x.add_(shortcut)  # as torchvision's MViT ``_add_shortcut``: the caller ignores the result
    return x


torch.fx.wrap("_add_in_place")


class AddsInPlace(nn.Module):
    """Conv-BN-ReLU, then a wrapped function and a method that mutate tensors whose results
    nothing reads, and a dead pure op."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.proj = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        z = self.proj(y)
        _add_in_place(z, y)
        z.mul_(2.0)
        torch.flatten(z, 1)  # dead and pure
        return self.head(z)


def _calls(gm: fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}


def test_dead_code_elimination_keeps_writes_into_arguments_and_removes_pure_dead_ops():
    model = AddsInPlace().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = fx.symbolic_trace(model)
    plain = copy.deepcopy(gm)
    plain.graph.eliminate_dead_code()  # torch.fx's own: drops both writes
    plain.recompile()
    assert not {_add_in_place, "mul_"} & _calls(plain)
    assert (plain(x) - model(x)).abs().max() > 1e-2
    eliminate_dead_code(gm)
    gm.recompile()
    assert {_add_in_place, "mul_"} <= _calls(gm) and torch.flatten not in _calls(gm)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_a_model_writing_through_a_wrapped_function_converts_exactly():
    torch.manual_seed(0)
    model = AddsInPlace().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    result = assert_exact(model, torch.randn(2, 3, 6, 6))
    assert result.report.status == "exact" and not result.report.warnings


import torch
from torch import nn

import lnconvert


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_exact(model: nn.Module, x, atol: float = 1e-5, rtol: float = 1e-5, **options):
    """Convert, then check independently of the report: float32 outputs agree within
    atol/rtol; the input model's weights and mode are unchanged; returns the result."""
    before, training = state_copy(model), model.training
    result = lnconvert.convert(model, example_inputs=x, **options)
    assert result.report.status in ("exact", "partial")
    with torch.no_grad():
        model.eval()
        inputs = x if isinstance(x, tuple) else (x,)
        expected = model(*inputs)
        got = result.model.eval()(*inputs)
        model.train(training)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "input model was mutated"
    return result


def linked(result) -> list[dict]:
    return [a for a in result.report.activations if a["action"] == "linked"]


def modules_of(gm, kind) -> list:
    return [m for m in gm.modules() if type(m) is kind]


TINY = "tests.helpers:tiny_net"  # a module:callable model source, so the CLI and saved specs can name it


def tiny_net() -> nn.Module:
    """Dense and depthwise convs with BN, a linked ReLU and Hardswish, a pooled linear head (3x16x16 in)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Hardswish(),
                         nn.Conv2d(8, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))

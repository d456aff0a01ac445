"""Parity on real architectures with randomised BN statistics (64x64 inputs to stay fast).

The conversion check inside ``convert`` is repeated here independently: both models are
evaluated in float64 (see lnconvert.verify for why) and in float32.
"""
import copy

import pytest
import torch
import torchvision

import lnconvert
from lnconvert.verify import parity

from .conftest import prepared

# One model of each structure in the default run (residual, depthwise + SE + hardswish, channel
# split/shuffle, grouped convs, concat branches); the larger models of the same kinds run in the
# slow stage (.ci/slow), and the whole zoo through `lnconvert zoo`.
SLOW = pytest.mark.slow
TORCHVISION = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "regnet_x_400mf", "squeezenet1_0",
               *(pytest.param(name, marks=SLOW) for name in ("resnet50", "mobilenet_v2", "efficientnet_b0",
                                                             "densenet121", "vgg11_bn", "googlenet", "mnasnet0_5"))]
TIMM = ["mobilenetv3_small_050", "ghostnet_100",
        *(pytest.param(name, marks=SLOW) for name in ("resnet18d", "efficientnet_b0", "regnetx_002", "dla34",
                                                      "cspdarknet53"))]
TOLERANCE = 1e-5


def check(model, x):
    result = lnconvert.convert(model, example_inputs=x, tolerance=TOLERANCE)
    report = result.report
    assert report.status == "exact", report.status_reasons
    assert not lnconvert.remaining_batchnorm(result.model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in result.model.modules())
    assert any(a["action"] == "linked" for a in report.activations)
    with torch.no_grad():
        wide_ref = copy.deepcopy(model).double()
        wide_new = copy.deepcopy(result.model).double()
        _, rel64 = parity(wide_ref(x.double()), wide_new(x.double()))
        _, rel32 = parity(model(x), result.model(x))
        _, floor32 = parity(wide_ref(x.double()), model(x))
    assert rel64 <= TOLERANCE
    # float32: within the original's own float32 rounding noise (x4) or the tolerance
    assert rel32 <= max(TOLERANCE, 4 * floor32)
    return report


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_parity(name):
    kwargs = {"init_weights": True} if name == "googlenet" else {}
    model, x = prepared(torchvision.models.get_model(name, **kwargs))
    report = check(model, x)
    assert report.macs_after > report.macs_before


@pytest.mark.parametrize("name", TIMM)
def test_timm_parity(name):
    timm = pytest.importorskip("timm")
    model, x = prepared(timm.create_model(name, pretrained=False))
    check(model, x)

"""ONNX export and ONNX Runtime parity against the original PyTorch model."""
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import lnconvert
from lnconvert.cli import app
from lnconvert.export import export_onnx, session, verify_onnx
from lnconvert.nn import (
    ChannelAffine,
    ChannelExpand,
    ChannelSelect,
    DeepControl2d,
    GatedMerge,
    LinkedActivation,
    LinkedSELU,
    NormPropConv2d,
    NormPropLinear,
    ReLURenorm,
    lcw,
)

from .conftest import prepared
from .helpers import TINY, tiny_net

# dense by default; depthwise with SE and hardswish, SiLU with SE, timm and the rest in the slow stage
MODELS = ["resnet18",  # depthwise, SE and hardswish lowering: small nets in tests/passes/test_lower_linked.py
          *(pytest.param(name, marks=pytest.mark.slow)  # 10-20 s each: the slow stage
            for name in ("mobilenet_v3_small", "efficientnet_b0", "timm/mobilenetv3_small_050", "densenet121",
                         "shufflenet_v2_x0_5", "timm/resnet18d"))]


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_in_ort_matches_the_original(tmp_path, name):
    model, x = prepared(lnconvert.load_model(name))
    result = lnconvert.convert(model, example_inputs=x)
    path = export_onnx(result, tmp_path / "m.onnx")
    rows = verify_onnx(path, model, batch_sizes=(1, 4))
    assert {r.inputs for r in rows} == {"random batch 1", "random batch 4"}
    assert all(r.ok for r in rows), rows
    assert max(r.max_rel for r in rows) < 1e-4  # and in absolute terms, float32-level
    proto = onnx.load(path)
    assert {op.domain for op in proto.graph.node} <= {"", "ai.onnx"}  # no custom ops
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["status"] == "exact" and meta["lnconvert_version"] == lnconvert.__version__
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch axis


class Wrap(nn.Module):
    def __init__(self, module, pre=None):
        super().__init__()
        self.module, self.pre = module, pre

    def forward(self, x):
        return self.module(x if self.pre is None else self.pre(x))


MODULES = {
    "linked-relu-mirror": (LinkedActivation(nn.ReLU()), 4),
    "linked-relu-minmax": (LinkedActivation(nn.ReLU(), "minmax"), 4),
    "linked-prelu": (LinkedActivation(nn.PReLU(4)), 4),
    "linked-silu-grouped": (LinkedActivation(nn.SiLU(), groups=2), 4),
    "linked-relu-subset": (LinkedActivation(nn.ReLU(), twin_channels=[0, 3]), 4),
    "affine": (ChannelAffine(torch.randn(4), torch.randn(4)), 4),
    "select-prefix": (ChannelSelect([0, 1, 2]), 6),
    "select-gather": (ChannelSelect([4, 0, 2]), 6),
    "expand": (ChannelExpand([0, 1, 0, 1]), 2),
    "gate": (GatedMerge([0, 1], [2, 3]), 4),
    "gate-partial": (GatedMerge([0, 1, 2], [3, -1, 4]), 5),
    "linked-selu": (LinkedSELU(), 4),
    "normprop-conv": (NormPropConv2d(4, 3, 3, padding=1), 4),
    "normprop-linear": (NormPropLinear(5, 3), 4),  # on the last axis
    "relu-renorm": (ReLURenorm(), 4),
    "deep-control": (DeepControl2d(4), 4),
    "lcw-conv": (lcw(nn.Conv2d(4, 3, 3, groups=1)), 4),  # exported with the constraint baked into the weight
}


@pytest.mark.parametrize("kind", list(MODULES))
def test_each_inserted_module_exports_to_plain_onnx(tmp_path, kind):
    module, channels = MODULES[kind]
    for param in module.parameters():  # non-trivial values (gates start at 0)
        param.data.uniform_(0.2, 1.0)
    model = Wrap(module).eval()
    x = torch.randn(2, channels, 5, 5)
    path = export_onnx(model, tmp_path / "m.onnx", example_inputs=(x,))
    sess = session(path)
    for batch in (x, torch.randn(3, channels, 5, 5)):
        got = sess.run(None, {sess.get_inputs()[0].name: batch.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(batch).numpy(), rtol=1e-6, atol=1e-6)
    ops = Counter(n.op_type for n in onnx.load(path).graph.node)
    if kind == "linked-relu-mirror":
        assert set(ops) == {"Relu", "Neg", "Concat"}  # lean: no reshapes for the block layout
    if kind == "select-prefix":
        assert "Gather" not in ops  # a contiguous range is a Slice
    if kind == "lcw-conv":
        assert set(ops) == {"Conv"}  # no ReduceMean/Sub recomputing the projection at every run


def test_verify_onnx_catches_a_broken_export(tmp_path):
    model, x = prepared(tiny_net(), shape=(2, 3, 16, 16))  # a small net: the check, not the model, is tested
    weights = tmp_path / "original.pth"
    torch.save(model.state_dict(), weights)
    result = lnconvert.convert(model, example_inputs=x)
    good = export_onnx(result, tmp_path / "good.onnx")
    proto = onnx.load(good)
    init = next(i for i in proto.graph.initializer if len(i.dims) == 4)  # a conv weight
    array = onnx.numpy_helper.to_array(init) * 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, broken)

    def run(path):  # in-process: exit codes and streams as in a shell
        return CliRunner().invoke(app, ["verify-onnx", str(path), "--reference", TINY, "--weights", str(weights)])

    assert run(good).exit_code == 0
    result = run(broken)
    assert result.exit_code == 5 and "NO" in result.stdout
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1

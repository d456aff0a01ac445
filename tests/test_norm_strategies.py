"""The normalisation strategies as conversions: convert(norm="normprop" | "deep-control",
lcw=True), with and without linking, on a small net that has every BN placement, and at
zoo scale (resnet18, mobilenet_v2) in PyTorch and ONNX Runtime."""
import copy

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import lnconvert
from lnconvert.cli import app
from lnconvert.errors import UsageError
from lnconvert.export import export_onnx, verify_onnx
from lnconvert.nn import ChannelAffine, DeepControl2d, LinkedActivation, ReLURenorm, is_lcw
from lnconvert.nn.normprop import _NormProp
from lnconvert.testing import randomize_batchnorm
from lnconvert.verify import parity

from .conftest import prepared
from .helpers import assert_exact, modules_of

STRATEGIES = ["normprop", "deep-control"]


class SmallNet(nn.Module):
    """Every BN placement: after a conv feeding a zero-padded conv (bn1), after a conv feeding
    an unpadded 1x1 conv (bn2), after a conv into a residual add (bn3), after the add (bn_add,
    no conv before it) and after a Linear (bn4, no spatial maps)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.skip = nn.Conv2d(3, 8, 1)
        self.bn_add, self.relu3 = nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.bn4, self.relu4 = nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        y = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        s = self.relu3(self.bn_add(self.bn3(self.conv3(y)) + self.skip(x)))
        return self.fc2(self.relu4(self.bn4(self.fc1(self.pool(s).flatten(1)))))


def small_net():
    torch.manual_seed(0)
    net = SmallNet().eval()
    randomize_batchnorm(net, torch.randn(8, 3, 12, 12))
    return net, torch.randn(2, 3, 12, 12)


def actions(report, strategy):
    return {row["layer"]: row["action"] for row in report.norm_layers if row["strategy"] == strategy}


@pytest.mark.parametrize("link,policy", [(False, "mirror"), (True, "mirror"), (True, "minmax")])
def test_normprop_is_exact_and_renormalises_relus_between_normprop_layers(link, policy):
    net, x = small_net()
    result = assert_exact(net, x, link=link, policy=policy, norm="normprop")
    report, gm = result.report, result.model
    assert report.status == "exact" and not lnconvert.remaining_batchnorm(gm)
    layers = {name for name, m in gm.named_modules() if isinstance(m, _NormProp)}
    assert len(layers) == 4  # conv1, conv2, conv3, fc1 had a BN; skip and fc2 did not
    acts = actions(report, "normprop")
    if policy == "minmax":
        assert acts["relu1"] == acts["relu2"] == "not renormalised"  # twins are min(x, 0), not ReLU outputs
        assert not modules_of(gm, ReLURenorm)
        return
    assert acts["relu1"] == acts["relu2"] == "renormalised"
    assert acts["relu4"] == "not renormalised"  # feeds fc2, which had no BN
    assert "relu3" not in acts  # reads the residual add, not a NormProp layer
    assert acts["bn_add"] == "affine"  # no conv/linear before it: a per-channel affine as with fold
    assert len(modules_of(gm, ReLURenorm)) == 2
    # relu1 feeds conv2, which zero-pads: its shift is an explicit per-channel affine;
    # relu2 feeds the unpadded 1x1 conv3: its shift went into conv3's bias
    shifts = [m for m in modules_of(gm, ChannelAffine) if torch.equal(m.scale, torch.ones_like(m.scale))]
    assert len(shifts) == 1 and shifts[0].scale.numel() == (16 if link else 8)
    details = [r["detail"] for r in report.norm_layers if r["layer"] == "relu1"]
    assert details == ["explicit shift (a consumer zero-pads)"]


@pytest.mark.parametrize("link", [False, True])
def test_deep_control_replaces_bns_on_conv_outputs_exactly(link):
    net, x = small_net()
    result = assert_exact(net, x, link=link, norm="deep-control")
    report, gm = result.report, result.model
    controls = modules_of(gm, DeepControl2d)
    assert len(controls) == 3 and all(torch.equal(c.alpha, torch.zeros_like(c.alpha)) for c in controls)
    assert all(c.alpha.requires_grad for c in controls)
    bns = {row["name"]: row["action"] for row in report.batchnorm}
    assert bns == {"bn1": "deep-control", "bn2": "deep-control", "bn3": "deep-control", "bn_add": "affine",
                   "bn4": "folded"}
    assert actions(report, "deep-control") == {"bn1": "deep-control", "bn2": "deep-control", "bn3": "deep-control",
                                               "bn_add": "not applied", "bn4": "not applied"}
    assert bool(modules_of(gm, LinkedActivation)) == link


def test_lcw_reports_its_deviation_instead_of_failing():
    net, x = small_net()
    result = lnconvert.convert(net, example_inputs=x, lcw=True, norm="normprop")
    report, gm = result.report, result.model
    assert report.status == "changed" and "by design" in report.status_reasons[0]
    assert all(p.ok and p.max_rel <= 1e-5 for p in report.parity)  # verified before the projection
    with torch.no_grad():
        measured = parity(copy.deepcopy(net).double()(x.double()), copy.deepcopy(gm).eval().double()(x.double()))[1]
    assert report.lcw_deviation == pytest.approx(measured, rel=1e-6) and measured > 1e-3
    convs = [m for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(report.lcw_layers) == len(convs) == 6 and all(is_lcw(m) for m in convs)
    assert all(0 < row["rel_weight_change"] < 2 for row in report.lcw_layers)
    for module in convs:
        weight = module.weight.detach()
        assert weight.flatten(1).sum(1).abs().max() <= 1e-6 * weight.abs().max()
        twins = getattr(module, "lnc_twin_channels", None)
        if twins is not None:
            # the twins start at zero up to the float32 mean the parametrization subtracts (~1e-9)
            assert weight[:, twins].abs().max() <= 1e-6 * weight.abs().max()


@pytest.mark.parametrize("norm,lcw", [("fold", False), ("normprop", False), ("deep-control", False), ("fold", True)])
def test_one_training_step_at_batch_size_1(norm, lcw):
    net, x = small_net()
    gm = lnconvert.convert(net, example_inputs=x, norm=norm, lcw=lcw).model.train()
    sample = x[:1]
    with torch.no_grad():  # no batch statistics: a sample gives the same output alone or in a batch, in train mode
        torch.testing.assert_close(gm(sample), gm(x)[:1], rtol=1e-5, atol=1e-6)
    # twin learning rates (split twin weights) work with NormProp and Deep Control layers; LCW refuses them (below)
    params = gm.parameters() if lcw else lnconvert.param_groups(gm, base_lr=0.1, twin_lr=0.1)
    before = copy.deepcopy(gm.state_dict())
    opt = torch.optim.SGD(params, lr=0.1)
    loss = nn.functional.cross_entropy(gm(sample), torch.tensor([1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gm.parameters() if p.requires_grad)
    if norm == "deep-control":
        assert any(m.alpha.grad.abs().sum() > 0 for m in modules_of(gm, DeepControl2d))
    if norm == "normprop":
        assert all(m.gamma.grad.abs().sum() > 0 for m in gm.modules() if isinstance(m, _NormProp))
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in gm.state_dict().items())
    if lcw:
        for module in (m for m in gm.modules() if is_lcw(m)):  # float32 rounding relative to the weights' size
            assert module.weight.flatten(1).sum(1).abs().max() <= 1e-6 * max(1.0, module.weight.abs().max())


@pytest.mark.parametrize("norm", STRATEGIES)
def test_compaction_after_a_strategy_gives_back_the_original_cost(norm):
    net, x = small_net()
    result = lnconvert.convert(net, example_inputs=x, norm=norm)
    compacted = lnconvert.compact(result)
    assert compacted.report.macs_after == result.report.macs_before
    assert compacted.report.max_rel_deviation <= 1e-12
    assert not modules_of(compacted.model, LinkedActivation)


def test_compaction_and_twin_groups_refuse_lcw_models():
    net, x = small_net()
    result = lnconvert.convert(net, example_inputs=x, lcw=True)
    with pytest.raises(UsageError, match="does not support LCW"):
        lnconvert.compact(result)
    with pytest.raises(UsageError, match="already has a parametrization"):  # twin learning rates need split weights
        lnconvert.param_groups(result.model, base_lr=1e-3, twin_lr=1e-3)


def test_strategy_options_are_validated():
    net, x = small_net()
    with pytest.raises(UsageError, match="unknown norm strategy"):
        lnconvert.convert(net, example_inputs=x, norm="layernorm")
    with pytest.raises(UsageError, match="cannot be combined with keeping BN"):
        lnconvert.convert(net, example_inputs=x, norm="deep-control", drop_bn=False)


def zoo_conversion(name, norm):
    model, x = prepared(lnconvert.load_model(name))
    result = lnconvert.convert(model, example_inputs=x, norm=norm)
    assert result.report.status == "exact" and not lnconvert.remaining_batchnorm(result.model)
    return model, result


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("norm", STRATEGIES)
def test_zoo_parity_in_pytorch(name, norm):
    model, result = zoo_conversion(name, norm)
    gm, x = result.model, result.example_inputs[0]
    with torch.no_grad():  # independent of the report: float64, both models
        rel64 = parity(copy.deepcopy(model).double()(x.double()), copy.deepcopy(gm).double()(x.double()))[1]
    assert rel64 <= 1e-5
    bns = 20 if name == "resnet18" else 52
    if norm == "normprop":
        assert sum(isinstance(m, _NormProp) for m in gm.modules()) == bns
        # resnet18: the 8 ReLUs inside basic blocks sit between two NormProp convs; mobilenet_v2 has ReLU6
        assert len(modules_of(gm, ReLURenorm)) == (8 if name == "resnet18" else 0)
    else:
        assert len(modules_of(gm, DeepControl2d)) == bns


def check_in_ort(tmp_path, model, result):
    rows = verify_onnx(export_onnx(result, tmp_path / "m.onnx"), model, batch_sizes=(1, 3))
    assert all(r.ok for r in rows), rows
    assert max(r.max_rel for r in rows) < 1e-4


@pytest.mark.parametrize("norm", STRATEGIES)
def test_small_net_parity_in_onnx_runtime(tmp_path, norm):
    net, x = small_net()
    check_in_ort(tmp_path, net, lnconvert.convert(net, example_inputs=x, norm=norm))


# 15 s each on a quiet 2-core machine: the slow stage (both strategies are checked in ORT on a
# small net above, and on resnet18 / mobilenet_v2 in PyTorch by default)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("norm", STRATEGIES)
def test_zoo_parity_in_onnx_runtime(tmp_path, name, norm):
    check_in_ort(tmp_path, *zoo_conversion(name, norm))


def cli_net() -> nn.Module:
    """SmallNet with randomised BN statistics, for the CLI as ``tests.test_norm_strategies:cli_net``."""
    return small_net()[0]


def test_cli_norm_and_lcw_flags():
    runner = CliRunner()
    done = runner.invoke(app, ["convert", "tests.test_norm_strategies:cli_net", "--input-size", "3,12,12", "--no-save",
                               "--norm", "deep-control", "--no-link", "--lcw"])
    assert done.exit_code == 0, done.output
    assert "norm: deep-control" in done.output and "3 deep-control, 2 not applied" in done.output
    assert "changed" in done.output and "6 layers projected" in done.output
    bad = runner.invoke(app, ["convert", "resnet18", "--no-save", "--norm", "batch"])
    assert bad.exit_code == 2 and "unknown norm strategy 'batch'" in bad.output and "Traceback" not in bad.output

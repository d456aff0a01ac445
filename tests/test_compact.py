"""Compaction: exact stage (zero-weight and dead twins), budgeted stage, and rebuild fidelity."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lnconvert
from lnconvert.compact import compact
from lnconvert.nn import GatedMerge, LinkedActivation
from lnconvert.passes.widen import read_columns, write_columns
from lnconvert.verify import parity

from .conftest import prepared
from .helpers import tiny_net
from .test_passes import Residual

FLOAT64_SAME_FUNCTION = 1e-12  # relative; float64 sums in another order agree to ~1e-15


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_fresh_conversion_compacts_back_to_the_original_cost(name):
    model, x = prepared(lnconvert.load_model(name))
    result = lnconvert.convert(model, example_inputs=x)
    compacted = compact(result)
    assert compacted.report.macs_after == result.report.macs_before  # back to the original MACs
    # Same function, measured in float64: the bound allows for summation order, which differs
    # between CPUs and BLAS builds (4e-15 seen on another x86-64 machine).
    assert compacted.report.max_rel_deviation < FLOAT64_SAME_FUNCTION
    assert not any(isinstance(m, LinkedActivation) for m in compacted.model.modules())
    with torch.no_grad():
        y_conv, y_comp = result.model(x), compacted.model(x)
    # float32: dropping zero input channels changes how a conv kernel blocks its sums on some
    # CPUs (bitwise equal here for resnet18, not guaranteed elsewhere); depthwise convs go from
    # 2 inputs per group back to 1.
    assert parity(y_conv, y_comp)[1] < 1e-5


def _fine_tune_twins(model: nn.Module, fraction: float, seed: int = 0) -> None:
    """Stand-in for fine-tuning: give a random subset of twin columns of dense convs / linears
    (and of residual gates) non-zero weights; grouped convs keep zero twin weights."""
    gen = torch.Generator().manual_seed(seed)
    for node in model.graph.nodes:
        layout = node.meta.get("lnc_in_layout")
        if node.op != "call_module" or layout is None:
            continue
        module = model.get_submodule(node.target)
        if isinstance(module, GatedMerge):
            module.gate.data = torch.randn(module.gate.shape, generator=gen) * (torch.rand(
                module.gate.shape, generator=gen) < fraction)
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and getattr(module, "groups", 1) == 1:
            primary, twin = read_columns(module, layout)
            chosen = torch.rand(layout.channels, generator=gen) < fraction
            shape = [1, -1] + [1] * (twin.dim() - 2)
            twin = torch.randn(twin.shape, generator=gen) * 0.1 * chosen.view(shape).to(twin.dtype)
            module.weight.data = write_columns(module, layout, primary, twin).weight.data


@pytest.mark.parametrize("residual", ["slice", "gate"])
def test_fine_tuned_twins_are_kept_and_moved_exactly(residual):
    net = Residual().eval()
    net.relu = nn.PReLU(4)  # parametric: the twin's own slopes must follow the kept channels
    x = torch.randn(2, 4, 8, 8)
    result = lnconvert.convert(net, example_inputs=x, residual=residual)
    _fine_tune_twins(result.model, fraction=0.5)
    compacted = compact(result)
    report = compacted.report
    assert report.removed["zero-weight"] > 0
    assert report.macs_before > report.macs_after > report.macs_original
    assert report.max_rel_deviation <= 1e-12  # float64: only zero contributions removed
    with torch.no_grad():
        torch.testing.assert_close(compacted.model(x), result.model(x), rtol=1e-5, atol=1e-5)


def test_model_fine_tuned_with_param_groups_compacts_and_keeps_training():
    # param_groups splits twin weights into parametrized leaves; compaction must see plain
    # weights (it once failed with "attribute 'weight' already exists") and leave the
    # caller's split model as it was
    net = Residual().eval()
    x = torch.randn(2, 4, 8, 8)
    result = lnconvert.convert(net, example_inputs=x)
    optimizer = torch.optim.SGD(lnconvert.param_groups(result.model, base_lr=0.0, twin_lr=0.1), lr=0.1)
    result.model(x).square().mean().backward()
    optimizer.step()
    compacted = compact(result)
    with torch.no_grad():
        torch.testing.assert_close(compacted.model(x), result.model(x), rtol=1e-5, atol=1e-5)
    assert compacted.report.macs_after < compacted.report.macs_before
    assert any(torch.nn.utils.parametrize.is_parametrized(m) for m in result.model.modules())


def test_dead_twins_are_removed_with_data():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():  # channels 0, 1 are always positive: their twins relu(-x) never fire
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([1.0, 2.0, 0.0, 0.0]))
        net[0].weight[2:, 0] = 1.0
    x = torch.rand(8, 3, 4, 4) - 0.5
    result = lnconvert.convert(net, example_inputs=x)
    _fine_tune_twins(result.model, fraction=1.0)
    compacted = compact(result, data=[x])
    assert compacted.report.removed == {"dead": 2}
    assert list(compacted.twins.values()) == [[2, 3]]
    with torch.no_grad():
        torch.testing.assert_close(compacted.model(x), result.model(x), rtol=1e-6, atol=1e-6)


def test_budget_removes_least_salient_twins_until_met():
    model, x = prepared(lnconvert.load_model("resnet18"))
    result = lnconvert.convert(model, example_inputs=x)
    _fine_tune_twins(result.model, fraction=1.0)
    compacted = compact(result, data=[x], target_macs="1.2x")
    report = compacted.report
    assert report.macs_after <= 1.2 * report.macs_original
    assert report.removed.get("budget", 0) > 0 and report.max_rel_deviation > 0  # reported, not hidden
    loose = compact(result, data=[x], target_macs="1.5x")
    assert loose.report.macs_after > report.macs_after and loose.report.max_rel_deviation <= report.max_rel_deviation


def test_compacted_model_trains_and_round_trips(tmp_path):
    model, x = prepared(lnconvert.load_model("resnet18"))
    result = lnconvert.convert(model, example_inputs=x)
    _fine_tune_twins(result.model, fraction=0.3)
    compacted = compact(result)
    path = tmp_path / "c.safetensors"
    lnconvert.save(compacted.model, path)  # the compacted model knows its conversion (twin subset included)
    reloaded = lnconvert.load(path)
    with torch.no_grad():
        assert torch.equal(reloaded(x), compacted.model.eval()(x))
    compacted.model.train()
    loss = F.cross_entropy(compacted.model(x[:1]), torch.tensor([3]))
    loss.backward()
    assert all(p.grad is not None for p in compacted.model.parameters() if p.requires_grad)


def test_bad_budget_is_a_usage_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    result = lnconvert.convert(net, example_inputs=torch.randn(1, 3, 4, 4))
    with pytest.raises(lnconvert.LnConvertError, match="target-macs"):
        compact(result, target_macs="lots")


def test_cli_compact(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lnconvert.cli import app

    monkeypatch.chdir(tmp_path)
    run = lambda *args: CliRunner().invoke(app, list(args))  # in-process: exit codes and streams as in a shell
    assert run("convert", "squeezenet1_0", "--input-size", "3,64,64", "-o", "s.safetensors").exit_code == 0
    result = run("compact", "s.safetensors", "--target-macs", "lots")
    assert result.exit_code == 2 and "target-macs" in result.stderr and "Traceback" not in result.stderr
    result = run("compact", "s.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "(1.00x)" in result.stdout and (tmp_path / "s-compact.safetensors").is_file()
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        full, small = lnconvert.load(tmp_path / "s.safetensors"), lnconvert.load(tmp_path / "s-compact.safetensors")
        torch.testing.assert_close(small(x), full(x), rtol=1e-5, atol=1e-5)


def test_dead_units_counts_a_compacted_activation():
    from lnconvert.analysis import dead_units

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(8, 3, 4, 4)
    result = lnconvert.convert(net, example_inputs=x)
    with torch.no_grad():
        result.model.get_submodule("2").weight[:, 4] = 0.5  # block layout: channel 0's twin
    compacted = compact(result)
    assert list(compacted.twins.values()) == [[0]]
    row = dead_units(compacted.model, [x])[0]
    assert row.units == 4 and row.dead <= row.primary_dead


def test_compacted_model_exports_to_onnx_with_parity_to_the_uncompacted_model(tmp_path):
    from lnconvert.export import export_onnx, verify_onnx

    model, x = prepared(tiny_net(), shape=(2, 3, 16, 16))  # dense and depthwise consumers
    result = lnconvert.convert(model, example_inputs=x)
    _fine_tune_twins(result.model, fraction=0.5)  # a twin subset survives: LinkedActivation(twin_channels=...)
    compacted = compact(result)
    assert any(isinstance(m, LinkedActivation) and m.subset for m in compacted.model.modules())
    assert compacted.report.max_rel_deviation <= 1e-12
    path = export_onnx(compacted.model, tmp_path / "c.onnx", example_inputs=(x,))
    rows = verify_onnx(path, result.model, batch_sizes=(1, 4))  # reference: the model before compaction
    assert rows and all(r.ok for r in rows), rows
    assert max(r.max_rel for r in rows) < 1e-4

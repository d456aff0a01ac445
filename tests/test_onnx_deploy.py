"""Deployment around the ONNX export: ORT graph optimisation, user inputs in verify-onnx, and
the TorchScript-exporter fallback."""
import warnings

import onnx
import pytest
import torch
from typer.testing import CliRunner

import lnconvert
from lnconvert.cli import app
from lnconvert.errors import UsageError
from lnconvert.export import export_onnx, optimize_onnx, verify_onnx

from .conftest import prepared
from .helpers import TINY, tiny_net

SIZE = (3, 16, 16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model, x = prepared(tiny_net(), shape=(2, *SIZE))
    folder = tmp_path_factory.mktemp("onnx")
    path = export_onnx(lnconvert.convert(model, example_inputs=x), folder / "m.onnx")
    weights = folder / "w.pth"
    torch.save(model.state_dict(), weights)
    return model, path, weights


@pytest.mark.parametrize("level", ["basic", "extended", "all"])
def test_optimised_graph_keeps_parity_with_the_original(exported, level):
    model, path, _ = exported
    target = optimize_onnx(path, path.with_name(f"m.{level}.onnx"), level=level)
    rows = verify_onnx(target, model, batch_sizes=(1, 4))
    assert rows and all(r.ok for r in rows), rows
    assert max(r.max_rel for r in rows) < 1e-4
    domains = {n.domain for n in onnx.load(target).graph.node}
    if level == "basic":
        assert domains <= {"", "ai.onnx"}  # basic keeps standard ONNX ops
    with pytest.raises(lnconvert.errors.OutputError, match="--force"):
        optimize_onnx(path, target, level=level)


def test_unknown_optimisation_level_is_refused(exported):
    _, path, _ = exported
    with pytest.raises(UsageError, match="unknown optimisation level"):
        optimize_onnx(path, path.with_name("x.onnx"), level="max")


def test_cli_onnx_with_optimize_writes_and_checks_both_files(exported, tmp_path):
    _, _, weights = exported
    runner = CliRunner()
    target = tmp_path / "r.onnx"
    result = runner.invoke(app, [TINY, "--weights", str(weights), "--input-size", "3,16,16", "--no-save",
                                 "--onnx", str(target), "--optimize", "basic"])
    assert result.exit_code == 0, result.output
    assert target.is_file() and (tmp_path / "r.opt.onnx").is_file()
    assert "basic optimisation" in result.output
    refused = runner.invoke(app, [TINY, "--no-save", "--optimize", "basic"])
    assert refused.exit_code == 2 and "--optimize needs --onnx" in refused.output


def test_verify_onnx_checks_user_inputs(exported, tmp_path):
    _, path, weights = exported
    data = tmp_path / "x.pt"
    torch.save(torch.randn(40, *SIZE), data)
    result = CliRunner().invoke(app, ["verify-onnx", str(path), "--reference", TINY, "--weights", str(weights),
                                      "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "x.pt[0]" in result.output and "x.pt[1]" in result.output  # 40 inputs in batches of 32
    torch.save({"not": "a tensor"}, data)
    bad = CliRunner().invoke(app, ["verify-onnx", str(path), "--reference", TINY, "--data", str(data)])
    assert bad.exit_code == 2 and "must hold one floating-point tensor" in bad.output


def test_dynamo_failure_falls_back_to_torchscript_with_a_warning(tmp_path, monkeypatch):
    model, x = prepared(tiny_net(), shape=(2, *SIZE))
    result = lnconvert.convert(model, example_inputs=x)
    real_export = torch.onnx.export

    def dynamo_breaks(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(result, tmp_path / "m.onnx")
    assert any("simulated dynamo failure" in str(w.message) and "TorchScript" in str(w.message) for w in caught)
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta["exporter"] == "torchscript"
    rows = verify_onnx(path, model, batch_sizes=(1, 3))
    assert all(r.ok for r in rows), rows

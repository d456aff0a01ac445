"""The command line, through a real subprocess (exit codes, one-line errors) and typer's runner."""
import json
import subprocess
import sys

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from lnconvert.cli import app

SMALL = ["--input-size", "3,64,64"]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lnconvert.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_convert_writes_model_and_report(tmp_path):
    out, rep = tmp_path / "r18.safetensors", tmp_path / "r18.json"
    proc = run("resnet18", "--drop-bn", *SMALL, "-o", str(out), "--report-json", str(rep))
    assert proc.returncode == 0, proc.stderr
    assert "exact" in proc.stdout and "17 linked" in proc.stdout and out.is_file()
    report = json.loads(rep.read_text())
    assert report["status"] == "exact" and report["parity"][0]["max_rel"] <= 1e-5
    assert "own (random) initialisation" in proc.stderr


def in_process(*args):
    """The same command in this process (typer's runner: exit code, stdout and stderr as in a shell,
    without the 5-10 s start of a new Python process); one real process is tested above."""
    return CliRunner().invoke(app, list(args))


def test_default_output_name_and_no_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert in_process("squeezenet1_0", *SMALL).exit_code == 0
    target = tmp_path / "squeezenet1_0-linked.safetensors"
    stamp = target.stat().st_mtime_ns
    result = in_process("squeezenet1_0", *SMALL)
    assert result.exit_code == 6 and "--force" in result.stderr and target.stat().st_mtime_ns == stamp
    assert in_process("squeezenet1_0", *SMALL, "--force").exit_code == 0
    assert in_process("squeezenet1_0", *SMALL, "--format", "pt2").exit_code == 0
    assert (tmp_path / "squeezenet1_0-linked.pt2").is_file()


@pytest.mark.parametrize("args,code,message", [
    (["resnt18"], 3, "did you mean resnet18"),
    (["resnet18", "--policy", "both"], 2, "unknown policy"),
    (["resnet18", "--residual", "skip"], 2, "unknown residual mode"),
    (["resnet18", "--activations", "rleu"], 2, "unknown activation"),
    (["resnet18", "--input-size", "big"], 2, "--input-size"),
    (["resnet18", "--input-size", "3,8"], 2, "does not run on inputs"),
    (["resnet18", "--weights", "/nonexistent.pt"], 3, "not found"),
    (["resnet18", "--weights", "DEFAULT", "--no-save"], 3, "--weights PATH"),
    (["resnet18", "-o", "/"], 6, "is a directory"),
    (["resnet18", "--format", "onnx"], 2, "unknown --format"),
    (["resnet18", "-o", "/nonexistent-dir/x.safetensors"], 6, "does not exist"),
])
def test_bad_input_gives_one_line_and_exit_code(args, code, message):
    result = in_process(*args)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1


@pytest.mark.slow  # 5 subprocess conversions; checkpoint layouts through the CLI stay in test_checkpoints.py
def test_weight_files(tmp_path):
    model = torchvision.models.resnet18()
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    assert run("resnet18", *SMALL, "--weights", str(wrapped), "--no-save").returncode == 0
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), other)
    proc = run("resnet18", *SMALL, "--weights", str(other), "--no-save")
    assert proc.returncode == 3 and "missing" in proc.stderr and "unexpected" in proc.stderr
    pickled = tmp_path / "whole.pt"
    torch.save(model, pickled)
    proc = run("resnet18", *SMALL, "--weights", str(pickled), "--no-save")
    assert proc.returncode == 3 and "--trust-pickle" in proc.stderr
    assert run("resnet18", *SMALL, "--weights", str(pickled), "--no-save", "--trust-pickle").returncode == 0
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    proc = run("resnet18", *SMALL, "--weights", str(garbage), "--no-save")
    assert proc.returncode == 3 and "truncated or corrupt" in proc.stderr


def test_typer_runner_help_and_list():
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "--help"])
    assert result.exit_code == 0
    for flag in ("--drop-bn", "--policy", "--activations", "--residual", "--weights", "--input-size",
                 "--report-json", "--force"):
        assert flag in result.output
    listed = runner.invoke(app, ["list", "resnet1*"])
    assert listed.exit_code == 0 and "torchvision/resnet18" in listed.output and "timm/resnet18d" in listed.output

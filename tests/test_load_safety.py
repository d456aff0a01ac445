"""Reading a saved file runs no code it names, and its spec is validated before use.

Each test crafts a file as an attacker or a broken tool would (an edited spec in the
safetensors metadata) and checks that loading refuses it with one line and that nothing
named in it was imported or called."""
import json
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import lnconvert
from lnconvert import io
from lnconvert.errors import ModelSourceError
from lnconvert.recipes import load_result as load_recipe_result

from .bad_models import SIZE, small

SIDE_EFFECTS = "tests.side_effects"


@pytest.fixture()
def saved(tmp_path):
    """A genuine saved model of ``tests.bad_models:small`` and its input batch."""
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1))
    result = lnconvert.convert(small(), example_inputs=x)
    path = tmp_path / "small.safetensors"
    io.save_with_spec(result.model, path, io.spec_for("tests.bad_models:small", None, result.report.options,
                                                      [list(x.shape)], result.report.to_dict()))
    return path, result, x


def rewrite(path, change) -> None:
    """Rewrite the spec in ``path``'s metadata: ``change`` maps the spec dict (or the raw
    metadata text, when it is a str) to the new value."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        text = handle.metadata()[io.SPEC_KEY]
    new = change if isinstance(change, str) else json.dumps(change(json.loads(text)))
    save_file(load_file(str(path)), str(path), metadata={io.SPEC_KEY: new})


def with_source(source):
    return lambda spec: spec | {"source": source}


@pytest.fixture()
def marker(tmp_path, monkeypatch):
    path = tmp_path / "marker.txt"
    monkeypatch.setenv("LNCONVERT_TEST_MARKER", str(path))
    sys.modules.pop(SIDE_EFFECTS, None)
    yield path
    sys.modules.pop(SIDE_EFFECTS, None)


READERS = {
    "load": lambda p: lnconvert.load(p),
    "load_result": lambda p: lnconvert.load_result(p),
    "io.load_result": lambda p: io.load_result(p),
    "recipes.load_result": lambda p: load_recipe_result(p),
    "load_model": lambda p: lnconvert.load_model(str(p)),
    "compact": lambda p: lnconvert.compact(p),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_module_callable_source_is_neither_imported_nor_called(saved, marker, reader):
    path, _, _ = saved
    rewrite(path, with_source(f"{SIDE_EFFECTS}:build"))
    with pytest.raises(ModelSourceError, match=r"trust_source=True \(CLI --trust-source\)") as info:
        READERS[reader](path)
    assert "model=" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists() and SIDE_EFFECTS not in sys.modules


def test_stdlib_callable_with_side_effect_is_not_called(saved, tmp_path, monkeypatch):
    """The issue's reproduction: ``tempfile:mkdtemp`` created a directory before failing."""
    path, _, _ = saved
    rewrite(path, with_source("tempfile:mkdtemp"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(ModelSourceError, match="refused"):
        lnconvert.load(path)
    assert list(scratch.iterdir()) == []


def test_recipe_spec_naming_code_is_refused(saved, marker):
    path, _, _ = saved
    recipe = {"name": "r", "model": {"name": f"{SIDE_EFFECTS}:build", "num_classes": None, "trust_pickle": False},
              "in_channels": 3, "num_classes": 4}
    rewrite(path, lambda spec: spec | {"source": None, "recipe": recipe})
    with pytest.raises(ModelSourceError, match="--trust-source"):
        load_recipe_result(path)
    assert not marker.exists() and SIDE_EFFECTS not in sys.modules


def test_trusted_or_explicit_architecture_loads(saved, marker):
    path, result, x = saved
    rewrite(path, with_source(f"{SIDE_EFFECTS}:build"))
    explicit = lnconvert.load(path, model=small())  # the user supplies the architecture: nothing imported
    assert not marker.exists() and SIDE_EFFECTS not in sys.modules
    trusted = lnconvert.load(path, trust_source=True)
    assert marker.read_text().split() == ["imported", "called"]
    with torch.no_grad():
        expected = result.model.eval()(x)
        for loaded in (explicit, trusted):
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["tests/other.safetensors", "timm/hf-hub:org/model", "os:getcwd"])
def test_other_non_registry_sources_need_trust(saved, source):
    path, _, _ = saved
    rewrite(path, with_source(source))
    with pytest.raises(ModelSourceError, match="--trust-source"):
        lnconvert.load(path)


@pytest.mark.parametrize("change,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (lambda s: s | {"format": "lnconvert/2"}, r"format lnconvert/2 .*upgrade lnconvert"),
    (lambda s: s | {"format": "other/1"}, "unknown format"),
    (lambda s: {k: v for k, v in s.items() if k != "format"}, "unknown format None"),
    (lambda s: {k: v for k, v in s.items() if k != "input_shape"}, "missing key.*'input_shape'"),
    (lambda s: s | {"exec": "x"}, "unknown key.*'exec'"),
    (lambda s: s | {"source": 7}, "'source' must be str or NoneType, got int"),
    (lambda s: s | {"options": []}, "'options' must be dict"),
    (lambda s: s | {"options": s["options"] | {"policy": "both"}}, "options: unknown policy"),
    (lambda s: s | {"options": s["options"] | {"evil": 1}}, "options: .*evil"),
    (lambda s: s | {"calibrated": "yes"}, "'calibrated' must be bool"),
    (lambda s: s | {"input_shape": [[10 ** 6, 10 ** 6]]}, r"asks for 1,000,000,000,000 input elements"),
    (lambda s: s | {"input_shape": [[2, -3, 16, 16]]}, "positive integers"),
    (lambda s: s | {"input_shape": [[2, 3.5, 16, 16]]}, "positive integers"),
    (lambda s: s | {"input_shape": []}, "1 to 16 shapes"),
])
def test_malformed_specs_are_refused_before_use(saved, marker, change, message):
    path, _, _ = saved
    rewrite(path, change)
    with pytest.raises(ModelSourceError, match=message) as info:
        lnconvert.load(path, model=small())
    assert "\n" not in str(info.value)


def test_huge_input_shape_is_refused_before_allocating(saved, monkeypatch):
    path, _, _ = saved
    rewrite(path, lambda s: s | {"input_shape": [[1000, 1000, 1000, 1000]]})
    architecture = small()
    allocations = []
    for name in ("zeros", "randn", "empty"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: allocations.append(a) or _real(*a, **k))
    with pytest.raises(ModelSourceError, match="input elements"):
        lnconvert.load_result(path, model=architecture)
    assert allocations == []


def test_safetensors_without_spec_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ModelSourceError, match="without an lnconvert spec"):
        lnconvert.load(path)


def invoke(*args: str):
    """The CLI in-process (typer's runner): exit code and stderr lines."""
    from typer.testing import CliRunner

    from lnconvert.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr


@pytest.mark.parametrize("command", ["compact", "convert", "verify-onnx"])
def test_cli_refuses_untrusted_source_in_one_line(saved, marker, tmp_path, command):
    path, _, _ = saved
    rewrite(path, with_source(f"{SIDE_EFFECTS}:build"))
    args = {"compact": ["compact", str(path), "-o", str(tmp_path / "c.safetensors")],
            "convert": ["convert", str(path), "--no-save"],
            "verify-onnx": ["verify-onnx", str(tmp_path / "m.onnx"), "--reference", str(path)]}[command]
    code, stderr = invoke(*args)
    assert code == 3, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "--trust-source" in errors[0] and "model=" in errors[0]
    assert "Traceback" not in stderr and not marker.exists() and SIDE_EFFECTS not in sys.modules


def test_cli_trust_source_compacts_a_trusted_file(saved, marker, tmp_path):
    path, _, _ = saved
    rewrite(path, with_source(f"{SIDE_EFFECTS}:build"))
    code, stderr = invoke("compact", str(path), "-o", str(tmp_path / "c.safetensors"), "--trust-source")
    assert code == 0, stderr
    assert (tmp_path / "c.safetensors").is_file() and "called" in marker.read_text()


def test_cli_future_format_version_fails_in_one_line_in_a_real_process(saved, tmp_path):
    path, _, _ = saved
    rewrite(path, lambda s: s | {"format": "lnconvert/9"})
    proc = subprocess.run([sys.executable, "-m", "lnconvert.cli", "compact", str(path), "-o",
                           str(tmp_path / "c.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and "upgrade lnconvert" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c.safetensors").exists()

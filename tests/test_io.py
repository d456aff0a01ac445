import pytest
import torch

import lnconvert
from lnconvert import io
from lnconvert.errors import ModelSourceError, OutputError
from lnconvert.models import load_model

from .conftest import prepared


@pytest.mark.parametrize("name,options", [
    ("resnet18", {}),
    ("resnet18", {"policy": "minmax", "residual": "gate"}),
    ("mobilenet_v3_small", {"drop_bn": False}),
    ("timm/resnet18d", {}),
    ("resnet18", {"norm": "deep-control", "link": False}),
    ("resnet18", {"norm": "normprop", "lcw": True}),  # LCW weights are parametrized: saved and rebuilt as such
])
def test_save_load_round_trip_is_bitwise(tmp_path, name, options):
    model, x = prepared(load_model(name))
    result = lnconvert.convert(model, example_inputs=x, **options)
    path = tmp_path / "m.safetensors"
    spec = io.spec_for(name, None, result.report.options, [list(x.shape)], result.report.to_dict())
    io.save(result.model, path, spec)
    loaded = io.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    with pytest.raises(OutputError, match="--force"):
        io.save(result.model, path, spec)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left


def test_truncated_saved_model_fails_cleanly(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ModelSourceError, match="truncated or corrupt"):
        io.load(path)


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(target) as tmp:
            open(tmp, "wb").write(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("format", ["pt2", "torchscript"])
def test_deployment_formats_reload_with_parity_and_dynamic_batch(tmp_path, format):
    model, x = prepared(load_model("mobilenet_v3_small"))
    result = lnconvert.convert(model, example_inputs=x, residual="gate")
    path = tmp_path / f"m{io.FORMATS[format]}"
    spec = io.spec_for("mobilenet_v3_small", None, result.report.options, [list(x.shape)], {})
    io.save(result.model, path, spec, format=format)
    assert io.detect_format(path) == format
    loaded = load_model(str(path))  # a saved model is a model source too
    with torch.no_grad():
        for batch in (x, x[:1], torch.cat([x, x])):
            torch.testing.assert_close(loaded(batch), result.model.eval()(batch), rtol=1e-6, atol=1e-6)


def test_saved_model_as_source_refuses_extra_weights(tmp_path):
    model, x = prepared(load_model("squeezenet1_0"))
    result = lnconvert.convert(model, example_inputs=x)
    path = tmp_path / "s.safetensors"
    io.save(result.model, path, io.spec_for("squeezenet1_0", None, result.report.options, [list(x.shape)], {}))
    with pytest.raises(ModelSourceError, match="carries its own weights"):
        load_model(str(path), weights="x.pt")


def _layouts(state: dict) -> dict:
    return {
        "bare": state,
        "state_dict": {"state_dict": state},
        "model+module.": {"model": {f"module.{k}": v for k, v in state.items()}},
        "ema+_orig_mod.": {"ema": {f"_orig_mod.{k}": v for k, v in state.items()}, "epoch": 3},
    }


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model+module.", "ema+_orig_mod.", "safetensors"])
def test_checkpoint_layouts_load(tmp_path, layout):
    from safetensors.torch import save_file

    source = load_model("resnet18")
    state = source.state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(_layouts(state)[layout], path)
    loaded = load_model("resnet18", weights=str(path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_other_architecture_checkpoint_lists_keys(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(load_model("mobilenet_v2").state_dict(), path)
    with pytest.raises(ModelSourceError, match=r"missing \(e\.g\. conv1\.weight.*unexpected \(e\.g\. features"):
        load_model("resnet18", weights=str(path))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", b"\x00" * 64])
def test_truncated_or_garbage_checkpoints_fail_cleanly(tmp_path, content):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(ModelSourceError):
        load_model("resnet18", weights=str(path))

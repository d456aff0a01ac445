import pytest
import torch

import lnconvert
from lnconvert import io
from lnconvert.errors import ModelSourceError, OutputError, UsageError
from lnconvert.finetune import plain_state_dict, split_twins, twin_parameters
from lnconvert.io import load_model

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
    lnconvert.save(result, path)
    loaded = lnconvert.load(path)
    saved_state, loaded_state = plain_state_dict(result.model), loaded.state_dict()
    assert sorted(saved_state) == sorted(loaded_state)
    assert all(torch.equal(loaded_state[k], v) for k, v in saved_state.items())
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    with pytest.raises(OutputError, match="--force"):
        result.save(path)
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
    result.save(path, format=format)
    assert io.detect_format(path) == format
    loaded = load_model(str(path))  # a saved model is a model source too
    with torch.no_grad():
        for batch in (x, x[:1], torch.cat([x, x])):
            torch.testing.assert_close(loaded(batch), result.model.eval()(batch), rtol=1e-6, atol=1e-6)


def test_saved_model_as_source_refuses_extra_weights(tmp_path):
    model, x = prepared(load_model("squeezenet1_0"))
    result = lnconvert.convert(model, example_inputs=x)
    path = tmp_path / "s.safetensors"
    lnconvert.save(result, path)
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


# ---------------------------------------------------------------- the result-centred API
def small_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                               torch.nn.Conv2d(6, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def test_fine_tuned_split_model_saves_merged_and_stays_split(tmp_path):
    model, x = prepared(small_net(), shape=(2, 3, 16, 16))
    result = lnconvert.convert(model, example_inputs=x)
    gm = split_twins(result.model)
    with torch.no_grad():
        for p in twin_parameters(gm):
            p.add_(0.01)  # fine-tuned twins: the saved weights must be the current ones
        expected = gm.eval()(x)
    lnconvert.save(gm, tmp_path / "m.safetensors")  # the model alone knows its conversion
    lnconvert.save(gm, tmp_path / "m.pt2", format="pt2")
    assert any("original1" in k for k in gm.state_dict())  # still split and usable
    gm.train()
    gm(x).sum().backward()
    loaded = lnconvert.load(tmp_path / "m.safetensors", model=model)  # an in-memory source: model= rebuilds it
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        torch.testing.assert_close(lnconvert.load(tmp_path / "m.pt2")(x), expected, rtol=1e-5, atol=1e-5)


def test_converted_model_alone_compacts_and_exports(tmp_path):
    model, x = prepared(small_net(), shape=(2, 3, 16, 16))
    gm = lnconvert.convert(model, example_inputs=x).model
    compacted = lnconvert.compact(gm)
    assert compacted.report.removed == {"zero-weight": 6 + 4}  # every twin right after conversion
    lnconvert.save(compacted, tmp_path / "c.safetensors")  # the compacted model, with its twin subset
    with torch.no_grad():
        torch.testing.assert_close(compacted.model.eval()(x), gm.eval()(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(lnconvert.load(tmp_path / "c.safetensors", model=model)(x), compacted.model(x))
    path = lnconvert.export_onnx(gm, tmp_path / "m.onnx")
    assert all(row.ok for row in lnconvert.verify_onnx(path, model, batch_sizes=(1, 3)))


@pytest.mark.parametrize("call", ["save", "compact", "export_onnx"])
def test_anything_but_a_conversion_is_refused_clearly(tmp_path, call):
    net = small_net()
    with pytest.raises(UsageError, match=f"{call} takes a ConversionResult or a model returned by lnconvert.convert"
                                         if call != "export_onnx" else "export_onnx needs example_inputs"):
        {"save": lambda: lnconvert.save(net, tmp_path / "m.safetensors"),
         "compact": lambda: lnconvert.compact(net),
         "export_onnx": lambda: lnconvert.export_onnx(net, tmp_path / "m.onnx")}[call]()
    with pytest.raises(UsageError, match=f"{call} takes a ConversionResult"):
        getattr(lnconvert, call)([1, 2], tmp_path / "x") if call != "compact" else lnconvert.compact([1, 2])
    assert list(tmp_path.iterdir()) == []


def test_load_result_is_public_and_compacts(tmp_path):
    model, x = prepared(load_model("resnet18"), shape=(2, 3, 32, 32))
    lnconvert.convert(model, example_inputs=x).save(tmp_path / "m.safetensors")
    result = lnconvert.load_result(tmp_path / "m.safetensors")
    assert isinstance(result, lnconvert.ConversionResult) and result.options.policy == "mirror"
    assert result.report.status == "exact" and [list(t.shape) for t in result.example_inputs] == [[2, 3, 32, 32]]
    compacted = lnconvert.compact(result)
    with torch.no_grad():
        torch.testing.assert_close(compacted.model(x), result.model(x), rtol=1e-5, atol=1e-5)


def test_changed_or_in_memory_source_needs_model_to_load(tmp_path):
    model, x = prepared(load_model("resnet18"), shape=(2, 3, 32, 32))
    model.fc = torch.nn.Linear(512, 10)  # a new head: "resnet18" would no longer rebuild it
    result = lnconvert.convert(model, example_inputs=x)
    result.save(tmp_path / "m.safetensors")
    assert io.read_spec(tmp_path / "m.safetensors")["source"] is None
    with pytest.raises(ModelSourceError, match="in-memory model; pass model="):
        lnconvert.load(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(lnconvert.load(tmp_path / "m.safetensors", model=model)(x), result.model.eval()(x))


def test_deprecated_signatures_still_work_with_a_warning(tmp_path):
    net, x = prepared(small_net(), shape=(2, 3, 16, 16))
    with pytest.warns(DeprecationWarning, match=r"convert\(verify_inputs=...\) is deprecated; use data="):
        result = lnconvert.convert(net, example_inputs=x, verify_inputs=[x[:1]])
    assert [p.inputs for p in result.report.parity] == ["random", "user[0]"]
    assert [p.inputs for p in lnconvert.convert(net, example_inputs=x, data=[x[:1]]).report.parity] == \
        ["random", "user[0]"]
    spec = io.spec_for(None, None, result.report.options, [list(x.shape)], result.report.to_dict())
    with pytest.warns(DeprecationWarning, match=r"save\(model, path, spec\) is deprecated"):
        lnconvert.save(result.model, tmp_path / "m.safetensors", spec)
    with torch.no_grad():
        assert torch.equal(lnconvert.load(tmp_path / "m.safetensors", model=net)(x), result.model.eval()(x))
    with pytest.warns(DeprecationWarning, match="batches=...\\) is deprecated; use data="):
        lnconvert.calibrate_batchnorm(net, batches=[x])
    with pytest.raises(UsageError, match="pass data= only"):
        lnconvert.calibrate_batchnorm(net, [x], batches=[x])
    onnx = lnconvert.export_onnx(result, tmp_path / "m.onnx")
    with pytest.warns(DeprecationWarning, match=r"verify_onnx\(inputs=...\) is deprecated"):
        old = lnconvert.verify_onnx(onnx, net, inputs=[("mine", (x,))], batch_sizes=(1,))
    new = lnconvert.verify_onnx(onnx, net, data=[x], data_label="mine", batch_sizes=(1,))
    assert [r.inputs for r in old] == ["random batch 1", "mine"]
    assert [r.inputs for r in new] == ["random batch 1", "mine[0]"]
    assert all(r.ok for r in old + new)


def test_one_tolerance_default_everywhere():
    import inspect

    from lnconvert.options import ConvertOptions
    from lnconvert.report import DEFAULT_TOLERANCE

    defaults = {f.__name__: inspect.signature(f).parameters["tolerance"].default
                for f in (lnconvert.convert, lnconvert.compact, lnconvert.verify_onnx)}
    assert set(defaults.values()) == {DEFAULT_TOLERANCE} == {ConvertOptions().tolerance}

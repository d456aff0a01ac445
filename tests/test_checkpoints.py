"""Checkpoints as real projects write them: the state dict is found wherever it sits.

Every layout is built from the state dict of a real model (resnet18 at random init) and must
load bitwise into a fresh resnet18, through the API and (some) through the CLI."""
import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lnconvert.cli import app
from lnconvert.errors import ModelSourceError
from lnconvert.models import load_model


@pytest.fixture(scope="module")
def source():
    """A trained-looking resnet18: random init, one SGD step (so the optimizer has state)."""
    torch.manual_seed(0)
    model = load_model("resnet18").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return model.eval(), optimizer


def shifted(state: dict, by: float) -> dict:
    """An EMA-like copy: same keys, different values."""
    return {k: v + by if v.is_floating_point() else v.clone() for k, v in state.items()}


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def layouts(model, optimizer) -> dict:
    state = model.state_dict()
    return {
        "tutorial": {"epoch": 5, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
                     "loss": torch.tensor(0.25)},
        "lightning": {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                      "state_dict": prefixed(state, "model.") | {"criterion.weight": torch.ones(1000)},
                      "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
                      "hyper_parameters": {"lr": 0.1, "arch": "resnet18"}},
        "net": {"net": state, "epoch": 1},
        "network": {"network": state},
        "params": {"params": state, "step": 10},
        "module": {"module": state},
        "dataparallel+compiled": {"model": prefixed(state, "module._orig_mod.")},
        "ema only": {"model_ema": state},
        "nested ema": {"ema": {"module": state, "decay": 0.999}},
        "twice the same": {"model": state, "state_dict": state},  # one state dict saved under two keys
        "no num_batches_tracked": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
    }


def assert_loaded(loaded, state):
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("layout", ["tutorial", "lightning", "net", "network", "params", "module",
                                    "dataparallel+compiled", "ema only", "nested ema", "twice the same",
                                    "no num_batches_tracked"])
def test_nested_layouts_load(tmp_path, source, layout):
    model, optimizer = source
    path = tmp_path / "checkpoint.pt"
    torch.save(layouts(model, optimizer)[layout], path)
    assert_loaded(load_model("resnet18", weights=str(path)), model.state_dict())


def test_model_and_ema_copy_is_ambiguous_until_a_key_is_given(tmp_path, source):
    model, _ = source
    state, ema = model.state_dict(), shifted(model.state_dict(), 0.5)
    path = tmp_path / "timm-train.pth"
    torch.save({"epoch": 9, "state_dict": state, "state_dict_ema": ema}, path)
    with pytest.raises(ModelSourceError) as info:
        load_model("resnet18", weights=str(path))
    message = str(info.value)
    assert "'state_dict' (102/102 match)" in message and "'state_dict_ema' (102/102 match)" in message
    assert "--weights-key KEY (API weights_key=)" in message and "\n" not in message
    assert_loaded(load_model("resnet18", weights=str(path), weights_key="state_dict_ema"), ema)
    assert_loaded(load_model("resnet18", weights=str(path), weights_key="state_dict"), state)


def test_lightning_module_with_ema_attribute_needs_the_attribute_prefix(tmp_path, source):
    model, _ = source
    ema = shifted(model.state_dict(), -0.25)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": prefixed(model.state_dict(), "model.") | prefixed(ema, "ema_model.")}, path)
    with pytest.raises(ModelSourceError, match=r"'state_dict\.ema_model' \(102/102 match\)"):
        load_model("resnet18", weights=str(path))
    assert_loaded(load_model("resnet18", weights=str(path), weights_key="state_dict.ema_model"), ema)


def test_no_complete_candidate_lists_partial_ones(tmp_path, source):
    model, _ = source
    items = list(model.state_dict().items())
    path = tmp_path / "split.pt"
    torch.save({"first": dict(items[:60]), "second": dict(items[60:])}, path)
    with pytest.raises(ModelSourceError, match="no complete state dict") as info:
        load_model("resnet18", weights=str(path))
    listed = str(info.value).split("candidates: ")[1]
    assert listed.startswith(("'first' (50/102 match), 'second' (52/102 match);",
                              "'second' (52/102 match), 'first' (50/102 match);"))
    assert listed.endswith("--weights-key KEY (API weights_key=)")


def test_weights_key_that_holds_nothing_lists_candidates(tmp_path, source):
    model, optimizer = source
    path = tmp_path / "tutorial.pt"
    torch.save(layouts(model, optimizer)["tutorial"], path)
    with pytest.raises(ModelSourceError, match=r"no tensors under --weights-key 'model'.*'model_state_dict'"):
        load_model("resnet18", weights=str(path), weights_key="model")


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_hugging_face_directory(tmp_path, source, name):
    model, _ = source
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if name.endswith(".safetensors"):
        save_file(state, str(tmp_path / name), metadata={"format": "pt"})
    else:
        torch.save(state, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    assert_loaded(load_model("resnet18", weights=str(tmp_path)), state)


def write_shards(directory, state: dict, shards: int = 3) -> None:
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(directory / name))
        weight_map |= {k: name for k in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_safetensors_directory_and_index(tmp_path, source):
    model, _ = source
    write_shards(tmp_path, model.state_dict())
    assert_loaded(load_model("resnet18", weights=str(tmp_path)), model.state_dict())
    assert_loaded(load_model("resnet18", weights=str(tmp_path / "model.safetensors.index.json")), model.state_dict())


@pytest.mark.parametrize("weight_map,message", [
    ({"conv1.weight": "../outside.safetensors"}, "not a file beside it"),
    ({"conv1.weight": "missing.safetensors"}, "not a file beside it"),
    ("not a map", "no valid weight_map"),
])
def test_bad_shard_index_is_refused(tmp_path, weight_map, message):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelSourceError, match=message):
        load_model("resnet18", weights=str(tmp_path))


def test_directory_without_weights_names_expected_files(tmp_path):
    with pytest.raises(ModelSourceError, match="model.safetensors.index.json, model.safetensors"):
        load_model("resnet18", weights=str(tmp_path))


def test_cli_converts_tutorial_checkpoint_and_explains_ambiguity(tmp_path, source):
    model, optimizer = source
    tutorial, ema = tmp_path / "tutorial.pt", tmp_path / "ema.pth"
    torch.save(layouts(model, optimizer)["tutorial"], tutorial)
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": shifted(model.state_dict(), 0.5)}, ema)
    runner = CliRunner()
    common = ["convert", "resnet18", "--input-size", "3,32,32", "--no-save"]
    result = runner.invoke(app, [*common, "--weights", str(tutorial)])
    assert result.exit_code == 0, result.stderr
    assert "exact" in result.stdout
    result = runner.invoke(app, [*common, "--weights", str(ema)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.exit_code == 3 and len(errors) == 1 and "--weights-key KEY" in errors[0]
    result = runner.invoke(app, [*common, "--weights", str(ema), "--weights-key", "state_dict_ema"])
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("layout", ["lightning", "ema only", "hugging face directory", "sharded directory"])
def test_cli_converts_checkpoints_as_found(tmp_path, source, layout):
    """The CLI reads the same layouts as the API (the tutorial layout is in the test above)."""
    model, optimizer = source
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "hugging face directory":
        save_file(state, str(tmp_path / "model.safetensors"))
        weights = tmp_path
    elif layout == "sharded directory":
        write_shards(tmp_path, state)
        weights = tmp_path
    else:
        weights = tmp_path / "checkpoint.ckpt"
        torch.save(layouts(model, optimizer)[layout], weights)
    result = CliRunner().invoke(app, ["convert", "resnet18", "--input-size", "3,32,32", "--no-save",
                                      "--weights", str(weights)])
    assert result.exit_code == 0, result.stderr
    # without --weights the CLI says it converts the architecture's own (random) initialisation
    assert "exact" in result.stdout and "own (random) initialisation" not in result.stderr

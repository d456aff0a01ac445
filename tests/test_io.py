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

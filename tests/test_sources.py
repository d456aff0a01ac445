"""Model sources beyond zoo names: ``module:callable`` import paths (CLI, saved specs), timm hub
names and pretrained tags, and clear refusals for sources that cannot be built."""
import pytest
import timm
import torch
from typer.testing import CliRunner

import lnconvert
from lnconvert import io
from lnconvert.cli import app
from lnconvert.errors import ModelSourceError
from lnconvert.io import load_model
from lnconvert.models import resolve

from .conftest import prepared
from .helpers import TINY, tiny_net


def test_import_path_source_converts_saves_and_reloads_by_name(tmp_path):
    model, x = prepared(tiny_net(), shape=(2, 3, 16, 16))
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    target = tmp_path / "tiny-linked.safetensors"
    result = CliRunner().invoke(app, [TINY, "--weights", str(weights), "--input-size", "3,16,16", "-o", str(target)])
    assert result.exit_code == 0, result.stderr
    assert io.read_spec(target)["source"] == TINY
    with pytest.raises(ModelSourceError, match="trust"):  # the file names code to import: refused by default
        load_model(str(target))
    # rebuilt from the spec once trusted: the import path, the options, the weights
    loaded = load_model(str(target), trust_source=True)
    expected = lnconvert.convert(load_model(TINY, str(weights)), example_inputs=x).model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,arch", [("timm/resnet18d", "resnet18d"), ("resnet18.a1_in1k", "resnet18"),
                                       ("timm/mobilenetv3_small_050.lamb_in1k", "mobilenetv3_small_050")])
def test_timm_hub_names_and_pretrained_tags_resolve(name, arch):
    library, resolved = resolve(name)
    assert library == "timm" and resolved.split(".")[0] == arch
    model = load_model(name)  # offline and without --weights: the architecture's own initialisation
    assert type(model) is type(timm.create_model(arch)) and not model.training


@pytest.mark.parametrize("name,message", [
    ("tests.helpers:no_such_factory", "cannot import"),
    ("no_such_package.models:net", "cannot import"),
    ("tests.helpers:TINY", "did not give an nn.Module"),
    ("hub/resnet18", "unknown model source 'hub/'"),
    ("resnt18", "did you mean resnet18"),
])
def test_unbuildable_sources_are_one_clear_error(name, message):
    with pytest.raises(ModelSourceError, match=message):
        load_model(name)

"""torchvision's task builders by name (segmentation, detection, video, optical flow, quantizable)
and the default input each task accepts."""
import pytest
import torch
from typer.testing import CliRunner

from lnconvert.cli import app
from lnconvert.errors import ModelSourceError
from lnconvert.models import list_models, load_model, resolve
from lnconvert.tasks import task_of
from lnconvert.trace import default_example_inputs


@pytest.mark.parametrize("name,canonical", [
    ("resnet18", "resnet18"),
    ("torchvision/resnet18", "resnet18"),
    ("torchvision/classification/resnet18", "resnet18"),
    ("fasterrcnn_resnet50_fpn", "detection/fasterrcnn_resnet50_fpn"),
    ("torchvision/detection/fasterrcnn_resnet50_fpn", "detection/fasterrcnn_resnet50_fpn"),
    ("lraspp_mobilenet_v3_large", "segmentation/lraspp_mobilenet_v3_large"),
    ("torchvision/video/s3d", "video/s3d"),
    ("raft_small", "optical_flow/raft_small"),
    ("quantized_resnet18", "quantization/quantized_resnet18"),
])
def test_task_names_resolve_with_or_without_the_task(name, canonical):
    assert resolve(name) == ("torchvision", canonical)


@pytest.mark.parametrize("name,message", [
    ("torchvision/detectoin/fasterrcnn_resnet50_fpn", "unknown torchvision task 'detectoin'"),
    ("torchvision/video/resnet18", "unknown torchvision model 'video/resnet18'"),
    ("fasterrcnn_resnet50_fnp", "did you mean fasterrcnn_resnet50_fpn"),
])
def test_wrong_task_names_are_one_clear_error(name, message):
    with pytest.raises(ModelSourceError, match=message):
        resolve(name)


def test_list_covers_every_task():
    names = {n for _, n in list_models("*")}
    for name in ("resnet18", "detection/ssdlite320_mobilenet_v3_large", "segmentation/fcn_resnet50",
                 "video/r3d_18", "optical_flow/raft_large", "quantization/quantized_mobilenet_v2"):
        assert name in names
    assert [n for _, n in list_models("detection/*")] == [n for n in sorted(names) if n.startswith("detection/")]
    result = CliRunner().invoke(app, ["list", "*raft*"])
    assert result.exit_code == 0 and result.output.split() == ["torchvision/optical_flow/raft_large",
                                                               "torchvision/optical_flow/raft_small"]


def test_builders_fetch_nothing_offline(monkeypatch):
    """No weights and no backbone weights unless asked: a download attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    for name in ("ssdlite320_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "quantized_mobilenet_v2"):
        model = load_model(name)
        assert not model.training
    assert type(load_model("quantized_mobilenet_v2").features[1].conv[0][0]) is torch.nn.Conv2d  # float, not quantized


@pytest.mark.parametrize("name,task,shapes", [
    ("lraspp_mobilenet_v3_large", "segmentation", [(2, 3, 128, 128)]),
    ("torchvision/video/s3d", "video", [(2, 3, 16, 224, 224)]),  # S3D needs >= 14 frames at 224
    ("torchvision/video/r3d_18", "video", [(2, 3, 8, 112, 112)]),
    ("raft_small", "optical_flow", [(2, 3, 128, 128), (2, 3, 128, 128)]),  # two frames
])
def test_default_inputs_per_task(name, task, shapes):
    model = load_model(name)
    inputs = default_example_inputs(model)
    assert task_of(model) == task and [tuple(t.shape) for t in inputs] == shapes


def test_detection_default_input_is_a_list_of_images_the_model_runs_on():
    model = load_model("fasterrcnn_mobilenet_v3_large_320_fpn")
    (images,) = default_example_inputs(model)
    assert isinstance(images, list) and [tuple(i.shape) for i in images] == [(3, 160, 192)] * 2
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and {"boxes", "scores", "labels"} <= set(detections[0])


def test_s3d_runs_on_its_default_clip_with_batch_one():
    model = load_model("s3d")
    clip = default_example_inputs(model, batch=1)
    with torch.no_grad():
        assert model(*clip).shape == (1, 400)


def test_zoo_selects_every_task_or_chosen_ones():
    from lnconvert.zoo import select_models

    detection = select_models(torchvision_task_list=["detection"])
    assert len(detection) == 12 and all(n.startswith("torchvision/detection/") for n in detection)
    everything = select_models(torchvision_task_list=["all"])
    assert set(detection) < set(everything) and "torchvision/resnet18" in everything
    assert "torchvision/optical_flow/raft_small" in everything and len(everything) == len(set(everything))
    result = CliRunner().invoke(app, ["zoo", "--torchvision-task", "detectoin"])
    assert result.exit_code == 2 and "unknown torchvision task 'detectoin'" in result.stderr

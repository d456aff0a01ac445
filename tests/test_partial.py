"""Partial conversion: the traceable parts of a model fx cannot trace as a whole, converted in
place, the whole model verified on its outputs. One model per torchvision task at small sizes."""
import copy

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import lnconvert
from lnconvert.cli import app
from lnconvert.errors import TraceError, UsageError
from lnconvert.rules import is_batchnorm_like
from lnconvert.testing import randomize_batchnorm
from lnconvert.trace import default_example_inputs
from lnconvert.verify import compare
from tests import bad_models


def remaining(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_batchnorm_like(m)]


def independent_parity(original, converted, inputs) -> float:
    """Max rel error of every output tensor, recomputed here in float32 (not from the report)."""
    rows = compare(original, converted, [("check", inputs)], tolerance=1.0, precision="float32")
    return max(r.max_rel for r in rows)


def test_untraceable_model_converts_its_traceable_parts():
    net = bad_models.untraceable()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(TraceError, match="--no-save"):
        lnconvert.convert(net, example_inputs=x, partial=False)
    result = lnconvert.convert(net, example_inputs=x)  # automatic: the whole model does not trace
    report = result.report
    assert report.status == "exact" and report.max_rel_error <= 1e-5
    assert [(p["module"], p["action"]) for p in report.parts] == [("body", "converted")]
    assert {b["action"] for b in report.batchnorm} == {"folded"} and not remaining(result.model)
    assert any("whole model not traceable" in w for w in report.warnings)
    assert independent_parity(net, result.model, (x,)) <= 1e-5
    assert not remaining(result.model) and remaining(net)  # the caller's model is untouched


def test_a_model_whose_traced_graph_fails_converts_its_parts():
    """It traces, but the traced graph fails on inputs the model runs on: converted in parts,
    with the reason in a warning; inputs the model itself does not run on stay a usage error."""
    net = bad_models.traced_otherwise()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(TraceError, match="traced graph fails on inputs the model runs on: RuntimeError"):
        lnconvert.convert(net, example_inputs=x, partial=False)
    result = lnconvert.convert(net, example_inputs=x)
    report = result.report
    assert [(p["module"], p["action"]) for p in report.parts] == [("body", "converted")]
    assert report.status == "exact" and not remaining(result.model)
    assert any(w.startswith("whole model not traceable (its traced graph fails on inputs the model runs on: "
                            "RuntimeError: mat1 and mat2 shapes cannot be multiplied") for w in report.warnings)
    assert independent_parity(net, result.model, (x,)) <= 1e-5
    with pytest.raises(UsageError, match=r"the model does not run on inputs of shape \[\(2, 1, 9, 9\)\]: Runtime"):
        lnconvert.convert(net, example_inputs=torch.randn(2, 1, 9, 9))  # the model's own error, not the graph's


def test_a_part_that_does_not_trace_is_split_into_its_children():
    """Not converted in parts of its own (the automatic fallback is for the whole model only):
    the report names the child that was converted."""
    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
            self.gate = bad_models.DataDependent()

        def forward(self, x):
            return self.gate(self.body(x))

    net = torch.nn.Sequential(Inner(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 16, 16)
    result = lnconvert.convert(net, example_inputs=x)
    assert [(p["module"], p["action"]) for p in result.report.parts] == [("0.body", "converted")]
    assert result.report.status == "exact" and not remaining(result.model)
    assert independent_parity(net, result.model, (x,)) <= 1e-5


def test_named_submodules_only_and_what_stays_is_reported():
    model = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None).eval()
    x = torch.randn(2, 3, 64, 64)
    randomize_batchnorm(model, torch.randn(4, 3, 64, 64))
    result = lnconvert.convert(model, example_inputs=x, submodules=["backbone"])
    assert [(p["module"], p["action"]) for p in result.report.parts] == [("backbone", "converted")]
    kept = [b["name"] for b in result.report.batchnorm if b["action"] == "kept"]
    assert kept == remaining(result.model) and all(n.startswith("classifier.") for n in kept) and kept
    assert result.report.status == "partial" and result.report.max_rel_error <= 1e-5
    assert independent_parity(model, result.model, (x,)) <= 1e-5
    with pytest.raises(UsageError, match="no submodule 'backbnoe'.*its children: backbone, classifier"):
        lnconvert.convert(model, example_inputs=x, submodules=["backbnoe"])


def test_detection_whole_output_parity():
    """Faster R-CNN: backbone + FPN converted, RPN / RoI heads / NMS kept. Boxes, scores and
    labels compared after NMS (score threshold 0 so every image has detections); labels must
    match exactly. Float32 here (float64 in lnconvert's own check), where box decoding amplifies
    rounding: the original's own float32 boxes differ from its float64 copy's by up to 0.02 on
    80-pixel images (measured), more than 1e-4 of the largest coordinate, and the number of
    torch threads changes that rounding. So boxes and scores may differ by 1e-4 (of the largest
    coordinate / absolute) or by twice the original's own float32 deviation, whichever is
    larger: both float32 models deviate from the exact values by about that much."""
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                         weights_backbone=None, box_score_thresh=0.0, min_size=64, max_size=64,
                                         rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=50,
                                         box_detections_per_img=20).eval()
    (images,) = default_example_inputs(model, input_size=(3, 64, 80))
    randomize_batchnorm(model, (images,))
    result = lnconvert.convert(model, example_inputs=(images,), partial=True, tolerance=1e-4)
    parts = {p["module"]: p["action"] for p in result.report.parts}
    assert parts == {"backbone": "converted"} and not remaining(result.model)
    outputs = {p.output for p in result.report.parity}
    assert {"detections[0]", "detections[1]"} < outputs and any(o.startswith("rpn.head") for o in outputs)
    assert "detections compared as sets: 40 matched" in result.report.warnings  # 20 per image
    with torch.no_grad():
        expected, got = model(images), result.model(images)
        exact = copy.deepcopy(model).double()([image.double() for image in images])
    assert all(len(e["boxes"]) > 0 for e in expected)
    for e, g, e64 in zip(expected, got, exact):
        assert torch.equal(e["labels"], g["labels"]) and torch.equal(e["labels"], e64["labels"])
        box_floor = float((e["boxes"] - e64["boxes"]).abs().max())
        score_floor = float((e["scores"] - e64["scores"]).abs().max())
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=0,
                                   atol=max(1e-4 * max(1.0, float(e["boxes"].abs().max())), 2 * box_floor))
        torch.testing.assert_close(g["scores"], e["scores"], rtol=0, atol=max(1e-4, 2 * score_floor))


def test_zero_detections_are_nothing_compared_not_a_pass():
    """At random init every score is about 1/91, under the default threshold 0.05: no detection."""
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                         weights_backbone=None, min_size=64, max_size=64,
                                         rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=50).eval()
    (images,) = default_example_inputs(model, input_size=(3, 64, 80))
    result = lnconvert.convert(model, example_inputs=(images,))
    assert result.report.status == "unverified"
    assert any(r.startswith("nothing compared: the outputs hold 0 detections") for r in result.report.status_reasons)
    assert all(p.ok for p in result.report.parity) and any("before NMS" in p.output for p in result.report.parity)


def test_video_model_converts_whole_on_a_tiny_clip():
    model = torchvision.models.get_model("r3d_18", weights=None).eval()
    clip = default_example_inputs(model, input_size=(3, 4, 32, 32))
    randomize_batchnorm(model, clip)
    result = lnconvert.convert(model, example_inputs=clip, partial=True)  # traceable: no parts needed
    assert result.report.parts is None and result.report.status == "exact" and not remaining(result.model)
    # Conv3DSimple is an nn.Conv3d subclass that keeps its computation: every BN folds into one
    assert {b["action"] for b in result.report.batchnorm} == {"folded"}
    assert independent_parity(model, result.model, clip) <= 1e-5


def test_cli_partial_needs_no_save_and_lists_the_parts():
    runner = CliRunner()
    refused = runner.invoke(app, ["tests.bad_models:untraceable", "--partial", "--input-size", "3,16,16"])
    assert refused.exit_code == 2 and "--no-save" in refused.stderr
    done = runner.invoke(app, ["tests.bad_models:untraceable", "--partial", "--no-save", "--input-size", "3,16,16"])
    assert done.exit_code == 0, done.stderr
    assert "part converted" in done.stdout and "body" in done.stdout and "exact" in done.stdout
    automatic = runner.invoke(app, ["tests.bad_models:untraceable", "--no-save", "--input-size", "3,16,16"])
    assert automatic.exit_code == 0, automatic.stderr
    assert "whole model not traceable" in automatic.output and "part converted" in automatic.stdout


class Opaque(torch.nn.Module):
    """conv-BN-ReLU kept as an opaque leaf of the whole model (as timm keeps its non-traceable layers)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_bn_inside_an_opaque_leaf_is_converted_on_its_own():
    net = torch.nn.Sequential(Opaque(), torch.nn.Conv2d(6, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 12, 12)
    randomize_batchnorm(net, x)
    whole = lnconvert.convert(net, example_inputs=x, leaf_modules=["0"])
    assert whole.report.status == "partial" and lnconvert.remaining_batchnorm(whole.model) == ["0.bn"]
    result = lnconvert.convert(net, example_inputs=x, leaf_modules=["0"], partial=True)
    assert [(p["module"], p["action"]) for p in result.report.parts] == [("0", "converted")]
    assert result.report.status == "exact" and not lnconvert.remaining_batchnorm(result.model)
    assert {b["name"]: b["action"] for b in result.report.batchnorm} == {"0.bn": "folded", "2": "folded"}
    assert independent_parity(net, result.model, (x,)) <= 1e-5


@pytest.mark.slow
def test_timm_efficientvit_m0_non_traceable_leaves_lose_every_batchnorm():
    """Before partial conversion 54 of its 113 BatchNorms stayed inside LocalWindowAttention."""
    import timm

    model = timm.create_model("efficientvit_m0", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    randomize_batchnorm(model, torch.randn(4, 3, 64, 64))
    result = lnconvert.convert(model, example_inputs=x, partial=True)
    assert result.report.status == "exact" and not lnconvert.remaining_batchnorm(result.model)
    assert independent_parity(model, result.model, (x,)) <= 1e-4


def test_batchnorm_left_inside_a_converted_part_is_counted():
    """A part that is a BatchNorm alone traces to a functional batch_norm call, which stays:
    the whole model's count must still see it inside the part."""
    from lnconvert.trace import trace

    class FunctionalBN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))
            self.register_buffer("var", torch.ones(3))

        def forward(self, x):
            return torch.nn.functional.batch_norm(x, self.mean, self.var, training=False)

    part = torch.fx.symbolic_trace(FunctionalBN())
    whole = trace(torch.nn.Sequential(part, torch.nn.ReLU()).eval(), ["0"])
    assert [n for n in lnconvert.remaining_batchnorm(whole)] == ["0.batch_norm"]


def tiny_raft_with_batchnorm() -> torch.nn.Module:
    """raft_small's architecture (bottleneck encoders, no mask predictor) at small widths, with a
    BatchNorm context encoder (raft_large has one; raft_small has none) and a 2-level
    correlation pyramid, so 32 x 32 frames suffice."""
    from torchvision.models.optical_flow.raft import BottleneckBlock, _raft

    return _raft(feature_encoder_layers=(8, 8, 16, 16, 24), feature_encoder_block=BottleneckBlock,
                 feature_encoder_norm_layer=torch.nn.InstanceNorm2d,
                 context_encoder_layers=(8, 8, 16, 16, 32), context_encoder_block=BottleneckBlock,
                 context_encoder_norm_layer=torch.nn.BatchNorm2d, corr_block_num_levels=2, corr_block_radius=1,
                 motion_encoder_corr_layers=(16,), motion_encoder_flow_layers=(16, 8), motion_encoder_out_channels=14,
                 recurrent_block_hidden_state_size=16, recurrent_block_kernel_size=(3,),
                 recurrent_block_padding=(1,), flow_head_hidden_size=16, use_mask_predictor=False).eval()


def test_optical_flow_converts_its_encoder_in_parts_and_verifies_every_flow_field():
    """RAFT: the iterative updates cannot be traced; the BatchNorm context encoder is converted,
    and all 12 flow fields of the whole model are compared (float32: RAFT makes float32 grids)."""
    model = tiny_raft_with_batchnorm()
    frames = default_example_inputs(model, batch=1, input_size=(3, 32, 32))
    randomize_batchnorm(model, default_example_inputs(model, batch=2, input_size=(3, 32, 32), seed=1))
    result = lnconvert.convert(model, example_inputs=frames)  # automatic: RAFT does not trace whole
    assert [(p["module"], p["action"]) for p in result.report.parts] == [("context_encoder", "converted")]
    assert result.report.status == "exact" and not remaining(result.model) and remaining(model)
    assert len(result.report.parity) == 12 and all(p.precision == "float32" for p in result.report.parity)
    assert independent_parity(model, result.model, frames) <= 1e-5


@pytest.mark.slow
def test_raft_small_converts_in_parts_at_its_smallest_input():
    """raft_small itself (no BatchNorm: nothing to convert, the whole model still verified) at
    the 128 x 128 its correlation pyramid needs; about 30 s on a loaded 2-core machine."""
    from lnconvert.models import load_model

    model = load_model("raft_small")
    frames = default_example_inputs(model, batch=1, input_size=(3, 128, 128))
    result = lnconvert.convert(model, example_inputs=frames)
    assert result.report.parts == [] and result.report.status == "exact"
    assert independent_parity(model, result.model, frames) <= 1e-5


def test_parts_within_float32_rounding_pass_when_a_float64_copy_converts_exactly():
    """The whole-model rule for parts: 12 conv-BN-ReLU layers behind a value-dependent gate at a
    tolerance (1e-7) under what float32 storage of the folded weights allows."""
    torch.manual_seed(0)
    layers = []
    for i in range(12):
        layers += [torch.nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()]
    net = torch.nn.Sequential(torch.nn.Sequential(*layers), bad_models.DataDependent()).eval()
    randomize_batchnorm(net, torch.randn(4, 3, 8, 8))
    report = lnconvert.convert(net, example_inputs=torch.randn(2, 3, 8, 8), tolerance=1e-7).report
    (row,) = report.parity
    assert 1e-7 < row.max_rel <= row.native_noise and row.ok and report.status == "exact"
    assert report.parts[0]["action"] == "converted" and report.float64_conversion_error <= 1e-7
    assert report.rounded_copy_error <= 1e-7
    assert any("only by float32 storage" in w for w in report.warnings)

"""The zoo runner: real subprocess conversions of small models, the CSV/markdown it writes, resume.

Every row comes from a real conversion in a child process (random init, randomised BN
statistics); parity is the child's float64 check at tolerance 1e-5.
"""
import csv

import pytest
from typer.testing import CliRunner

from lnconvert.cli import app
from lnconvert.zoo import COLUMNS, ZooOptions, read_rows, run_child, run_zoo, select_models, timm_family

pytest.importorskip("timm")

# small and fast, BN and BN-free, torchvision and timm (timm's test_* models are tiny)
SUBSET = ["torchvision/resnet18", "torchvision/mobilenet_v3_small", "torchvision/shufflenet_v2_x0_5",
          "torchvision/squeezenet1_1", "timm/test_resnet", "timm/test_efficientnet", "timm/test_byobnet",
          "timm/test_vit"]
WITHOUT_BN = {"torchvision/squeezenet1_1", "timm/test_vit"}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def subset_run(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("zoo") / "report"
    rows = run_zoo(SUBSET, ZooOptions(timeout=240), out=prefix, jobs=2)
    return prefix, rows


@pytest.mark.slow  # 8 child conversions (85 s); the default run keeps the one-model ONNX column test
def test_subset_rows_columns_and_statuses(subset_run):
    prefix, rows = subset_run
    with open(f"{prefix}.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        on_disk = {r["model"]: r for r in reader}
    assert set(on_disk) == set(SUBSET) and len(rows) == len(SUBSET)
    for name, row in on_disk.items():
        assert row["status"] == "exact", (name, row["error_class"], row["reason"])
        assert row["traced"] == "yes" and row["bn_after"] == "0"
        assert float(row["max_rel_error"]) <= TOLERANCE
        assert int(row["act_linked"]) > 0 and int(row["consumers_widened"]) > 0
        assert int(row["params_after"]) > int(row["params_before"]) > 0
        assert int(row["macs_after"]) > int(row["macs_before"]) > 0
        assert float(row["convert_seconds"]) > 0 and row["input_size"].startswith("3x")
        if name in WITHOUT_BN:
            assert row["bn_before"] == "0" and "no-op" in row["note"]
        else:  # every BN removed, each one accounted for as folded or affine
            assert int(row["bn_before"]) == int(row["bn_folded"]) + int(row["bn_affine"]) > 0
            assert row["note"] == ""
    assert on_disk["torchvision/resnet18"]["bn_folded"] == "20"
    assert on_disk["torchvision/resnet18"]["act_linked"] == "17"
    md = open(f"{prefix}.md").read()
    assert "| torchvision | 4 | 4 | 0 | 0 |" in md and "| timm | 4 | 4 | 0 | 0 |" in md
    assert all(f"| {name} |" in md for name in SUBSET)


@pytest.mark.slow  # shares the 8-model subset run
def test_resume_skips_done_rows_and_rerun_replaces_them(subset_run):
    prefix, _ = subset_run
    rows = read_rows(f"{prefix}.csv")
    for row in rows:  # mark every row, so a model that ran again would show
        row["convert_seconds"] = "999"
    from lnconvert.zoo import write_csv

    write_csv(rows, f"{prefix}.csv")
    again = run_zoo(SUBSET, ZooOptions(), out=prefix)
    assert [r["convert_seconds"] for r in again] == ["999"] * len(SUBSET)
    rerun = run_zoo(["torchvision/squeezenet1_1"], ZooOptions(), out=prefix, rerun=True)
    by_name = {r["model"]: r for r in rerun}
    assert len(by_name) == len(SUBSET)
    assert by_name["torchvision/squeezenet1_1"]["convert_seconds"] != "999"
    assert by_name["torchvision/squeezenet1_1"]["status"] == "exact"
    assert by_name["torchvision/resnet18"]["convert_seconds"] == "999"


@pytest.mark.slow  # 20 s: an ONNX export per model in a child process; ORT parity itself is tested in test_onnx
def test_onnx_column_is_ort_parity(tmp_path):
    rows = run_zoo(["timm/test_resnet"], ZooOptions(onnx=True, timeout=240), out=tmp_path / "onnx")
    assert rows[0]["status"] == "exact", rows[0]["reason"]
    # ORT runs float32: within the tolerance or 4x the original's own float32 floor (verify_onnx)
    assert float(rows[0]["onnx_max_rel"]) <= max(TOLERANCE, 4 * float(rows[0]["float32_floor"]))


def test_hung_child_becomes_a_failed_row():
    row = run_child("torchvision/resnet18", ZooOptions(timeout=0.5))
    assert (row["status"], row["error_class"], row["reason"]) == ("failed", "Timeout", "no result within 0.5 s")


def test_child_errors_are_rows_with_their_class():
    row = run_child("timm/vit_tiny_patch16_224", ZooOptions(input_size=64, timeout=120))  # fixed 224 input
    assert row["status"] == "failed" and row["error_class"] == "UsageError"
    assert "does not run at input sizes [64]" in row["reason"]


def test_families_and_selection():
    assert timm_family("resnet18d") == timm_family("resnet50") == "resnet:resnet"
    assert timm_family("mixnet_s") == "efficientnet:mixnet"
    assert timm_family("tf_mixnet_s") == "efficientnet:tf_mixnet"
    assert timm_family("mobilenetv3_small_050") == "mobilenetv3:mobilenetv3"
    assert timm_family("efficientnet_b0") != timm_family("efficientnetv2_rw_t")
    chosen = select_models(["resnet18", "timm/resnet18d", "torchvision/resnet18"], timm_patterns=["resnet1*t"])
    assert chosen == ["torchvision/resnet18", "timm/resnet18d", "timm/resnet10t", "timm/resnet14t"]


def test_ctrl_c_keeps_finished_rows_and_ends_children(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    prefix = tmp_path / "intr"
    proc = subprocess.Popen([sys.executable, "-m", "lnconvert.cli", "zoo", "timm/test_resnet", "torchvision/resnet101",
                             "torchvision/resnet152", "--out", str(prefix)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (prefix.parent / "intr.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run again to resume" in stderr and "Traceback" not in stderr
    assert [r["model"] for r in read_rows(f"{prefix}.csv")] == ["timm/test_resnet"]
    ps = subprocess.run(["pgrep", "-f", f"lnconvert.zoo torchvision/resnet1.* {tmp_path}"], capture_output=True)
    assert ps.returncode == 1  # no child left running


@pytest.mark.parametrize("args, code, text", [
    (["zoo", "--jobs", "1"], 2, "no models selected"),
    (["zoo", "not_a_model_xyz"], 3, "unknown model"),
    (["zoo", "resnet18", "--policy", "bogus"], 2, "unknown policy"),
    (["zoo", "--timm", "no_such_family_*"], 2, "no timm model matches"),
])
def test_cli_usage_errors(args, code, text):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code and text in result.output and "Traceback" not in result.output


def test_cli_refuses_a_file_that_is_not_a_zoo_report(tmp_path):
    (tmp_path / "r.csv").write_text("a,b\n1,2\n")
    result = CliRunner().invoke(app, ["zoo", "resnet18", "--out", str(tmp_path / "r")])
    assert result.exit_code == 6 and "not a zoo report" in result.output


@pytest.mark.zoo
def test_full_torchvision_list(tmp_path):
    """Every torchvision classification model gets a row; every one with BN converts exact with
    all BN removed, except the documented ill-conditioned ones (README, Coverage)."""
    names = select_models(torchvision=True)
    rows = {r["model"]: r for r in run_zoo(names, ZooOptions(timeout=900), out=tmp_path / "tv")}
    assert set(rows) == set(names) and len(names) == 80
    for name, row in rows.items():
        assert row["error_class"] not in ("Crashed", "Timeout"), (name, row["reason"])
        if row["status"] == "exact":
            assert row["bn_after"] == "0"
            error = float(row["max_rel_error"])  # within the tolerance, or only by float32 rounding
            assert error <= TOLERANCE or ("float32 rounding" in row["note"] and error <= float(row["float32_floor"]))
    not_exact = {n for n, r in rows.items() if r["status"] != "exact" and r["bn_before"] != "0"}
    assert not_exact <= KNOWN_NOT_EXACT, sorted(not_exact - KNOWN_NOT_EXACT)


# torchvision models with BN measured not exact (README, Coverage): folded float32 weights move
# the output beyond the original's own float32 rounding (a float64 copy converts to 5.6e-7), and
# one too big for this machine's memory
KNOWN_NOT_EXACT = {"torchvision/efficientnet_b6", "torchvision/regnet_y_128gf"}


def test_unverified_rows_are_counted_and_shown():
    from lnconvert.zoo import coverage, markdown

    rows = [{"model": "torchvision/detection/a", "library": "torchvision", "status": "unverified",
             "reason": "nothing compared: the outputs hold 0 detections"},
            {"model": "torchvision/b", "library": "torchvision", "status": "exact", "convert_seconds": "1.0"}]
    assert coverage(rows)["torchvision"] | {"median_s": None, "max_s": None} == {
        "models": 2, "exact": 1, "partial": 0, "unverified": 1, "failed": 0, "median_s": None, "max_s": None}
    text = markdown(rows)
    assert "| exact | partial | unverified | failed |" in text and "| torchvision | 2 | 1 | 0 | 1 | 0 |" in text
    assert "unverified: nothing compared" in text


def test_detection_rows_compare_detections_within_minutes():
    """Score threshold 0 (random-init scores are about 1/91), images of 128 px, R-CNNs at 100
    proposals per image and Mask / Keypoint R-CNN at 10 detections (their per-proposal and
    per-detection heads)."""
    import torchvision

    from lnconvert.zoo.child import _detection_setup

    mask = torchvision.models.get_model("maskrcnn_resnet50_fpn", weights=None, weights_backbone=None)
    retina = torchvision.models.get_model("retinanet_resnet50_fpn", weights=None, weights_backbone=None)
    for model in (mask, retina):
        _detection_setup(model)
        assert model.transform.min_size == (128,) and model.transform.max_size == 128
    assert mask.roi_heads.score_thresh == 0.0 and mask.roi_heads.detections_per_img == 10
    assert mask.rpn.post_nms_top_n() == 2000 and mask.eval().rpn.post_nms_top_n() == 100  # training unchanged
    assert retina.score_thresh == 0.0 and retina.detections_per_img == 300  # no per-detection head: unchanged

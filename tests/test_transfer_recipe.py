"""The transfer recipe in reduced form (one seed, a few steps): every arm starts from the same
pretrained function, sees the same number of target samples, and the outputs are complete."""
import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from lnconvert.recipes import load_recipe, run_recipe
from lnconvert.recipes.nets import DigitsResNet
from lnconvert.recipes.transfer import (
    bn_input_shift,
    build_arm,
    finetune,
    freeze_batchnorm_statistics,
    optimizer_for,
    shift_inputs,
    to_groupnorm,
    transfer_data,
)

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "transfer-digits.yaml"
QUIET = Console(file=io.StringIO())
REDUCED = ["threads=1", "data.size=8", "model.widths=[4,8]", "model.blocks=1", "pretrain.epochs=2",
           "split.target_test=120", "samples=8", "curve_points=2", "seeds=[0]", "batch_sizes=[1,4]",
           "lr_grid=[0.001]", "twin_lr_factors=[1,10]",
           "arms=[no-finetune, bn-train, bn-frozen, groupnorm, folded, linked-mirror]"]


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    return out, run_recipe(RECIPE, out=out, overrides=REDUCED, console=QUIET)


def test_transfer_recipe_reduced_runs_every_arm_on_the_same_budget(reduced):
    out, metrics = reduced
    runs = metrics["runs"]
    arms = ["no-finetune", "bn-train", "bn-frozen", "groupnorm", "folded", "linked-mirror"]
    assert [(r["arm"], r["batch_size"]) for r in runs] == [(a, b) for b in (1, 4) for a in arms]
    floor = {r["batch_size"]: r["test_accuracy"] for r in runs if r["arm"] == "no-finetune"}
    for r in runs:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["seed"] == 0
        if r["arm"] == "no-finetune":
            assert r["samples_seen"] == 0 and r["curve"] == []
            continue
        assert r["samples_seen"] == 8 and r["steps"] == 8 // r["batch_size"] and r["ms_per_step"] > 0
        assert r["peak_step_bytes"] > 0
        assert [p[0] for p in r["curve"]] == [0, 4, 8]
        if r["arm"] in ("bn-frozen", "folded", "linked-mirror", "bn-train"):
            # these start from the pretrained function (folding and linking are exact), so before the
            # first step they score what the un-tuned model scores; GroupNorm discards it
            assert r["curve"][0][1] == pytest.approx(floor[r["batch_size"]], abs=1e-9), r["arm"]
    linked = [s for s in metrics["selection"] if s["arm"] == "linked-mirror"]
    assert all([(g["lr"], g["twin_lr"]) for g in s["grid"]] == [(1e-3, 1e-3), (1e-3, 1e-2)] for s in linked)
    chosen = {(r["arm"], r["batch_size"]): (r["lr"], r["twin_lr"]) for r in metrics["summary"]}
    for s in linked:  # the chosen pair is the grid's best on the validation split
        best = max(s["grid"], key=lambda g: (g["val_accuracy"], -g["val_loss"]))
        assert chosen[("linked-mirror", s["batch_size"])] == (best["lr"], best["twin_lr"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(runs)) and saved["sizes"]["target_fit"] == 180
    assert (out / "transfer.png").read_bytes()[:4] == b"\x89PNG"


def test_inverted_target_moves_the_bn_input_statistics(reduced):
    _, metrics = reduced
    first = metrics["bn_input_shift"][0]
    # the source test data still fits the running statistics; the inverted target does not
    assert first["target_mean_shift"] > 3 * first["source_mean_shift"]
    dead = metrics["pretrained_dead_units"]
    assert set(dead) == {"source_test", "target_fit"} and all(0 <= d["dead"] <= d["units"] for d in dead.values())
    assert dead["target_fit"]["units"] == 4 + 4 + 4 + 8 + 8  # stem and 2 ReLUs per block at widths [4, 8]


def test_transfer_splits_are_disjoint_and_the_target_is_the_inverted_source_kind():
    config = load_recipe(RECIPE, ["data.size=8"])
    data = transfer_data(config)
    sizes = {k: len(v) for k, v in data.items()}
    assert sum(sizes.values()) == 1797 and sizes["target_fit"] == 180 and sizes["target_val"] == 60
    flat = {k: {tuple(x.flatten().tolist()) for x in v.tensors[0]} for k, v in data.items()}
    assert not flat["target_fit"] & flat["target_test"] and not flat["target_val"] & flat["target_test"]
    raw = torch.rand(3, 1, 8, 8)
    assert torch.allclose(shift_inputs(shift_inputs(raw, "invert"), "invert"), raw, atol=1e-7)


def test_frozen_bn_keeps_running_statistics_and_groupnorm_replaces_every_bn():
    torch.manual_seed(0)
    model = DigitsResNet(1, 10, [4, 8], 1)
    before = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    model.train()
    freeze_batchnorm_statistics(model)
    model(torch.randn(4, 1, 8, 8) * 3 + 1).sum().backward()
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers() if "running" in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if "bn" in n)  # affine still trains
    count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    gn = to_groupnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in gn.modules()) == count
    shift = bn_input_shift(DigitsResNet(1, 10, [4, 8], 1).eval(), *[torch.utils.data.TensorDataset(
        torch.randn(16, 1, 8, 8), torch.zeros(16, dtype=torch.long)) for _ in range(2)])
    assert len(shift) == count and all(r["source_var_ratio"] > 0 for r in shift)


@pytest.fixture(scope="module")
def small_setup():
    config = load_recipe(RECIPE, ["data.size=8", "split.target_test=60", "seeds=[0]"])
    data = transfer_data(config)
    torch.manual_seed(0)
    return config, data, DigitsResNet(1, 10, [4, 8], 1).eval()


def test_minmax_fine_tunes_to_the_same_function_as_mirror_under_adam(small_setup):
    # minmax's twin is min(x, 0) = -relu(-x): the same features as mirror's with the sign flipped.
    # Twins start at zero and Adam's update is odd in the gradient, so the twin weights stay
    # exact negatives of each other: the two arms are one model, step for step.
    config, data, pretrained = small_setup
    probe = data["target_test"].tensors[0][:16]
    outputs = {}
    for arm in ("linked-mirror", "linked-minmax"):
        torch.manual_seed(0)
        model, _ = build_arm(arm, pretrained, probe[:4])
        optimizer = optimizer_for(arm, model, "adam", 1e-3, 1e-2)
        model.train()
        for x, y in zip(data["target_fit"].tensors[0].split(4)[:6], data["target_fit"].tensors[1].split(4)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        outputs[arm] = model.eval()(probe)
    scale = outputs["linked-mirror"].abs().max()
    assert (outputs["linked-mirror"] - outputs["linked-minmax"]).abs().max() <= 1e-4 * scale
    assert (outputs["linked-mirror"] - pretrained(probe)).abs().max() > 1e-3 * scale  # the arms did train


def test_compact_arm_ends_at_the_original_macs(small_setup):
    config, data, pretrained = small_setup
    result = finetune("linked-mirror-compact", pretrained, data, 4, 16, 1e-3, 1e-2, 0, config, "target_test", 1)
    compaction = result["compaction"]
    assert compaction["macs_ratio"] <= 1.0 + 1e-9 and sum(compaction["removed"].values()) > 0
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["samples_seen"] == 16

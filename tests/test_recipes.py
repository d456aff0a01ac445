"""Recipes: the digits pipeline in reduced form, resumable training, the depth experiment,
ImageFolder data, and one-line errors with exit codes."""
import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import lnconvert
from lnconvert.cli import app
from lnconvert.nn import DeepControl2d, LinkedActivation, NormPropConv2d, ReLURenorm, is_lcw
from lnconvert.recipes import RecipeError, load_recipe, load_result, run_recipe
from lnconvert.recipes.data import build_data
from lnconvert.recipes.nets import DigitsResNet, plain_deep_net
from lnconvert.recipes.train import evaluate, fit

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
QUIET = Console(file=io.StringIO())
REDUCED_DIGITS = [  # the digits recipe at a size CI runs in seconds
    "threads=1", "data.size=16", "data.max_train=320", "data.max_test=160", "model.widths=[8,16]",
    "pretrain.epochs=2", "finetune.0.max_steps=120", "finetune.1.epochs=1", "finetune.1.max_steps=4",
    "timing.steps=1", "timing.repeats=1", "timing.batch_size=8",
]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, run_recipe(RECIPES / "digits-resnet.yaml", out=out, overrides=REDUCED_DIGITS, console=QUIET)


def test_digits_recipe_conversion_keeps_accuracy_and_bs1_finetuning_lowers_loss(digits_run):
    out, metrics = digits_run
    acc = metrics["accuracy"]
    assert acc["after_conversion"] == acc["before_conversion"] and metrics["predictions_changed_by_conversion"] == 0
    assert metrics["conversion"]["status"] == "exact" and metrics["conversion"]["batchnorm"] == {"folded": 6}
    bs1, bs32 = metrics["finetune"]
    assert (bs1["batch_size"], bs1["steps"], bs32["batch_size"]) == (1, 120, 32)
    assert bs1["train_loss_after"] < bs1["train_loss_before"]

    # independently of the pipeline: rebuild the trained BN model from its checkpoint, convert, compare
    config = load_recipe(RECIPES / "digits-resnet.yaml", REDUCED_DIGITS)
    data = build_data(config["data"], config["seed"])
    model = DigitsResNet(1, 10, [8, 16])
    model.load_state_dict(torch.load(out / "checkpoints" / "pretrain.pt", weights_only=True)["model"])
    before = evaluate(model, data.test)
    converted = lnconvert.convert(model, example_inputs=data.test.tensors[0][:4]).model
    after = evaluate(converted, data.test)
    assert before["accuracy"] == after["accuracy"] == acc["before_conversion"]
    assert torch.equal(before["predictions"], after["predictions"])
    assert not lnconvert.remaining_batchnorm(converted)

    # the saved final model (the last fine-tuning run) loads back with the same numbers
    loaded = load_result(out / "digits-resnet-linked.safetensors")
    assert evaluate(loaded, data.train)["loss"] == pytest.approx(bs32["train_loss_after"], rel=1e-6)
    for name in ("metrics.json", "conversion-report.json", "curves.png", "dead_units.png", "recipe.yaml"):
        assert (out / name).stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"] == acc and set(saved["dead_units"]) == {"BN model", "converted", "finetune bs1",
                                                                     "finetune bs32"}
    assert saved["timing"]["bn_over_bn_free"] > 0


def test_digits_recipe_compacts_the_fine_tuned_model_to_its_budgets(digits_run):
    out, metrics = digits_run
    rows = {r["target"]: r for r in metrics["compact"]}
    assert list(rows) == ["exact", "1.2x", "1.0x"]
    original, converted = metrics["macs"]["original"], metrics["macs"]["converted"]
    assert converted > 1.5 * original  # linking roughly doubled the consumers' cost
    assert rows["exact"]["max_rel_deviation"] <= 1e-5  # the exact stage keeps the function
    assert rows["1.2x"]["macs"] <= 1.2 * original and rows["1.0x"]["macs"] <= original
    tuned = metrics["accuracy"]["finetune bs32"]
    for row in rows.values():  # the accuracy change is reported against the fine-tuned model
        assert row["accuracy_change"] == pytest.approx(row["test_accuracy"] - tuned, abs=1e-9)
    assert rows["1.0x"]["removed"].get("budget", 0) > 0


def test_digits_recipe_resumes_from_finished_checkpoints(digits_run):
    out, metrics = digits_run
    again = run_recipe(RECIPES / "digits-resnet.yaml", out=out, overrides=REDUCED_DIGITS, console=QUIET)
    assert again["accuracy"] == metrics["accuracy"]
    assert again["histories"]["finetune bs1"]["step_loss"] == metrics["histories"]["finetune bs1"]["step_loss"]
    with pytest.raises(RecipeError, match="different recipe configuration"):
        run_recipe(RECIPES / "digits-resnet.yaml", out=out, overrides=REDUCED_DIGITS + ["pretrain.lr=0.1"],
                   console=QUIET)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))

    def train(max_steps, checkpoint, model=None):
        torch.manual_seed(0)
        model = model or nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        history = fit(model, opt, data, batch_size=8, epochs=3, seed=1, checkpoint=checkpoint, fingerprint="f",
                      max_steps=max_steps, checkpoint_every=2)
        return model, history

    straight, full = train(None, tmp_path / "a.pt")
    train(7, tmp_path / "b.pt")  # "interrupted" mid-epoch 2 (5 steps per epoch)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 7
    resumed, history = train(None, tmp_path / "b.pt")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert history["step_loss"] == full["step_loss"] and len(history["epochs"]) == 3
    assert [p.name for p in tmp_path.iterdir()] in (["a.pt", "b.pt"], ["b.pt", "a.pt"])  # no temp files left


def test_plain_deep_net_structure():
    net = plain_deep_net("linked_relu", depth=3, width=4, input_size=32)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == \
        [(1, 4, (7, 7), (2, 2))] + [(8, 4, (3, 3), (1, 1))] * 3
    assert len([m for m in net.modules() if isinstance(m, LinkedActivation)]) == 4
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 10) and net.dense.in_features == 8 * 16 * 16
    bound = (6 / (8 * 9 + 4 * 9)) ** 0.5  # Glorot uniform
    assert convs[1].weight.abs().max() <= bound and convs[1].weight.abs().max() > 0.9 * bound
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
    bn = plain_deep_net("relu_bn", depth=2)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 3 and bn.conv1.bias is None


def test_plain_deep_net_normalisation_variants():
    x = torch.randn(2, 1, 32, 32)
    normprop = plain_deep_net("normprop", depth=2, input_stats=(0.5, 2.0))
    assert sum(isinstance(m, NormPropConv2d) for m in normprop.modules()) == 3
    assert sum(isinstance(m, ReLURenorm) for m in normprop.modules()) == 3
    assert torch.equal(normprop.standardize(x), (x - 0.5) / 2.0)
    control = plain_deep_net("deep_control", depth=2)
    assert sum(isinstance(m, DeepControl2d) for m in control.modules()) == 3
    sigmoid = plain_deep_net("lcw_sigmoid", depth=2)
    convs = [m for m in sigmoid.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(is_lcw(c) and c.weight.flatten(1).sum(1).abs().max() < 1e-6 for c in convs)
    assert not is_lcw(sigmoid.dense) and sum(isinstance(m, nn.Sigmoid) for m in sigmoid.modules()) == 3
    for net in (normprop, control, sigmoid):
        assert net(x).shape == (2, 10)


REDUCED_DEPTH = ["threads=1", "model.depth=3", "data.size=16", "data.max_train=96", "data.max_test=64",
                 "train.epochs=1"]


def test_depth_recipe_reduced(tmp_path):
    metrics = run_recipe(RECIPES / "depth50-digits.yaml", out=tmp_path, console=QUIET, overrides=[
        *REDUCED_DEPTH, "seeds=[0, 1]", "variant_epochs={linked_relu: 2}",
        "variants=[relu, linked_relu, relu_bn, normprop, deep_control, lcw_sigmoid]"])
    variants = ["relu", "linked_relu", "relu_bn", "normprop", "deep_control", "lcw_sigmoid"]
    assert [(r["variant"], r["seed"]) for r in metrics["runs"]] == [(v, s) for v in variants for s in (0, 1)]
    assert all(r["layers"] == 4 and 0 <= r["test_accuracy"] <= 1 for r in metrics["runs"])
    assert {r["variant"]: r["epochs"] for r in metrics["runs"]} == {v: 2 if v == "linked_relu" else 1 for v in variants}
    assert all(len(r["test_accuracy_per_epoch"]) == r["epochs"] for r in metrics["runs"])
    # a linked pair dies only where its input is exactly 0
    assert all(r["dead_fraction"] == 0.0 for r in metrics["runs"] if r["variant"] == "linked_relu")
    for row in metrics["summary"]:
        accs = [r["test_accuracy"] for r in metrics["runs"] if r["variant"] == row["variant"]]
        assert row["mean"] == pytest.approx(sum(accs) / 2, abs=1e-12) and row["seeds"] == 2
        assert row["trained_fraction"] == sum(a > 0.5 for a in accs) / 2
    relu = [r for r in metrics["runs"] if r["variant"] == "relu"]
    assert relu[0]["train_loss_per_epoch"] != relu[1]["train_loss_per_epoch"]  # the seed changes init and order
    assert metrics["not_run"] == []
    assert (tmp_path / "depth.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # 21 s: spawns worker processes; the reduced depth recipe itself runs by default
def test_depth_recipe_parallel_jobs_match_one_process_and_the_time_limit_records_what_did_not_run(tmp_path):
    overrides = [*REDUCED_DEPTH, "model.depth=1", "variants=[selu, linked_relu]", "seeds=[3, 4]"]
    serial = run_recipe(RECIPES / "depth50-digits.yaml", out=tmp_path / "serial", console=QUIET, overrides=overrides)
    parallel = run_recipe(RECIPES / "depth50-digits.yaml", out=tmp_path / "parallel", console=QUIET, jobs=2,
                          overrides=overrides)
    key = [(r["variant"], r["seed"]) for r in serial["runs"]]
    assert key == [(r["variant"], r["seed"]) for r in parallel["runs"]] == [("selu", 3), ("selu", 4),
                                                                            ("linked_relu", 3), ("linked_relu", 4)]
    for a, b in zip(serial["runs"], parallel["runs"]):  # same process settings (1 thread): same numbers
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    # a limit that has passed once the first run finishes: the rest is listed, not silently dropped
    limited = run_recipe(RECIPES / "depth50-digits.yaml", out=tmp_path / "limited", console=QUIET,
                         overrides=[*overrides, "time_limit_minutes=0.00001"])
    assert len(limited["runs"]) == 1 and len(limited["not_run"]) == 3


def _image_folder(root: Path, classes=("cat", "dog"), per_class=10):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(20, 20, 3, generator=generator) * 127 + 128 * k).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.mark.slow  # 16 s: trains through an ImageFolder; the digits pipeline runs by default
def test_imagefolder_recipe_with_a_new_head(tmp_path):
    _image_folder(tmp_path / "images")
    metrics = run_recipe(RECIPES / "imagefolder-finetune.yaml", out=tmp_path / "run", data=str(tmp_path / "images"),
                         console=QUIET, overrides=[
                             "threads=1", "data.size=32", "model.num_classes=2", "pretrain.epochs=1",
                             "pretrain.batch_size=6", "finetune.0.max_steps=4", "finetune.1.batch_size=6",
                             "finetune.1.epochs=1", "timing=null"])
    assert metrics["data"].startswith("ImageFolder") and "2 classes, 18+2 images" in metrics["data"]
    assert metrics["accuracy"]["after_conversion"] == metrics["accuracy"]["before_conversion"]
    loaded = load_result(tmp_path / "run" / "imagefolder-finetune-linked.safetensors")
    assert loaded(torch.zeros(1, 3, 32, 32)).shape == (1, 2) and not lnconvert.remaining_batchnorm(loaded)


@pytest.mark.parametrize("args,message", [
    (["missing.yaml"], "recipe not found"),
    (["{recipes}/digits-resnet.yaml", "--set", "pretrain.epoch=3"], "unknown key 'pretrain.epoch'"),
    (["{recipes}/digits-resnet.yaml", "--set", "pretrain"], "--set expects KEY=VALUE"),
    (["{recipes}/digits-resnet.yaml", "--set", "data.kind=mnist"], "unknown data.kind"),
    (["{recipes}/imagefolder-finetune.yaml"], "data.path is not set"),
    (["{recipes}/imagefolder-finetune.yaml", "--data", "/nonexistent-images"], "ImageFolder directory not found"),
    (["{recipes}/imagefolder-finetune.yaml", "--set", "data.kind=cifar10", "--data", "{tmp}"], "CIFAR-10 not found"),
    (["{recipes}/depth50-digits.yaml", "--set", "variants=[tanh]"], "unknown variant 'tanh'"),
    (["{recipes}/depth50-digits.yaml", "--set", "variant_epochs={{tanh: 3}}"], "unknown variant 'tanh'"),
    (["{recipes}/depth50-digits.yaml", "--jobs", "0"], "jobs must be a positive integer"),
    (["{recipes}/digits-resnet.yaml", "--jobs", "2"], "--jobs applies to recipes with independent runs"),
    (["{recipes}/transfer-digits.yaml", "--set", "arms=[batchnorm]"], "unknown arm 'batchnorm'"),
])
def test_bad_recipe_input_exits_2_with_one_line(tmp_path, args, message):
    args = [a.format(recipes=RECIPES, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, ["recipe", "run", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error")]) == 1


def test_recipe_cli_exit_code(tmp_path):
    # in-process (typer's runner); real processes are tested in test_bad_inputs and test_distributed
    result = CliRunner().invoke(app, ["recipe", "run", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and result.stderr.startswith("error: recipe not found")

"""Data-parallel recipes (torchrun / DDP, gloo on 127.0.0.1): two processes compute what one
computes with the same global batch, for twin-split, gated-residual and compacted models;
a lost or failing rank ends the run with one message and an intact checkpoint.

Ranks are forked from the test process (no second torch import: seconds, not minutes) and
joined with timeouts; the torchrun command itself is exercised by a slow test."""
from __future__ import annotations

import copy
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

import lnconvert
from lnconvert.cli import app
from lnconvert.finetune import merge_twins, param_groups
from lnconvert.recipes import distributed, run_recipe
from lnconvert.recipes.nets import DigitsResNet
from lnconvert.recipes.train import fit, make_optimizer
from lnconvert.testing import randomize_batchnorm

from .test_recipes import QUIET, RECIPES, REDUCED_DIGITS

# imported once here so that forked ranks inherit them instead of importing them each (slow)
pytest.importorskip("sklearn.datasets")
pytest.importorskip("matplotlib.pyplot")

REL = 1e-5  # float32: per-rank partial sums reduce in another order than one batch's sum


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, target: Callable[[int], None]) -> None:
    """Body of a forked rank: torchrun's environment, then ``target``; exits with its code."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    torch.set_num_threads(1)
    code = 0
    try:
        target(rank)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - shown in the test output, exit non-zero
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _start(target: Callable[[int], None], world_size: int = 2) -> list:
    ctx = torch.multiprocessing.get_context("fork")  # ranks share the parent's imports and models
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, target)) for rank in range(world_size)]
    for p in procs:
        p.start()
    return procs


def _join(procs: list, timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():  # never leave a rank behind, whatever the test concludes
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


# --- equivalence: two processes vs one -------------------------------------------------------
def _converted(residual: str) -> lnconvert.ConversionResult:
    torch.manual_seed(0)
    net = DigitsResNet(1, 10, [4, 8]).eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    randomize_batchnorm(net, x, seed=1)
    return lnconvert.convert(net, example_inputs=x[:4], residual=residual)


def _compacted() -> torch.nn.Module:
    """A converted model whose twins were trained a little, then compacted to 1.2x the MACs."""
    result = _converted("slice")
    tuned = result.model
    opt = torch.optim.Adam(param_groups(tuned, base_lr=1e-2, twin_lr=1e-2))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tuned(x), y).backward()
        opt.step()
    result.model = merge_twins(tuned)
    return lnconvert.compact(result, data=[x], target_macs="1.2x").model


# name: (model, global batch, epochs, max_steps, steps already done by one process before)
CASES = {
    "twin-split": ("slice", 8, 1, None, 0),
    "uneven-batch": ("slice", 5, 1, None, 0),      # rows 3 + 2: weighted mean losses
    "one-sample-batch": ("slice", 1, 1, 3, 0),     # rank 1 idle: weight 0
    "gated-residual": ("gate", 8, 1, None, 0),
    "compacted": ("compacted", 8, 1, None, 0),
    "resumed": ("slice", 8, 2, None, 2),           # 2 ranks continue a 1-process checkpoint
}


def _train(model: torch.nn.Module, case: str, checkpoint: Path, max_steps: int | None = None) -> dict:
    _, batch, epochs, steps, _ = CASES[case]
    data = TensorDataset(torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(2)),
                         torch.randint(0, 10, (24,), generator=torch.Generator().manual_seed(3)))
    opt = make_optimizer("adam", param_groups(model, base_lr=1e-2, twin_lr=3e-2), 1e-2)
    return fit(model, opt, data, batch_size=batch, epochs=epochs, seed=0, checkpoint=checkpoint, fingerprint=case,
               max_steps=max_steps or steps, checkpoint_every=2)


@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory):
    """Every case trained by 2 forked ranks (their weights and histories) and by this process."""
    tmp = tmp_path_factory.mktemp("ddp")
    models = {"slice": _converted("slice").model, "gate": _converted("gate").model, "compacted": _compacted()}
    for case, (kind, *_, done) in CASES.items():
        if done:  # the checkpoint a single process left after `done` steps
            _train(copy.deepcopy(models[kind]), case, tmp / f"{case}.pt", max_steps=done)

    def ranks(rank: int) -> None:
        distributed.init_from_env()
        for case, (kind, *_rest) in CASES.items():
            model = copy.deepcopy(models[kind])
            history = _train(model, case, tmp / f"{case}.pt")
            torch.save({"state": model.state_dict(), "history": history, **distributed.describe(),
                        "rows": distributed.batch_part(CASES[case][1])[0]}, tmp / f"{case}-rank{rank}.pt")
        distributed.finish()

    codes = _join(_start(ranks), timeout=300)
    assert codes == [0, 0]
    single = {}
    for case, (kind, *_rest) in CASES.items():
        model = copy.deepcopy(models[kind])
        history = _train(model, case, tmp / f"{case}-single.pt")
        single[case] = (model.state_dict(), history)
    return tmp, single


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_the_same_weights_as_one(two_and_one, case):
    tmp, single = two_and_one
    reference, reference_history = single[case]
    for rank, rows in ((0, {8: slice(0, 4), 5: slice(0, 3), 1: slice(0, 1)}), (1, {8: slice(4, 8), 5: slice(3, 5),
                                                                                    1: slice(0, 1)})):
        got = torch.load(tmp / f"{case}-rank{rank}.pt", weights_only=False)
        assert (got["world_size"], got["backend"]) == (2, "gloo")
        assert got["rows"] == rows[CASES[case][1]]  # each rank trained on its own rows only
        assert got["state"].keys() == reference.keys()
        for name, value in reference.items():
            if value.is_floating_point():
                assert _relative_error(got["state"][name], value) < REL, (case, rank, name)
        losses, expected = got["history"]["step_loss"], reference_history["step_loss"]
        assert len(losses) == len(expected) == reference_history["steps"]
        assert max(abs(a - b) / abs(b) for a, b in zip(losses, expected)) < REL
    # rank 0 wrote the checkpoint alone, with the final weights; no temp files are left
    saved = torch.load(tmp / f"{case}.pt", weights_only=True)
    assert saved["step"] == reference_history["steps"]
    for name, value in reference.items():
        if value.is_floating_point():
            assert _relative_error(saved["model"][name], value) < REL


def test_weights_moved_so_equivalence_is_not_trivial(two_and_one):
    tmp, single = two_and_one
    start = _converted("slice").model
    param_groups(start, base_lr=1.0, twin_lr=1.0)  # same parameter names as the trained models
    trained = single["twin-split"][0]
    moved = max(_relative_error(trained[k], v) for k, v in start.state_dict().items() if v.is_floating_point())
    assert moved > 100 * REL
    assert not list(tmp.glob(".*.tmp*"))


def test_batch_part_weights_sum_to_one_global_mean(monkeypatch):
    for world_size in (1, 2, 3, 4):
        for batch in (1, 2, 5, 8, 9):
            parts = []
            for rank in range(world_size):
                monkeypatch.setattr(distributed, "_context", distributed.Context(rank, world_size))
                parts.append(distributed.batch_part(batch))
            covered = [i for rows, weight in parts if weight > 0 for i in range(batch)[rows]]
            assert covered == list(range(batch))  # every row once, in order
            # mean over ranks of weight x (mean loss of its rows) = mean over the batch (losses all 1 here)
            assert abs(sum(weight for _, weight in parts) / world_size - 1.0) < 1e-12


# --- failures: a lost rank, a failing rank, an error every rank raises -------------------------
def _tiny_recipe(tmp: Path, epochs: int) -> Path:
    recipe = {"recipe": "convert-finetune", "name": "tiny", "threads": 1, "checkpoint_every": 10,
              "data": {"size": 8, "max_train": 128, "max_test": 32},
              "model": {"widths": [4]}, "dead_units": {"max_batches": 1},
              "finetune": [{"batch_size": 8, "epochs": epochs, "lr": 0.001}],
              "timing": None, "compact": None, "save_model": False}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli_rank(tmp: Path, args_of: Callable[[int], list[str]]) -> Callable[[int], None]:
    """A rank that runs ``lnconvert recipe run ...``, its stderr in ``tmp/rankN.err``."""
    def run(rank: int) -> None:
        sys.stdout = open(os.devnull, "w")
        sys.stderr = open(tmp / f"rank{rank}.err", "w", buffering=1)
        app(["recipe", "run", *args_of(rank)])
    return run


def _errors(tmp: Path, world_size: int = 2) -> list[str]:
    text = "".join((tmp / f"rank{r}.err").read_text() for r in range(world_size))
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if line.startswith(("error", "internal error"))]


def test_killed_rank_ends_the_run_with_one_message_and_an_intact_checkpoint(tmp_path):
    # 16 steps per epoch: enough left after the first checkpoint that a starved test process still kills mid-run
    epochs = 16
    recipe, out = _tiny_recipe(tmp_path, epochs), tmp_path / "run"
    checkpoint = out / "checkpoints" / "finetune-bs8.pt"
    procs = _start(_cli_rank(tmp_path, lambda rank: [str(recipe), "--out", str(out)]))
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.exists() and time.monotonic() < deadline and all(p.is_alive() for p in procs):
            time.sleep(0.02)
        assert checkpoint.exists() and all(p.is_alive() for p in procs), "no checkpoint before the kill"
        os.kill(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
    finally:
        codes = _join(procs, timeout=120)
    assert time.monotonic() - killed < 60  # rank 0 noticed and left, bounded by the timeouts
    assert codes == [lnconvert.errors.DistributedError.exit_code, -signal.SIGKILL]
    (message,) = _errors(tmp_path)
    assert "killed or crashed" in message and "(rank 0 of 2)" in message

    state = torch.load(checkpoint, weights_only=True)  # intact: loads, mid-run, nothing half-written left
    assert 0 < state["step"] < epochs * 16 and (state["step"] % 10 == 0 or state["step"] % 16 == 0)
    assert not list(checkpoint.parent.glob(".*"))
    metrics = run_recipe(recipe, out=out, console=QUIET)  # one process resumes the 2-process checkpoint
    resumed = metrics["histories"]["finetune bs8"]["step_loss"]
    assert len(resumed) == epochs * 16 and resumed[:state["step"]] == state["history"]["step_loss"]
    assert metrics["world_size"] == 1 and metrics["backend"] is None


def test_error_on_one_rank_ends_all_ranks_with_its_message(tmp_path):
    recipe = _tiny_recipe(tmp_path, epochs=1)
    procs = _start(_cli_rank(tmp_path, lambda rank: [str(recipe if rank == 0 else tmp_path / "missing.yaml"),
                                                     "--out", str(tmp_path / "run")]))
    codes = _join(procs, timeout=120)
    assert codes[1] == 2 and codes[0] not in (0, None)
    (message,) = _errors(tmp_path)
    assert message.startswith("error: recipe not found") and message.endswith("(rank 1 of 2)")


def test_error_every_rank_raises_is_reported_once(tmp_path):
    recipe, out = _tiny_recipe(tmp_path, epochs=1), tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"fingerprint": "another configuration"}, out / "checkpoints" / "finetune-bs8.pt")
    codes = _join(_start(_cli_rank(tmp_path, lambda rank: [str(recipe), "--out", str(out)])), timeout=120)
    assert codes == [2, 2]
    (message,) = _errors(tmp_path)
    assert "written by a different recipe configuration" in message


def test_single_process_pipelines_refuse_several_processes(tmp_path):
    args = [str(RECIPES / "depth50-digits.yaml"), "--out", str(tmp_path / "run")]
    codes = _join(_start(_cli_rank(tmp_path, lambda rank: args)), timeout=120)
    assert codes == [2, 2]
    (message,) = _errors(tmp_path)
    assert "runs in one process only" in message


def test_python_dash_m_lnconvert(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lnconvert", "recipe", "run", str(tmp_path / "none.yaml")])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("lnconvert", run_name="__main__")  # what `python -m lnconvert` runs
    assert exit.value.code == 2 and capsys.readouterr().err.startswith("error: recipe not found")


# --- the transfer recipe: each (arm, batch size) task fine-tunes data parallel ------------------
TRANSFER_REDUCED = ["threads=1", "data.size=8", "model.widths=[4,8]", "model.blocks=1", "pretrain.epochs=2",
                    "split.target_test=120", "samples=6", "curve_points=2", "seeds=[0]", "lr_grid=[0.001]",
                    "twin_lr_factors=[1,10]", "batch_sizes=[1,3]",  # 3: rows 2 + 1 (weights 4/3, 2/3); 1: rank 1 idle
                    "arms=[no-finetune, bn-frozen, groupnorm, linked-mirror, bn-train]"]
SAME_ON_ANY_WORLD_SIZE = ("no-finetune", "bn-frozen", "groupnorm", "linked-mirror")


def _cli_sets(overrides: list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


@pytest.fixture(scope="module")
def transfer_two_and_one(tmp_path_factory):
    """The reduced transfer recipe run by 2 forked ranks and by this process, both fine-tuning the
    model the 2 ranks pretrained (BN pretraining normalises with each rank's rows, so a model
    pretrained by one process differs: the one-process run resumes the 2-process checkpoint)."""
    tmp = tmp_path_factory.mktemp("ddp-transfer")
    args = [str(RECIPES / "transfer-digits.yaml"), "--out", str(tmp / "two"), *_cli_sets(TRANSFER_REDUCED)]
    codes = _join(_start(_cli_rank(tmp, lambda rank: args)), timeout=300)
    assert codes == [0, 0], _errors(tmp)
    pretrained = tmp / "one" / "checkpoints" / "pretrain.pt"
    pretrained.parent.mkdir(parents=True)
    pretrained.write_bytes((tmp / "two" / "checkpoints" / "pretrain.pt").read_bytes())
    single = run_recipe(RECIPES / "transfer-digits.yaml", out=tmp / "one", overrides=TRANSFER_REDUCED, console=QUIET)
    return tmp, json.loads((tmp / "two" / "metrics.json").read_text()), single


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * abs(b)


def test_transfer_on_two_processes_gives_the_one_process_results(transfer_two_and_one):
    tmp, two, one = transfer_two_and_one
    assert (two["world_size"], two["backend"], one["world_size"], one["backend"]) == (2, "gloo", 1, None)
    assert two["per_rank_statistics"] == ["bn-train"] and one["per_rank_statistics"] == []
    assert [(r["arm"], r["batch_size"]) for r in two["runs"]] == [(r["arm"], r["batch_size"]) for r in one["runs"]]
    assert _close(two["source_test_accuracy"], one["source_test_accuracy"])  # the same pretrained model
    one_flip = 1.0 / two["sizes"]["target_test"] + 1e-12  # a near-tie argmax may flip within the tolerance
    for got, expected in zip(two["runs"], one["runs"]):
        assert got["steps"] == expected["steps"] and got["samples_seen"] == expected["samples_seen"]
        if got["arm"] not in SAME_ON_ANY_WORLD_SIZE:
            assert 0.0 <= got["test_accuracy"] <= 1.0 and got["finite"]  # bn-train: per-rank statistics
            continue
        key = (got["arm"], got["batch_size"])
        assert _close(got["test_loss"], expected["test_loss"]), key
        assert abs(got["test_accuracy"] - expected["test_accuracy"]) <= one_flip, key
        if got["steps"]:
            assert _close(got["final_train_loss"], expected["final_train_loss"]), key
            for (n, a), (m, b) in zip(got["curve"], expected["curve"], strict=True):
                assert n == m and abs(a - b) <= one_flip, key
    for got, expected in zip(two["selection"], one["selection"]):  # the same validation losses choose the same lr
        assert [(g["lr"], g["twin_lr"]) for g in got["grid"]] == [(g["lr"], g["twin_lr"]) for g in expected["grid"]]
        for g, e in zip(got["grid"], expected["grid"]):
            if got["arm"] in SAME_ON_ANY_WORLD_SIZE:
                assert _close(g["val_loss"], e["val_loss"]), got["arm"]
    # fine-tuning moved the model, so agreeing is not agreeing on the pretrained function
    floor = {r["batch_size"]: r["test_loss"] for r in one["runs"] if r["arm"] == "no-finetune"}
    tuned = [r for r in one["runs"] if r["arm"] == "linked-mirror"]
    assert all(abs(r["test_loss"] - floor[r["batch_size"]]) > 100 * REL * floor[r["batch_size"]] for r in tuned)
    assert (tmp / "two" / "transfer.png").is_file() and not list((tmp / "two").rglob(".*.tmp*"))


def test_transfer_stores_bn_train_apart_from_one_process_results(transfer_two_and_one):
    from lnconvert.recipes.config import load_recipe
    from lnconvert.recipes.transfer import cached_result

    tmp, two, _ = transfer_two_and_one
    config = load_recipe(RECIPES / "transfer-digits.yaml", TRANSFER_REDUCED)
    pretrained = tmp / "two" / "checkpoints" / "pretrain.pt"
    assert (pretrained.parent / "bn-train-bs3.json").is_file()
    # one process reuses the 2-process results except bn-train's (its batch statistics were per rank)
    assert cached_result(config, "bn-train", 3, pretrained) is None
    assert cached_result(config, "linked-mirror", 3, pretrained)["runs"] == [
        r for r in two["runs"] if (r["arm"], r["batch_size"]) == ("linked-mirror", 3)]


def test_transfer_refuses_jobs_under_torchrun(tmp_path):
    args = [str(RECIPES / "transfer-digits.yaml"), "--out", str(tmp_path / "run"), "--jobs", "2"]
    codes = _join(_start(_cli_rank(tmp_path, lambda rank: args)), timeout=120)
    assert codes == [2, 2]
    (message,) = _errors(tmp_path)
    assert "jobs 2 cannot be combined with torchrun" in message


# --- the torchrun command itself ---------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_runs_the_digits_recipe_on_two_processes(tmp_path):  # ~1 min on 2 shared cores
    sets = [a for s in REDUCED_DIGITS for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lnconvert", "recipe", "run", str(RECIPES / "digits-resnet.yaml"),
                           "--out", str(tmp_path), *sets], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["backend"]) == (2, "gloo")
    assert metrics["predictions_changed_by_conversion"] == 0
    assert [r["batch_size"] for r in metrics["finetune"]] == [1, 32]

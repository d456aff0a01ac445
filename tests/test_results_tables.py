"""benchmarks/results_tables.py: the published tables are computed from the published runs."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results_tables  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


@pytest.mark.parametrize("name,render", [("depth50-digits", results_tables.depth_markdown),
                                         ("transfer-digits", results_tables.transfer_markdown)])
def test_committed_tables_match_the_committed_runs(name, render):
    metrics = json.loads((RESULTS / f"{name}.json").read_text())
    assert render(metrics) == (RESULTS / f"{name}.md").read_text()


def _depth_run(variant, seed, accuracy):
    return {"variant": variant, "seed": seed, "epochs": 2, "test_accuracy": accuracy, "trains": accuracy > 0.5,
            "dead_fraction": 0.0, "test_accuracy_per_epoch": [0.1, accuracy]}


def _depth_file(path, runs):
    path.write_text(json.dumps({"recipe": "depth50-digits", "data": "d", "split_seed": 0, "trains_threshold": 0.5,
                                "runs": runs, "torch": "t"}))
    return path


def test_depth_merge_summarises_disjoint_runs_and_refuses_a_repeated_seed(tmp_path):
    a = _depth_file(tmp_path / "a.json", [_depth_run("relu", s, 0.1) for s in range(5)])
    b = _depth_file(tmp_path / "b.json", [_depth_run("linked_relu", s, 0.9 + 0.01 * s) for s in range(5)])
    merged = results_tables.merge_depth([a, b])
    rows = {r["variant"]: r for r in merged["summary"]}
    assert rows["linked_relu"]["mean"] == pytest.approx(0.92, abs=1e-12)
    assert rows["linked_relu"]["trained_fraction"] == 1.0 and rows["relu"]["trained_fraction"] == 0.0
    assert not merged["complete"] and "selu" in merged["not_run"]  # 8 of the 10 variants missing
    assert [s["file"] for s in merged["sources"]] == ["a.json", "b.json"]
    again = _depth_file(tmp_path / "c.json", [_depth_run("relu", 3, 0.1)])
    with pytest.raises(SystemExit, match="already in an earlier file"):
        results_tables.merge_depth([a, again])

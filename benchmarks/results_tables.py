"""Publish the depth and transfer recipes' measured runs: merge, summarise, plot, tabulate.

Each recipe writes its own ``metrics.json``. This script turns one or more of them into the
committed files under ``benchmarks/results/`` (the flat JSON, its plot, and a Markdown table that
the docs site includes), so the published tables are computed from the published runs, never
typed by hand. Several depth runs (different variants, run on different days) are merged only if
no (variant, seed) appears twice; their provenance lines are kept in ``sources``.

    python benchmarks/results_tables.py depth runs/depth50-digits/metrics.json [more.json ...]
    python benchmarks/results_tables.py transfer runs/transfer-digits/metrics.json
    python benchmarks/results_tables.py depth --render-only   # tables from the committed JSON
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from lnconvert.recipes import depth as depth_recipe
from lnconvert.recipes import load_recipe
from lnconvert.recipes import transfer as transfer_recipe
from lnconvert.recipes.output import plot_depth, write_json

RESULTS = Path(__file__).resolve().parent / "results"
DEPTH_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "depth50-digits.yaml"


def _sources(metrics: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """What each merged file says about where and how it was run."""
    if "sources" in metrics:  # an already merged file
        return metrics["sources"]
    keys = ("torch", "cpu_capability", "threads", "seconds", "note", "time_limit_minutes")
    return [{"file": path.name, **{k: metrics[k] for k in keys if k in metrics}}]


def merge_depth(paths: list[Path]) -> dict[str, Any]:
    """One depth results file from several runs of the same recipe (disjoint (variant, seed) sets)."""
    runs, sources, first = [], [], None
    for path in paths:
        metrics = json.loads(path.read_text())
        first = first or metrics
        if metrics["recipe"] != first["recipe"] or metrics["data"] != first["data"]:
            sys.exit(f"{path}: recipe/data {metrics['recipe']!r} differs from {first['recipe']!r}")
        seen = {(r["variant"], r["seed"]) for r in runs}
        twice = [(r["variant"], r["seed"]) for r in metrics["runs"] if (r["variant"], r["seed"]) in seen]
        if twice:
            sys.exit(f"{path}: (variant, seed) {twice[0]} is already in an earlier file; merge disjoint runs only")
        runs += metrics["runs"]
        sources += _sources(metrics, path)
    planned = load_recipe(DEPTH_RECIPE, [])["variants"]  # the shipped recipe's variants, in its order
    order = {v: i for i, v in enumerate(planned)}
    runs.sort(key=lambda r: (order.get(r["variant"], len(order)), r["seed"]))
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    missing = [v for v in planned if v not in variants]
    return {"recipe": first["recipe"], "data": first["data"], "split_seed": first["split_seed"],
            "seeds": sorted({r["seed"] for r in runs}), "trains_threshold": first["trains_threshold"],
            "summary": depth_recipe.summarise(runs, variants), "runs": runs, "sources": sources,
            "complete": not missing and all(len({r["seed"] for r in runs if r["variant"] == v}) >= 5
                                            for v in variants),
            "not_run": sorted(missing)}


def depth_markdown(metrics: dict[str, Any]) -> str:
    lines = ["| variant | epochs | seeds | mean | std | trains (> 0.5) | per seed | dead units (mean) "
             "| paper, CIFAR-10 |", "|---|---|---|---|---|---|---|---|---|"]
    for row in metrics["summary"]:
        per_seed = " ".join(f"{acc:.3f}" for _, acc in sorted(row["per_seed"].items(), key=lambda kv: int(kv[0])))
        paper = "-" if row["paper_cifar10"] is None else f"{row['paper_cifar10']:.3f}"
        lines.append(f"| {row['variant']} | {','.join(map(str, row['epochs']))} | {row['seeds']} | {row['mean']:.3f} "
                     f"| {row['std']:.3f} | {row['trained_fraction']:.0%} | {per_seed} "
                     f"| {row['dead_fraction_mean']:.0%} | {paper} |")
    if metrics.get("not_run"):
        lines.append("")
        lines.append("Not run: " + ", ".join(metrics["not_run"]) + ".")
    return "\n".join(lines) + "\n"


def transfer_markdown(metrics: dict[str, Any]) -> str:
    def mib(n: int | None) -> str:
        return "-" if n is None else f"{n / 2**20:.2f} MiB"

    lines = []
    if "pretrained_dead_units" in metrics:
        dead = metrics["pretrained_dead_units"]
        lines += [f"Pretrained model: ReLU units that are zero on every image, {dead['target_fit']['dead']} of "
                  f"{dead['target_fit']['units']} on the target fine-tuning images and {dead['source_test']['dead']} "
                  f"of {dead['source_test']['units']} on the source test images.", ""]
    lines += ["| arm | batch | mean | std | per seed (0-4) | lr | twin lr | ms/step | peak step memory |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in metrics["summary"]:
        per_seed = " ".join(f"{acc:.3f}" for _, acc in sorted(r["per_seed"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {r['arm']} | {r['batch_size']} | {r['mean']:.3f} | {r['std']:.3f} | {per_seed} | {r['lr']:g} "
                     f"| {'-' if r['twin_lr'] is None else format(r['twin_lr'], 'g')} "
                     f"| {'-' if r['ms_per_step'] is None else round(r['ms_per_step'])} "
                     f"| {mib(r['peak_step_bytes'])} |")
    lines += ["", "Validation accuracy of every grid point (lr, or lr/twin lr; selection seed, the chosen one is "
              "the highest, ties to the lower validation loss):", "",
              "| arm | batch | validation accuracy per grid point |", "|---|---|---|"]
    for s in metrics["selection"]:
        points = ", ".join(f"{g['lr']:g}" + ("" if g["twin_lr"] is None else f"/{g['twin_lr']:.2g}")
                           + f": {g['val_accuracy']:.3f}" for g in s["grid"])
        lines.append(f"| {s['arm']} | {s['batch_size']} | {points} |")
    lines += ["", "Mean target test accuracy along the way (at the curve's sample counts):", "",
              "| arm | batch | samples seen | mean accuracy |", "|---|---|---|---|"]
    for arm, batch in dict.fromkeys((r["arm"], r["batch_size"]) for r in metrics["runs"] if r["curve"]):
        curves = [r["curve"] for r in metrics["runs"] if r["arm"] == arm and r["batch_size"] == batch]
        xs = [p[0] for p in curves[0]]
        means = [statistics.fmean(c[i][1] for c in curves) for i in range(len(xs))]
        lines.append(f"| {arm} | {batch} | {' / '.join(map(str, xs))} | {' / '.join(f'{m:.3f}' for m in means)} |")
    compacted = [r for r in metrics["runs"] if "compaction" in r]
    if compacted:
        lines += ["", "Compaction after fine-tuning (`linked-mirror-compact`): MACs of the compacted model / "
                  "the original's, and twins removed per reason, per run (the arm's curve above is before "
                  "compaction; its final accuracy in the first table is after it):", "",
                  "| batch | seed | MAC ratio | removed |", "|---|---|---|---|"]
        for r in compacted:
            removed = ", ".join(f"{k} {v}" for k, v in r["compaction"]["removed"].items())
            lines.append(f"| {r['batch_size']} | {r['seed']} | {r['compaction']['macs_ratio']:.3f} | {removed} |")
    if metrics.get("not_run"):
        lines += ["", "Not run: " + ", ".join(f"{r['arm']} batch {r['batch_size']}" for r in metrics["not_run"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=["depth", "transfer"])
    parser.add_argument("metrics", nargs="*", type=Path, help="the recipe's metrics.json file(s)")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the Markdown table from the "
                        "committed JSON")
    args = parser.parse_args()
    name = {"depth": "depth50-digits", "transfer": "transfer-digits"}[args.recipe]
    json_path = RESULTS / f"{name}.json"
    if args.render_only:
        metrics = json.loads(json_path.read_text())
    elif not args.metrics:
        parser.error("give the metrics.json file(s) to publish, or --render-only")
    elif args.recipe == "depth":
        metrics = merge_depth(args.metrics)
        write_json(json_path, metrics)
        plot_depth(metrics["runs"], RESULTS / f"{name}.png", metrics["recipe"], metrics["trains_threshold"])
    else:
        if len(args.metrics) != 1:
            parser.error("transfer: one metrics.json (every arm shares one pretrained model)")
        metrics = json.loads(args.metrics[0].read_text())
        write_json(json_path, metrics)
        batch_sizes = sorted({r["batch_size"] for r in metrics["runs"]})
        transfer_recipe.plot_transfer(metrics["runs"], batch_sizes, RESULTS / f"{name}.png", metrics["recipe"])
    render = depth_markdown if args.recipe == "depth" else transfer_markdown
    (RESULTS / f"{name}.md").write_text(render(metrics))
    print(f"wrote {RESULTS / (name + '.md')}" + ("" if args.render_only else f", {json_path.name} and the plot"))


if __name__ == "__main__":
    main()

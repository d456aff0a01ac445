"""Where ONNX Runtime spends its time: per op type, original vs converted export.

Runs each export with ORT's profiler (``SessionOptions.enable_profiling``, 1 intra-op thread
by default, all graph optimisations on) and sums the kernel time of every node by op type
(the optimised graph's ops: fused ``Conv``, NCHWc ``ReorderInput``/``ReorderOutput``, ...),
per run. The sessions are run interleaved, so machine load affects them alike.

    python benchmarks/onnx_profile.py [--models mobilenet_v2] [--runs 20] [--batch 1]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
from common import converted_zoo_model

from lnconvert.export import export_onnx


def op_times(trace: Path, runs: int) -> tuple[dict[str, float], Counter]:
    """ms per run by op type, and nodes per op type, from an ORT profile (warm-up run excluded)."""
    events = [e for e in json.loads(trace.read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    total: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    for event in events:
        op = event["args"]["op_name"]
        total[op] += event["dur"] / 1e3
        nodes[op].add(event["name"])
    per_run = {op: ms / (runs + 1) for op, ms in total.items()}  # the warm-up run is in the trace
    return per_run, Counter({op: len(names) for op, names in nodes.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, x, result = converted_zoo_model(name, args.size)
            stem = Path(tmp) / name.replace("/", "_")
            paths = {"original": export_onnx(model, f"{stem}-orig.onnx", example_inputs=(x,)),
                     "converted": export_onnx(result, f"{stem}-linked.onnx")}
            sessions = {}
            for key, path in paths.items():
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                options.enable_profiling = True
                options.profile_file_prefix = str(Path(tmp) / f"{stem.name}-{key}")
                sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size), dtype=np.float32)
            for _ in range(args.runs + 1):
                for sess in sessions.values():
                    sess.run(None, {sess.get_inputs()[0].name: feed})
            profiles = {key: op_times(Path(sess.end_profiling()), args.runs) for key, sess in sessions.items()}
            ops = sorted({op for times, _ in profiles.values() for op in times},
                         key=lambda op: -max(p[0].get(op, 0.0) for p in profiles.values()))
            print(f"{name}, batch {args.batch}, {args.runs} runs, {args.threads} intra-op thread(s): "
                  f"ms per run (nodes)")
            print(f"{'op':24s} " + " ".join(f"{k:>18s}" for k in profiles))
            print(f"{'all':24s} " + " ".join(f"{sum(t.values()):18.2f}" for t, _ in profiles.values()))
            for op in ops:
                cells = [f"{t.get(op, 0.0):11.2f} ({n.get(op, 0):4d})" for t, n in profiles.values()]
                print(f"{op:24s} " + " ".join(cells))


if __name__ == "__main__":
    main()

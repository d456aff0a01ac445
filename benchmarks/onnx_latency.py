"""ONNX Runtime latency of original vs converted (linked, BN-free) vs compacted models.

Per model and batch size prints, for the converted export and for the compacted one (every
twin removed by lnconvert.compact's exact stage, so 1.0x MACs), the ratio to the original
of: median latency (all three sessions measured interleaved, run by run, so machine load
affects them alike), MACs (conversion report), their quotient (latency x / MACs x; the
issue-19 target is <= 1.4 for depthwise nets and <= 1.15 for dense ones), and bytes (every
op of the exported graph: inputs read + outputs written, weights included, float32, from
ONNX shape inference at that batch size), plus the layout ops (Reshape, Transpose, Gather,
Split, Slice, Concat) the converted export adds to the original's, and the 1-minute load
average of the machine when the row finished.

    python benchmarks/onnx_latency.py [--runs 20] [--threads 1] [--size 224] [--models resnet18 ...]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from common import converted_zoo_model

from lnconvert.compact import compact
from lnconvert.export import describe_layout_ops, export_onnx, layout_ops, layout_ops_why

MODELS = ["mobilenet_v2", "resnet18", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0", "regnet_y_400mf",
          "shufflenet_v2_x1_0", "timm/mobilenetv3_small_050", "timm/efficientnet_b0", "timm/ghostnet_050"]


def graph_bytes(path: Path, batch: int) -> int:
    """Bytes read and written by every node of the graph (float32 tensors; a symbolic dim is
    the batch), weights included: the memory traffic a depthwise net is bound by."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    sizes = {init.name: math.prod(init.dims) for init in model.graph.initializer}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        sizes[value.name] = math.prod(d.dim_value if d.dim_value else batch for d in dims)
    return 4 * sum(sizes.get(name, 0) for node in model.graph.node for name in [*node.input, *node.output] if name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0: ORT's default)")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    print(f"ORT {ort.__version__}, CPUExecutionProvider, {args.size}x{args.size}, median of {args.runs} interleaved "
          f"runs, intra-op threads: {args.threads or 'ORT default'}")
    print(f"{'model':28s} {'batch':>5s} {'orig ms':>8s} | {'conv lat x':>10s} {'MACs x':>6s} {'quot':>5s} "
          f"{'bytes x':>7s} | {'compact lat x':>13s} {'MACs x':>6s} {'quot':>5s} {'bytes x':>7s} | load "
          f"| layout ops added")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, x, result = converted_zoo_model(name, args.size)
            small = compact(result)
            stem = Path(tmp) / name.replace("/", "_")
            paths = {"original": export_onnx(model, f"{stem}-orig.onnx", example_inputs=(x,)),
                     "converted": export_onnx(result, f"{stem}-linked.onnx"),
                     "compacted": export_onnx(small.model, f"{stem}-compact.onnx", example_inputs=(x,))}
            sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                        for k, p in paths.items()}
            macs = {"converted": result.report.macs_after / result.report.macs_before,
                    "compacted": small.report.macs_after / small.report.macs_original}
            before, after = layout_ops(paths["original"]), layout_ops(paths["converted"])
            added = describe_layout_ops(after - before, layout_ops_why(paths["converted"]))
            if before - after:  # e.g. a channel shuffle exported as gathers instead of reshapes
                added += f"; in all {sum(after.values())} vs the original's {sum(before.values())}"
            for batch in args.batches:
                feed = np.random.default_rng(0).standard_normal((batch, 3, args.size, args.size), dtype=np.float32)
                times = {k: [] for k in sessions}
                for sess in sessions.values():  # warm-up
                    sess.run(None, {sess.get_inputs()[0].name: feed})
                for _ in range(args.runs):
                    for key, sess in sessions.items():
                        start = time.perf_counter()
                        sess.run(None, {sess.get_inputs()[0].name: feed})
                        times[key].append(time.perf_counter() - start)
                median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                base_bytes = graph_bytes(paths["original"], batch)
                cells = []
                for key in ("converted", "compacted"):
                    latency = median[key] / median["original"]
                    cells.append(f"{latency:10.2f} {macs[key]:6.2f} {latency / macs[key]:5.2f} "
                                 f"{graph_bytes(paths[key], batch) / base_bytes:7.2f}")
                load = os.getloadavg()[0]  # 1-minute load average at the end of the row's runs
                print(f"{name:28s} {batch:5d} {median['original']:8.2f} | {cells[0]} | {cells[1]:>35s} | {load:4.1f} "
                      f"| {added}", flush=True)


if __name__ == "__main__":
    main()

"""ONNX Runtime latency of original vs converted (linked, BN-free) models.

Prints, per model and batch size, the median latency of each over >= 30 runs (measured
interleaved, so machine load affects both alike), their ratio, and the MAC ratio from the
conversion report: the honest cost of linking before any compaction.

    python benchmarks/onnx_latency.py [--runs 30] [--size 224] [--models resnet18 ...]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import lnconvert
from lnconvert.export import export_onnx
from lnconvert.testing import randomize_batchnorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    print(f"ORT {ort.__version__}, CPUExecutionProvider, {args.size}x{args.size}, median of {args.runs} runs, "
          f"intra-op threads: ORT default")
    print(f"{'model':18s} {'batch':>5s} {'original ms':>12s} {'converted ms':>13s} {'latency x':>10s} {'MACs x':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = lnconvert.load_model(name)
            randomize_batchnorm(model, torch.randn(4, 3, args.size, args.size))
            x = torch.randn(2, 3, args.size, args.size)
            result = lnconvert.convert(model, example_inputs=x)
            paths = {"original": export_onnx(model, Path(tmp) / f"{name}-orig.onnx", example_inputs=(x,)),
                     "converted": export_onnx(result, Path(tmp) / f"{name}-linked.onnx")}
            sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
            macs = result.report.macs_after / result.report.macs_before
            for batch in args.batches:
                feed = np.random.default_rng(0).standard_normal((batch, 3, args.size, args.size), dtype=np.float32)
                times = {k: [] for k in sessions}
                for key, sess in sessions.items():  # warm-up
                    sess.run(None, {sess.get_inputs()[0].name: feed})
                for _ in range(args.runs):
                    for key, sess in sessions.items():
                        start = time.perf_counter()
                        sess.run(None, {sess.get_inputs()[0].name: feed})
                        times[key].append(time.perf_counter() - start)
                orig, conv = (statistics.median(times[k]) * 1e3 for k in ("original", "converted"))
                print(f"{name:18s} {batch:5d} {orig:12.2f} {conv:13.2f} {conv / orig:10.2f} {macs:7.2f}", flush=True)


if __name__ == "__main__":
    main()

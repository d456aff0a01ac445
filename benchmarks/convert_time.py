"""Conversion time of one model, tracing included, with the time of every pass, beside torch.fx's fuse.

    python benchmarks/convert_time.py [--models resnet50 ...] [--size 224] [--repeats 5] [--threads 1] [--zoo]

Converts the same model (random init, randomised BN statistics) ``repeats`` times without and
with verification, after one warm-up conversion (lazy imports), and prints the median total
and the median seconds of each pass (pass_seconds in the report), side by side, plus the
process CPU time: on a loaded shared machine wall time mostly measures the other jobs, while
CPU time with ``--threads 1`` is close to the wall time the conversion takes on a quiet core.

The anchor: ``torch.fx.experimental.optimization.fuse`` (trace + fold conv/BN) timed on the
same model in the same run, interleaved with the conversions, and the ratio lnconvert without
verification / fuse. ``--zoo`` also prints the total conversion time (no verification, one
conversion each) of the whole torchvision classification zoo.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.fx.experimental.optimization import fuse

import lnconvert
from lnconvert.testing import randomize_batchnorm


def _timed(fn) -> tuple[float, float, object]:
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - start_cpu, out


def one_model(name: str, size: int, repeats: int) -> None:
    torch.manual_seed(0)
    model = lnconvert.load_model(name).eval()
    generator = torch.Generator().manual_seed(0)
    randomize_batchnorm(model, torch.randn(4, 3, size, size, generator=generator))
    x = torch.randn(2, 3, size, size, generator=generator)
    lnconvert.convert(model, example_inputs=x, verify=False)  # warm-up (lazy imports)
    fuse(model)
    fused, fused_cpu = [], []
    for verify in (False, True):
        totals, cpu, passes = [], [], {}
        for _ in range(repeats):
            wall, cpu_s, _ = _timed(lambda: fuse(model))  # interleaved with the conversions
            fused.append(wall)
            fused_cpu.append(cpu_s)
            wall, cpu_s, result = _timed(lambda: lnconvert.convert(model, example_inputs=x, verify=verify))
            totals.append(wall)
            cpu.append(cpu_s)
            for key, seconds in result.report.pass_seconds.items():
                passes.setdefault(key, []).append(seconds)
        detail = ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in passes.items())
        anchor, anchor_cpu = statistics.median(fused), statistics.median(fused_cpu)
        ratio = (f"; fuse {anchor:.3f} s (CPU {anchor_cpu:.3f} s), "
                 f"lnconvert/fuse {statistics.median(totals) / anchor:.1f}x "
                 f"(CPU {statistics.median(cpu) / anchor_cpu:.1f}x)") if not verify else ""
        print(f"{name} {size}x{size} verify={verify}: median {statistics.median(totals):.2f} s "
              f"(min {min(totals):.2f}), CPU {statistics.median(cpu):.2f} s, over {repeats}{ratio}; "
              f"load average {os.getloadavg()[0]:.1f}; passes: {detail}", flush=True)


def zoo_total(size: int) -> None:
    """One conversion (no verification) of every torchvision classification model."""
    import torchvision

    names = sorted(torchvision.models.list_models(module=torchvision.models))
    total, total_cpu, failed = 0.0, 0.0, []
    for name in names:
        model = lnconvert.load_model(name).eval()
        x = torch.randn(2, 3, size, size)
        try:
            wall, cpu_s, _ = _timed(lambda: lnconvert.convert(model, example_inputs=x, verify=False))
            total, total_cpu = total + wall, total_cpu + cpu_s
        except Exception as exc:  # noqa: BLE001 - a model that does not convert is reported, not fatal
            failed.append(f"{name} ({type(exc).__name__})")
    print(f"torchvision classification zoo: {len(names) - len(failed)} models converted in {total:.1f} s "
          f"(CPU {total_cpu:.1f} s) "
          f"(no verification, {size}x{size}); not converted: {', '.join(failed) or 'none'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--zoo", action="store_true", help="also the torchvision zoo's total conversion time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        one_model(name, args.size, args.repeats)
    if args.zoo:
        zoo_total(args.size)


if __name__ == "__main__":
    main()

"""Conversion time of one model, tracing included, with the time of every pass.

    python benchmarks/convert_time.py [--model resnet50] [--size 224] [--repeats 5] [--threads 2]

Converts the same model (random init, randomised BN statistics) ``repeats`` times without and
with verification, after one warm-up conversion (lazy imports), and prints the median total
and the median seconds of each pass (pass_seconds in the report), side by side, plus the
process CPU time: on a loaded shared machine wall time mostly measures the other jobs, while
CPU time with ``--threads 1`` is close to the wall time the conversion takes on a quiet core.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import lnconvert
from lnconvert.testing import randomize_batchnorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = lnconvert.load_model(args.model)
    generator = torch.Generator().manual_seed(0)
    randomize_batchnorm(model, torch.randn(4, 3, args.size, args.size, generator=generator))
    x = torch.randn(2, 3, args.size, args.size, generator=generator)
    lnconvert.convert(model, example_inputs=x, verify=False)  # warm-up
    for verify in (False, True):
        totals, cpu, passes = [], [], {}
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            report = lnconvert.convert(model, example_inputs=x, verify=verify).report
            totals.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            for name, seconds in report.pass_seconds.items():
                passes.setdefault(name, []).append(seconds)
        detail = ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in passes.items())
        print(f"{args.model} {args.size}x{args.size} verify={verify}: median {statistics.median(totals):.2f} s "
              f"(min {min(totals):.2f}), CPU {statistics.median(cpu):.2f} s, over {args.repeats}; "
              f"load average {os.getloadavg()[0]:.1f}; passes: {detail}")


if __name__ == "__main__":
    main()

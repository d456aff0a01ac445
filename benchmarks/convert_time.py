"""Conversion time of one model, tracing included, with the time of every pass, beside torch.fx's fuse.

    python benchmarks/convert_time.py [--models resnet50 ...] [--size 224] [--repeats 3] [--threads 1] [--zoo]

Converts the same model (random init, randomised BN statistics) ``repeats`` times without and
with verification, after one warm-up conversion (lazy imports), and prints the median total
and the median seconds of each pass (pass_seconds in the report), side by side, plus the
process CPU time: on a loaded shared machine wall time mostly measures the other jobs, while
CPU time with ``--threads 1`` is close to the wall time the conversion takes on a quiet core.

The anchor: ``torch.fx.experimental.optimization.fuse`` (trace + fold conv/BN) timed on the
same model in the same run, interleaved with the conversions, and the ratio lnconvert without
verification / fuse. ``--zoo`` also prints the total conversion time (no verification, one
conversion each, right after one fuse of the same model) of the whole torchvision classification
zoo, per model and in total, beside fuse's; ``--models`` with no names runs the zoo alone.
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


def _parameters(name: str) -> int | None:
    """Parameter count from torchvision's weight metadata, without building the model."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
    except (ValueError, KeyError, AttributeError):
        return None


def zoo_total(size: int, max_params: int) -> None:
    """One conversion (no verification) of every torchvision classification model, each right
    after fuse on the same model, and the totals; models over ``max_params`` are skipped (a
    conversion holds the source, its copy and the widened model: regnet_y_128gf and vit_h_14
    exceed the 8 GiB a job may use on the project's shared machine)."""
    import torchvision

    names = sorted(torchvision.models.list_models(module=torchvision.models))
    lnconvert.convert(lnconvert.load_model("resnet18"), example_inputs=torch.randn(1, 3, size, size), verify=False)
    totals, failed, skipped = [0.0, 0.0, 0.0, 0.0], [], []
    for name in names:
        params = _parameters(name)
        if params is not None and params > max_params:
            skipped.append(f"{name} ({params / 1e6:.0f}M parameters)")
            continue
        model = lnconvert.load_model(name).eval()
        x = torch.randn(2, 3, size, size)
        try:
            anchor, anchor_cpu = _timed(lambda: fuse(model))[:2]
            wall, cpu_s = _timed(lambda: lnconvert.convert(model, example_inputs=x, verify=False))[:2]
        except Exception as exc:  # noqa: BLE001 - a model that does not convert is reported, not fatal
            failed.append(f"{name} ({type(exc).__name__})")
            continue
        for i, value in enumerate((wall, cpu_s, anchor, anchor_cpu)):
            totals[i] += value
        print(f"  {name}: lnconvert {wall:.2f} s (CPU {cpu_s:.2f}), fuse {anchor:.2f} s (CPU {anchor_cpu:.2f}), "
              f"{wall / anchor:.1f}x (CPU {cpu_s / anchor_cpu:.1f}x)", flush=True)
    converted = len(names) - len(failed) - len(skipped)
    print(f"torchvision classification zoo: {converted} models converted in {totals[0]:.1f} s (CPU {totals[1]:.1f} s), "
          f"fuse {totals[2]:.1f} s (CPU {totals[3]:.1f} s), lnconvert/fuse {totals[0] / totals[2]:.1f}x "
          f"(CPU {totals[1] / totals[3]:.1f}x) (no verification, {size}x{size}); "
          f"load average {os.getloadavg()[0]:.1f}; not converted: {', '.join(failed) or 'none'}; "
          f"skipped: {', '.join(skipped) or 'none'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--zoo", action="store_true", help="also the torchvision zoo's total conversion time")
    parser.add_argument("--zoo-max-params", type=float, default=400e6,
                        help="skip zoo models with more parameters (memory; default 400M: regnet_y_128gf, vit_h_14)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}", flush=True)
    for name in args.models:
        one_model(name, args.size, args.repeats)
    if args.zoo:
        zoo_total(args.size, int(args.zoo_max_params))


if __name__ == "__main__":
    main()

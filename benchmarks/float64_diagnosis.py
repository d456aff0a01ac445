"""Why a zoo model fails by float32 rounding: its float32 floor, its float64 sensitivity, and
which conversion step the float64 copy's error comes from.

    python benchmarks/float64_diagnosis.py [torchvision/efficientnet_b6]

Builds the model exactly as the zoo's row does (seed 0, the size ladder, randomised BN
statistics, the same input) and prints: the original's own float32 floor (max rel of float32
against float64); how far its float64 output moves when every float64 weight and buffer is
perturbed by 2^-52 relative (float64 rounding amplified: the scale of error a correct float64
conversion can show); the float64 copy's conversion error with folding only (``link=False``),
linking only (``drop_bn=False``) and both; and the float32 conversion's verdict.
"""
from __future__ import annotations

import copy
import sys

import torch

from lnconvert.convert import convert
from lnconvert.errors import ParityError
from lnconvert.models import load_model
from lnconvert.options import ConvertOptions
from lnconvert.testing import randomize_batchnorm
from lnconvert.verify import compare, parity
from lnconvert.zoo.child import _run_size
from lnconvert.zoo.config import ZooOptions


def main(name: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # as lnconvert.zoo.child.convert_one
    model = load_model(name)
    channels, side = _run_size(name, model, ZooOptions())
    generator = torch.Generator().manual_seed(0)
    randomize_batchnorm(model, torch.randn(4, channels, side, side, generator=generator))
    x = torch.randn(2, channels, side, side, generator=generator)
    model.eval()
    wide = copy.deepcopy(model).double()
    with torch.no_grad():
        y32, y64 = model(x), wide(x.double())
        print(f"{name} at {channels}x{side}x{side}: max |y| {float(y64.abs().max()):.3g}, "
              f"float32 floor {parity(y64, y32)[1]:.2e}")
        torch.manual_seed(1)
        for t in (*wide.parameters(), *wide.buffers()):
            if t.is_floating_point():
                t.mul_(1 + 2.0 ** -52 * torch.randn_like(t))
        print(f"float64 weights perturbed by 2^-52 relative: output moves {parity(y64, wide(x.double()))[1]:.2e}")
    for label, kwargs in (("folding only", {"link": False}), ("linking only", {"drop_bn": False}), ("both", {})):
        double = copy.deepcopy(model).double()
        options = ConvertOptions(**kwargs).graph_kwargs() | {"lcw": False}
        converted = convert(double, example_inputs=x.double(), verify=False, **options).model
        error = max(p.max_rel for p in compare(double, converted, [("x", (x.double(),))], tolerance=1.0))
        print(f"float64 copy converted, {label}: max rel {error:.2e}")
    try:
        report = convert(model, example_inputs=x, name=name, partial=True).report
        print(f"float32 conversion: {report.status}, max rel {report.max_rel_error:.2e}; float32-rounding rule: "
              f"float64 copy {report.float64_conversion_error}, rounded copy {report.rounded_copy_error}")
    except ParityError as exc:
        row = max(exc.report.parity, key=lambda p: p.max_rel)
        print(f"float32 conversion fails: max rel {row.max_rel:.2e}, the original's own float32 floor "
              f"{row.native_noise:.2e}; float32-rounding rule: float64 copy {exc.report.float64_conversion_error}, "
              f"rounded copy {exc.report.rounded_copy_error}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "torchvision/efficientnet_b6")

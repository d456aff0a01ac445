"""What the train-step benchmarks share: their timing arguments and a reproducible set-up."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lnconvert import ConversionResult


def train_step_parser(doc: str, steps: int) -> argparse.ArgumentParser:
    """A parser with the arguments every train-step benchmark takes (input side, timing, threads)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="square input side")
    parser.add_argument("--steps", type=int, default=steps, help="train steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (the median is printed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser


def set_up(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and seed torch, so every model sees the same random data."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def converted_zoo_model(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor, ConversionResult]:
    """``name`` with randomised BN statistics (seed 0), an input batch of 2 at ``size``, and its
    default conversion: the same model for every ONNX benchmark."""
    import lnconvert
    from lnconvert.testing import randomize_batchnorm

    torch.manual_seed(0)
    model = lnconvert.load_model(name)
    randomize_batchnorm(model, torch.randn(4, 3, size, size))
    x = torch.randn(2, 3, size, size)
    return model, x, lnconvert.convert(model, example_inputs=x)

"""Train-step time and memory of a BN model vs each normalisation strategy, linked or not.

    python benchmarks/norm_strategies.py --model resnet18 --size 64 --batches 1 8 32 --threads 1

For every batch size, times one SGD step (forward, backward, update) of the original model
with BatchNorm (train mode: batch statistics) and of each converted model (norm = fold,
normprop, deep-control, and fold + LCW; each with and without linked activations), all
interleaved in one run (lnconvert.recipes.train.time_train_steps), and prints the ratios to
the BN model. Memory is counted exactly rather than sampled: bytes of parameters, their
gradients and every tensor autograd saves for the backward pass (unique storages), which is
what a train step holds at its peak besides transient workspace.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from common import set_up, train_step_parser
from torch import nn

import lnconvert
from lnconvert.recipes.train import time_train_steps
from lnconvert.testing import randomize_batchnorm

STRATEGIES = {"fold": {}, "normprop": {"norm": "normprop"}, "deep-control": {"norm": "deep-control"},
              "fold+lcw": {"lcw": True}}


def train_step_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Parameters + gradients + tensors saved for backward, in bytes, for one train step."""
    model.train()
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    for param in model.parameters():
        storages[param.untyped_storage().data_ptr()] = param.untyped_storage().nbytes()
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return sum(storages.values()) + grads


def main() -> None:
    parser = train_step_parser(__doc__, steps=2)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    set_up(args)
    model = lnconvert.load_model(args.model).eval()
    example = torch.randn(2, 3, args.size, args.size)
    randomize_batchnorm(model, torch.randn(8, 3, args.size, args.size))
    models = {"BN": model}
    for name, options in STRATEGIES.items():
        for link in (False, True):
            models[f"{name}{' linked' if link else ''}"] = lnconvert.convert(model, example_inputs=example,
                                                                               link=link, **options).model
    print(f"{args.model} {args.size}x{args.size}, {torch.get_num_threads()} thread(s), SGD step, "
          f"median of {args.repeats} interleaved repeats of {args.steps} steps")
    print("| model | batch | ms / step | time x BN | memory MB | memory x BN |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size)
        y = torch.randint(0, 10, (batch,))
        seconds = time_train_steps(models, x, y, args.steps, args.repeats)
        memory = {name: train_step_bytes(m, x, y) for name, m in models.items()}
        for name in models:
            print(f"| {name} | {batch} | {1e3 * seconds[name]:.1f} | {seconds[name] / seconds['BN']:.2f} | "
                  f"{memory[name] / 2**20:.1f} | {memory[name] / memory['BN']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

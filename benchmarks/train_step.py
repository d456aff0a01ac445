"""Train-step time of a model with BatchNorm vs BN-free at equal width vs BN-free linked.

    python benchmarks/train_step.py resnet50 --size 64 --batch 16 --threads 1

Prints median seconds per SGD step (forward, backward, update) measured side by side
(interleaved) on random data, and the ratios. "BN-free, equal width" is the same model with
BN folded (``convert(link=False)``); "linked" doubles the consumers' input width.
"""
from __future__ import annotations

import torch
from common import set_up, train_step_parser

import lnconvert
from lnconvert.recipes.train import time_train_steps


def main() -> None:
    parser = train_step_parser(__doc__, steps=3)
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    set_up(args)
    model = lnconvert.load_model(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    example = x[:2]
    free = lnconvert.convert(model, example_inputs=example, link=False).model
    linked = lnconvert.convert(model, example_inputs=example).model
    seconds = time_train_steps({"bn": model, "bn_free": free, "linked": linked}, x, y, args.steps, args.repeats)
    print(f"{args.model} {args.size}x{args.size} batch {args.batch}, {torch.get_num_threads()} thread(s), "
          f"median s/step: " + ", ".join(f"{k} {v:.3f}" for k, v in seconds.items()))
    print(f"BN / BN-free (equal width): {seconds['bn'] / seconds['bn_free']:.2f}x; "
          f"linked / BN: {seconds['linked'] / seconds['bn']:.2f}x")


if __name__ == "__main__":
    main()

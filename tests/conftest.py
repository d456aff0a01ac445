import os

import pytest
import torch

from lnconvert.testing import randomize_batchnorm

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: with -n auto every core already runs a worker, and
    # oversubscribed threads make each worker slower rather than the run faster.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def prepared(model: torch.nn.Module, shape=(2, 3, 64, 64), seed: int = 0):
    """``model`` in eval mode with randomised BN statistics, plus an input batch."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    randomize_batchnorm(model, torch.randn((4,) + tuple(shape[1:]), generator=generator), seed=seed)
    return model, torch.randn(shape, generator=generator)


def pytest_collection_modifyitems(config, items):
    # test_distributed forks its ranks from the test process, and a fork is refused once that
    # process has started autograd's device threads ("Unable to handle autograd's threading in
    # combination with fork-based multiprocessing"; torch.export, used by the pt2 and ONNX exports,
    # starts them). Those tests run first, so every worker forks before anything else ran in it
    # (xdist sends each worker a first batch of consecutive tests).
    items.sort(key=lambda item: item.path.name != "test_distributed.py")

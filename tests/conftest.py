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

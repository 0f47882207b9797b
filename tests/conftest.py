import os

import pytest
import torch

import subquad  # noqa: F401  (first: `python -m pytest` from the root puts the root on sys.path; subquad takes it off)

if not torch.cuda.is_available():      # Triton kernels run on CPU under the interpreter (set before they import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

if "PYTEST_XDIST_WORKER" in os.environ:   # `-n auto` runs one worker per core: one thread each, not one per core each
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

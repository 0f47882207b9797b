import os
import sys
from pathlib import Path

import pytest
import torch

# `python -m pytest` from the repository root puts the root on sys.path, where its folders would shadow
# top-level packages of the same name (`kernels/` hides Hugging Face's `kernels`, which transformers
# imports); subquad itself is imported as the installed package
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

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

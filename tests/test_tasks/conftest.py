"""What the task tests share: one thread per test, the ``subquad`` command as a user runs it, and the
synthetic classification shapes."""
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from subquad.tasks.train.data.synthetic import write_classification


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a few shared cores two threads wait
    on each other: every task test runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _subquad_command(*args: str) -> list[str]:
    exe = shutil.which("subquad")
    return ([exe] if exe else [sys.executable, "-m", "subquad.tasks.cli"]) + list(args)


@pytest.fixture(scope="session")
def subquad_command() -> Callable[..., list[str]]:
    """``subquad_command(*args)``: the command line of the ``subquad`` console script (or, where it is not
    installed, ``python -m subquad.tasks.cli``) with ``args``."""
    return _subquad_command


@pytest.fixture(scope="session")
def run_subquad() -> Callable[..., subprocess.CompletedProcess]:
    """``run_subquad(*args)``: run ``subquad`` in a subprocess, as a user does; its output as text."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(_subquad_command(*args), capture_output=True, text=True, timeout=600)
    return run


@pytest.fixture(scope="session")
def cls_shapes(tmp_path_factory) -> Path:
    """The synthetic classification shapes, 32x32: 6 classes, 30 training and 10 validation images each."""
    return write_classification(tmp_path_factory.mktemp("data") / "cls", train_per_class=30, val_per_class=10)

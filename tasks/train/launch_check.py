"""A launch is refused when the processes that run differ from what the launcher was asked for.

The launcher says how many processes it started in the environment: ``WORLD_SIZE`` (torchrun, which
``accelerate launch --multi_gpu`` runs), or the MPI variables that accelerate reads. Every process compares
that count with the accelerator's. One case leaves no count: ``accelerate launch --num_processes N`` (N > 1)
without ``--multi_gpu`` on a machine with fewer than two GPUs, or with ``--cpu``, starts one plain process
and only sets ``MASTER_ADDR`` / ``MASTER_PORT`` for the processes it did not start; that process would train
alone on 1/N of the intended global batch, so it is refused too. The recipe's ``run.mixed_precision``
decides the precision: an ``accelerate launch --mixed_precision`` that asks for another one (not its
default ``no``) is refused instead of being ignored.
"""
from __future__ import annotations

import os
from typing import Mapping

from accelerate import Accelerator

# The variables accelerate reads a process count from, in its order of precedence.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCH_FIX = ("on GPUs: accelerate launch --multi_gpu --num_processes N -m subquad.tasks.cli train ...; "
              "on a machine without CUDA the same command runs N CPU processes over gloo; one process: "
              "subquad train ... (or accelerate launch --num_processes 1)")


def launched_processes(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """(variable, count) of the launcher's process count in ``environ``; None when no launcher set one."""
    for name in WORLD_SIZE_VARIABLES:
        if environ.get(name, "").strip():
            try:
                return name, int(environ[name])
            except ValueError:
                raise ValueError(f"{name}={environ[name]!r} in the environment is not a process count") from None
    return None


def check_launch(num_processes: int, mixed_precision: str, environ: Mapping[str, str] | None = None) -> None:
    """A ValueError naming the fix when this process's accelerator runs ``num_processes`` processes but the
    launch asked for another count, or when ``accelerate launch --mixed_precision`` asked for another
    precision than the recipe's ``mixed_precision``. Every process raises alike (they share the launch's
    environment), so none waits for another."""
    environ = os.environ if environ is None else environ
    launched = launched_processes(environ)
    accelerate_launch = "ACCELERATE_MIXED_PRECISION" in environ       # set by every accelerate launch
    if launched is not None and launched[1] != num_processes:
        raise ValueError(f"the launcher started {launched[1]} processes ({launched[0]}={launched[1]}) but this "
                         f"process trains as one of {num_processes}: {LAUNCH_FIX}")
    if launched is None and num_processes == 1 and accelerate_launch and environ.get("MASTER_PORT"):
        raise ValueError("accelerate launch was asked for several processes but started this one alone "
                         "(--num_processes > 1 without --multi_gpu on a machine with fewer than 2 GPUs, or with "
                         "--cpu; MASTER_PORT is set, WORLD_SIZE is not): it would train on a fraction of the "
                         f"global batch. {LAUNCH_FIX}")
    asked = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if asked not in ("no", mixed_precision):
        raise ValueError(f"accelerate launch --mixed_precision {asked} but the recipe's run.mixed_precision is "
                         f"{mixed_precision}: the recipe decides; add --set run.mixed_precision={asked} "
                         f"(or launch without --mixed_precision)")


def checked(accelerator: Accelerator, mixed_precision: str) -> Accelerator:
    """``accelerator`` once ``check_launch`` has passed for it."""
    check_launch(accelerator.num_processes, mixed_precision)
    return accelerator

"""Training on several processes, on the CPU: two processes over gloo, started as on GPUs
(``accelerate launch --multi_gpu --num_processes 2``, torchrun underneath), train a small recipe of each
task in one launch, each with a model that runs depthwise convs on parameters (MALA-DeiT's LePE; MAViT's
CPE, LePE and FFN conv under UPerNet; a DiT with agent attention's DWC). No process prints DDP's "Grad
strides do not match bucket view strides", both ranks end with the same parameters, and classification
ends where one process with the same global batch ends. A launch that asks accelerate for two processes
without a distributed launcher is refused, as are the other launch mismatches.

Run as a script (``python test_multiprocess.py OUT RECIPE...``), this module is the launched worker: it
trains each recipe in turn and saves its rank's parameters as OUT/<task>_rank<r>_of_<n>.pt.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

from subquad.tasks.train.config import load_config
from subquad.tasks.train.trainer import Trainer


def run_worker(out: str, *recipes: str) -> None:
    """Train each recipe in this process (one rank of the launch); save this rank's parameters after each."""
    for recipe in recipes:
        cfg = load_config(recipe)
        trainer = Trainer(cfg, resume=False)
        try:
            trainer.fit()
        finally:
            trainer.close()
        acc = trainer.accelerator
        params = {k: v.detach().cpu() for k, v in acc.unwrap_model(trainer.model).named_parameters()}
        torch.save(params, Path(out) / f"{cfg.task}_rank{acc.process_index}_of_{acc.num_processes}.pt")


if __name__ == "__main__":
    run_worker(*sys.argv[1:])
    sys.exit(0)

import pytest  # noqa: E402  (the worker above needs none of the test machinery)
import yaml  # noqa: E402

from subquad.tasks.train.config import parse_config  # noqa: E402
from subquad.tasks.train.data.synthetic import (SEGMENTATION_CLASSES, write_classification,  # noqa: E402
                                                write_segmentation)
from subquad.tasks.train.launch_check import check_launch  # noqa: E402
from subquad.tasks.train.trainer import make_accelerator  # noqa: E402

STRIDE_WARNING = "Grad strides do not match"
TASKS = ("cls", "seg", "dit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch --num_processes N ARGS`` on a free port (other runs may share the machine), one
    thread per process; the output of every process, stdout and stderr together."""
    exe = shutil.which("accelerate")
    cmd = [exe] if exe else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    return subprocess.run(cmd + ["launch", "--num_processes", str(processes), "--main_process_port", str(_free_port()),
                                 *args], capture_output=True, text=True, timeout=400, env=env)


def _run(out: Path) -> dict:
    return {"output_dir": str(out), "log_interval": 2, "eval_interval": 1000, "checkpoint_interval": 1000,
            "ema_decay": None}


def cls_recipe(root: Path, out: Path, batch: int) -> dict:
    """MALA-DeiT (LePE on V), plain SGD with momentum (Adam's first steps divide by |g| and would amplify the
    float rounding of tiny gradients); no Mixup, random erasing, dropout or drop-path: the only randomness
    is each sample's augmentation, drawn from the sample's own seed, whichever process loads it."""
    return {"task": "cls",
            "model": {"name": "mala_deit_tiny_patch16_224",
                      "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
            "data": {"root": str(root), "img_size": 32, "batch_size": batch, "workers": 0, "crop_pct": 1.0,
                     "scale": [0.6, 1.0], "auto_augment": None, "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0},
            "optim": {"opt": "momentum", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "clip_grad": 1.0},
            "schedule": {"sched": "cosine", "steps": 4, "warmup_steps": 1},
            "run": _run(out)}


def seg_recipe(root: Path, out: Path) -> dict:
    """UPerNet on a small MAViT: CPE, LePE and the FFN's depthwise conv, BatchNorm in the stem and head."""
    return {"task": "seg",
            "model": {"backbone": "mavit_tiny",
                      "kwargs": {"img_size": 32, "embed_dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
                                 "num_heads": [1, 1, 2, 4]},
                      "out_indices": [0, 1, 2, 3], "head": "upernet", "head_channels": 16, "aux_channels": 8},
            "data": {"root": str(root), "num_classes": len(SEGMENTATION_CLASSES), "crop_size": 32, "scale": [64, 32],
                     "eval_stride": 24, "batch_size": 2, "workers": 0},
            "optim": {"lr": 1e-3, "weight_decay": 0.01},
            "schedule": {"sched": "poly", "steps": 3, "warmup_steps": 1, "min_lr": 0.0},
            "run": _run(out)}


def dit_recipe(root: Path, out: Path) -> dict:
    """A pixel-space DiT with agent attention (DWC on V) on 16x16 images."""
    return {"task": "dit",
            "model": {"name": "dit_s_2", "kwargs": {"depth": 2, "hidden_size": 32, "num_heads": 2, "attn": "agent"}},
            "data": {"root": str(root), "img_size": 16, "batch_size": 4, "workers": 0, "val_images": 8},
            "optim": {"opt": "adamw", "lr": 1e-3, "weight_decay": 0.0, "clip_grad": 1.0},
            "schedule": {"sched": "cosine", "steps": 3, "warmup_steps": 1},
            "run": _run(out)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"cls": write_classification(root / "cls", train_per_class=8, val_per_class=2),
            "seg": write_segmentation(root / "ADEChallengeData2016", train=8, val=2, size_range=(32, 40))}


@pytest.fixture(scope="module")
def launched(data, tmp_path_factory) -> tuple[str, dict[str, dict[int, dict[str, torch.Tensor]]]]:
    """One launch of two processes training the three recipes in turn: its output, and every task's
    parameters on each rank."""
    tmp = tmp_path_factory.mktemp("two_processes")
    recipes = {"cls": cls_recipe(data["cls"], tmp / "cls", batch=8), "seg": seg_recipe(data["seg"], tmp / "seg"),
               "dit": dit_recipe(data["cls"], tmp / "dit")}
    for task, recipe in recipes.items():
        (tmp / f"{task}.yaml").write_text(yaml.safe_dump(recipe))
    done = accelerate_launch("--multi_gpu", __file__, str(tmp), *(str(tmp / f"{t}.yaml") for t in TASKS))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert output.count("images on cpu") == len(TASKS) and "x 2 images on cpu" in output, output[-3000:]
    return output, {t: {r: torch.load(tmp / f"{t}_rank{r}_of_2.pt") for r in range(2)} for t in TASKS}


def test_no_process_warns_that_gradient_strides_differ_from_ddp_buckets(launched):
    output, _ = launched
    assert STRIDE_WARNING not in output, output[-6000:]


@pytest.mark.parametrize("task", TASKS)
def test_both_ranks_end_with_the_same_parameters(launched, task):
    ranks = launched[1][task]
    assert ranks[0].keys() == ranks[1].keys()
    differ = [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])]
    assert not differ, f"{task}: parameters differ across ranks: {differ[:5]}"


def test_classification_on_two_processes_equals_one_process_with_the_global_batch(launched, data, tmp_path):
    """4 steps of 8 images on each of 2 processes against 16 images a step on one: each step's 16 images
    are the same (every process takes every 2nd sample of the same permutation), DDP averages the two
    gradients; only the order of float sums differs."""
    rank0 = launched[1]["cls"][0]
    one = Trainer(parse_config(cls_recipe(data["cls"], tmp_path / "one", batch=16)), resume=False)
    initial = {k: v.detach().clone() for k, v in one.model.named_parameters()}
    try:
        one.fit()
    finally:
        one.close()
    single = dict(one.accelerator.unwrap_model(one.model).named_parameters())
    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    assert moved > 1e-3, moved                                          # the comparison below is not vacuous
    for k, v in rank0.items():
        torch.testing.assert_close(v, single[k].detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_accelerate_launch_of_two_processes_without_multi_gpu_is_refused(monkeypatch):
    """accelerate's plain launcher starts one process when --multi_gpu is missing (with fewer than 2 GPUs, or
    with --cpu): the environment it gives that process is refused where every run makes its accelerator,
    saying how to launch, instead of training alone on half the global batch."""
    done = accelerate_launch("--no_python", "env")
    assert done.returncode == 0, done.stderr[-3000:]
    environ = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert "WORLD_SIZE" not in environ and environ.get("MASTER_PORT")
    with pytest.raises(ValueError, match="asked for several processes but started this one alone"):
        check_launch(1, "no", environ)
    for name in ("WORLD_SIZE", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_PORT", environ["MASTER_PORT"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", environ["ACCELERATE_MIXED_PRECISION"])
    with pytest.raises(ValueError, match=r"accelerate launch --multi_gpu --num_processes N -m subquad.tasks.cli"):
        make_accelerator("no")


@pytest.mark.parametrize("environ, processes, precision, match", [
    ({"WORLD_SIZE": "2"}, 1, "no", r"started 2 processes \(WORLD_SIZE=2\) but this process trains as one of 1"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, 2, "no", r"started 4 processes \(OMPI_COMM_WORLD_SIZE=4\)"),
    ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_PORT": "29500"}, 1, "no", "started this one alone"),
    ({"WORLD_SIZE": "two"}, 1, "no", "WORLD_SIZE='two' in the environment is not a process count"),
    ({"WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "bf16"}, 2, "no",
     r"--mixed_precision bf16 but the recipe's run.mixed_precision is no: .*--set run.mixed_precision=bf16"),
    ({"WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "fp16"}, 2, "bf16", "--mixed_precision fp16"),
])
def test_a_launch_that_differs_from_what_it_asked_for_is_refused(environ, processes, precision, match):
    with pytest.raises(ValueError, match=match):
        check_launch(processes, precision, environ)


@pytest.mark.parametrize("environ, processes, precision", [
    ({}, 1, "no"),                                                      # subquad train
    ({"MASTER_PORT": "29500"}, 1, "bf16"),                              # a port in the shell, not accelerate's
    ({"ACCELERATE_MIXED_PRECISION": "no"}, 1, "bf16"),                  # accelerate launch --num_processes 1
    ({"WORLD_SIZE": "1", "MASTER_PORT": "29500", "ACCELERATE_MIXED_PRECISION": "no"}, 1, "no"),   # torchrun, 1
    ({"WORLD_SIZE": "8", "MASTER_PORT": "29500", "ACCELERATE_MIXED_PRECISION": "bf16"}, 8, "bf16"),
    ({"PMI_SIZE": "2"}, 2, "fp16"),
])
def test_a_launch_that_got_what_it_asked_for_passes(environ, processes, precision):
    check_launch(processes, precision, environ)

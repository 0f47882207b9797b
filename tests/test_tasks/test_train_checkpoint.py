"""Checkpoints: a run SIGKILLed mid-way resumes to the very same end; nothing is pickled; bad resumes are refused."""
import json
import math
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from subquad.tasks.cli import main
from subquad.tasks.train.checkpoint import decode_tree, encode_tree, rng_state, set_rng_state

RECIPE = {
    "task": "cls",
    "model": {"name": "softmax_deit_tiny_patch16_224",
              "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
                         "drop_path_rate": 0.1}},
    "data": {"img_size": 32, "batch_size": 16, "workers": 1, "crop_pct": 1.0, "scale": [0.6, 1.0],
             "auto_augment": "rand-m5-mstd0.5-inc1", "re_prob": 0.2, "mixup": 0.2, "cutmix": 0.2},
    "optim": {"lr": 2e-3, "clip_grad": 5.0},
    "schedule": {"epochs": 6, "warmup_epochs": 1},
    "run": {"ema_decay": 0.9, "log_interval": 3, "eval_interval": 30, "checkpoint_interval": 2,
            "grad_accum_steps": 2},
}
TOTAL = 30                                  # 180 images, 11 micro-batches of 16 -> 5 steps of 2 per epoch, 6 epochs
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}       # as in this process (the runs are compared)


def _recipe(tmp_path, data, name) -> str:
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"]["root"] = str(data)
    recipe["run"]["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _latest_step(run) -> int:
    pointer = run / "checkpoints" / "latest.json"
    return json.loads(pointer.read_text())["step"] if pointer.is_file() else 0


def test_a_killed_run_resumes_to_the_same_end_as_an_uninterrupted_one(cls_shapes, subquad_command, tmp_path):
    killed = subprocess.Popen(subquad_command("train", "--config", _recipe(tmp_path, cls_shapes, "killed")),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    deadline = time.monotonic() + 300
    while _latest_step(tmp_path / "killed") < 4 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL                    # killed mid-way, not finished
    stopped_at = _latest_step(tmp_path / "killed")
    assert 4 <= stopped_at < TOTAL

    resumed = subprocess.run(subquad_command("train", "--config", _recipe(tmp_path, cls_shapes, "killed"), "--resume"),
                             capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped_at}" in resumed.stdout and f"final (step {TOTAL}/{TOTAL})" in resumed.stdout
    # in this process: saves a start-up
    assert main(["train", "--config", _recipe(tmp_path, cls_shapes, "whole")]) == 0

    assert _latest_step(tmp_path / "killed") == _latest_step(tmp_path / "whole") == TOTAL
    final = f"checkpoints/step_{TOTAL:08d}/tensors.safetensors"
    a, b = load_file(str(tmp_path / "killed" / final)), load_file(str(tmp_path / "whole" / final))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a) and any(k.startswith("optimizer.") for k in a)
    for key in a:                                              # model, EMA and optimizer: as if never stopped
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    logs = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert [r["step"] for r in logs["train"]] == list(range(3, TOTAL + 1, 3))
    # the log reads as one run: the first row after the resume averages the steps before the kill too
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert [r["loss"] for r in logs["train"]] == pytest.approx([r["loss"] for r in whole["train"]], rel=1e-5)
    curves = tmp_path / "killed" / "curves.png"
    assert resumed.stdout.strip().splitlines()[-1].startswith(f"curves: {curves}")
    assert curves.read_bytes().startswith(b"\x89PNG")
    assert [r["step"] for r in logs["eval"]] == [TOTAL]
    assert all(math.isfinite(v) for v in logs["eval"][0].values())
    assert sorted(p.suffix for p in (tmp_path / "killed" / "checkpoints").rglob("*") if p.is_file()) == \
        [".json", ".json", ".json", ".safetensors", ".safetensors", ".safetensors", ".safetensors"]


def test_a_second_run_into_a_folder_with_a_checkpoint_or_a_resume_with_another_model_is_refused(
        cls_shapes, tmp_path, capsys):
    recipe = _recipe(tmp_path, cls_shapes, "run")
    assert main(["train", "--config", recipe, "--set", "schedule.epochs=1"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", recipe]) == 2
    assert "already holds a run (checkpoint at step 5): pass --resume" in capsys.readouterr().err
    assert main(["train", "--config", recipe, "--resume", "--set", "model.kwargs.depth=3"]) == 2
    err = capsys.readouterr().err
    assert "was saved for another model (kwargs: {" in err and "'depth': 2" in err and "'depth': 3" in err


def test_state_trees_keep_int_keys_and_tuples_and_move_tensors_out():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors = {}
    tree = json.loads(json.dumps(encode_tree(optimizer.state_dict(), "optimizer", tensors)))
    assert set(tensors) == {f"optimizer.state.{i}.{k}" for i in (0, 1) for k in ("step", "exp_avg", "exp_avg_sq")}
    restored = decode_tree(tree, tensors)
    assert list(restored["state"]) == [0, 1] and restored["param_groups"][0]["betas"] == (0.8, 0.9)
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(restored)
    assert torch.equal(fresh.state_dict()["state"][1]["exp_avg"], optimizer.state_dict()["state"][1]["exp_avg"])


def test_random_states_round_trip_as_tensors():
    random.gauss(0, 1)                                          # a cached Gaussian in Python's state
    state = rng_state()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    before = random.random(), np.random.rand(), torch.rand(1).item()
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before

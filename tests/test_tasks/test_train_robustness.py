"""Bad input to fine-tuning, training runs, checkpoints and the CLI: each is one clear error naming the file or
the option (no partial load, no raw traceback), and the previous checkpoint stays usable."""
import builtins
import errno
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from subquad.tasks.cli import main
from subquad.tasks.train import checkpoint
from subquad.tasks.train.config import parse_config
from subquad.tasks.train.data.synthetic import write_classification
from subquad.tasks.train.pretrained import create_model, read_weights
from subquad.tasks.train.run_lock import LOCK, acquire_run_lock, release_run_lock
from subquad.tasks.train.trainer import evaluate, train

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """12 training and 6 validation images, 16x16."""
    return write_classification(tmp_path_factory.mktemp("data") / "shapes", train_per_class=2, val_per_class=1,
                                size=16)


def _recipe(root: Path, out: Path, **run) -> dict:
    """Two steps of a tiny classifier, a checkpoint after each."""
    return {
        "task": "cls",
        "model": {"name": "softmax_deit_tiny_patch16_224", "kwargs": {**TINY, "img_size": 16}},
        "data": {"root": str(root), "img_size": 16, "batch_size": 8, "workers": 0, "crop_pct": 1.0,
                 "auto_augment": None, "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0},
        "schedule": {"steps": 2},
        "run": {"output_dir": str(out), "log_interval": 1, "eval_interval": 2, "checkpoint_interval": 1, **run},
    }


def _train(root: Path, out: Path, resume: bool = False, **run) -> dict:
    return train(parse_config(_recipe(root, out, **run)), resume=resume)


def _yaml(tmp_path: Path, recipe: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Exit code and error line of ``subquad args``: one line on stderr, no traceback (progress bars aside)."""
    code = main(list(args))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("subquad ") and "Traceback" not in err, err
    return code, errors[0]


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory) -> Path:
    """A finished two-step run (checkpoints at steps 1 and 2)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    _train(shapes, out)
    return out


def _copy_run(run: Path, tmp_path: Path) -> Path:
    subprocess.run(["cp", "-r", str(run), str(tmp_path / "run")], check=True)
    return tmp_path / "run"


# --- fine-tuning from a checkpoint (timm's pretrained_cfg_overlay) ------------------------------------------------

@pytest.mark.parametrize("source, target, kwargs, tune, key", [
    ("softmax_deit_tiny_patch16_224", "agent_deit_tiny_patch16_224", TINY, {"num_classes": 10},
     "blocks.0.attn.an_bias"),
    ("flatten_pvt_tiny", "agent_pvt_tiny", dict(depths=(1, 1, 1, 1), img_size=64), {"num_classes": 10},
     "stages.0.blocks.0.attn.an_bias"),
    ("dit_s_2", "dit_s_2", dict(depth=1, hidden_size=32, num_heads=2, input_size=8), {"depth": 2}, "blocks.1."),
])
def test_finetuning_pattern_refuses_a_checkpoint_of_another_model(tmp_path, source, target, kwargs, tune, key):
    path = tmp_path / "source.pth"
    torch.save(timm.create_model(source, **kwargs).state_dict(), path)
    same = timm.create_model(source, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **{**kwargs, "num_classes": tune.get("num_classes", 1000)})
    assert same.num_classes == tune.get("num_classes", 1000)          # the same model loads (classifier reset)
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))}.* does not fit model {target}: "
                                         rf"missing keys \(\d+\): \['{re.escape(key)}"):
        timm.create_model(target, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **{**kwargs, **tune})


def test_finetuning_pattern_refuses_other_shapes_and_names_a_missing_file(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(timm.create_model("softmax_deit_tiny_patch16_224", **TINY).state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatches \(checkpoint vs model\) \(\d+\): \['cls_token: "
                                         r"\(1, 1, 32\) vs \(1, 1, 64\)'"):
        timm.create_model("softmax_deit_tiny_patch16_224", pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=str(path)), **{**TINY, "embed_dim": 64})
    absent = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(absent))):
        timm.create_model("agent_deit_tiny_patch16_224", pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=str(absent)), **TINY)
    with pytest.raises(FileNotFoundError, match=re.escape(str(absent))):
        create_model("softmax_deit_tiny_patch16_224", TINY, num_classes=6, checkpoint=str(absent))


def test_an_unreadable_weights_file_is_named(tmp_path):
    truncated = tmp_path / "w.safetensors"
    checkpoint.save_file(timm.create_model("softmax_deit_tiny_patch16_224", **TINY).state_dict(), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{re.escape(str(truncated))} cannot be read, it is truncated"):
        read_weights(truncated)
    pickled = tmp_path / "w.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "config": Config()}, pickled)
    with pytest.raises(ValueError, match=rf"{re.escape(str(pickled))} is not plain weights .*Unsupported global"):
        read_weights(pickled)


class Config:
    """A pickled object: what ``torch.load(weights_only=True)`` refuses to rebuild."""


# --- one run per output folder ------------------------------------------------------------------------------------

def test_a_second_run_into_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = _yaml(tmp_path, _recipe(shapes, out))
    holder = acquire_run_lock(out)                        # a run of this process is writing there
    assert json.loads(holder.read_text())["pid"] == os.getpid()
    code, err = _cli(capsys, "train", "--config", recipe)
    assert code == 2 and f"run.output_dir {out} is in use by process {os.getpid()} on {socket.gethostname()}" in err
    assert not (out / "checkpoints").exists()              # refused before writing anything
    release_run_lock(holder)
    assert not holder.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                            # a run that was killed: its lock names a gone process
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert main(["train", "--config", recipe]) == 0
    assert f"taking over the lock of process {dead.pid}" in capsys.readouterr().out
    assert not (out / LOCK).exists()                        # released at the end


def test_a_lock_of_a_live_process_on_another_host_is_honoured(shapes, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(out))} is in use by process 1 on elsewhere"):
        _train(shapes, out)


# --- corrupted, truncated and unreadable checkpoint files --------------------------------------------------------

def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF                                       # inside the last tensor, past the header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", [checkpoint.TENSORS, "rng_rank0.safetensors"])
def test_corrupted_tensor_bytes_are_detected_by_their_checksum(run, tmp_path, name):
    run = _copy_run(run, tmp_path)
    last = run / "checkpoints" / "step_00000002"
    _flip_a_byte(last / name)
    checkpoint.load_file(str(last / name))                 # still a valid safetensors file: only the checksum knows
    read = checkpoint.read_tensors if name == checkpoint.TENSORS else lambda folder: checkpoint.read_rng(folder, 0)
    with pytest.raises(ValueError, match=rf"checkpoint file {re.escape(str(last / name))} is corrupted"):
        read(last)


def test_a_corrupted_checkpoint_stops_a_resume_naming_the_file(shapes, run, tmp_path, capsys):
    run = _copy_run(run, tmp_path)
    tensors = run / "checkpoints" / "step_00000002" / checkpoint.TENSORS
    _flip_a_byte(tensors)
    recipe = _yaml(tmp_path, _recipe(shapes, run) | {"schedule": {"steps": 3}})
    code, err = _cli(capsys, "train", "--config", recipe, "--resume")
    assert code == 2 and f"checkpoint file {tensors} is corrupted" in err


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "cannot be read, it is truncated or not a safetensors file"),
    (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), "cannot be read, it is truncated"),
])
def test_a_truncated_or_empty_tensor_file_is_named(shapes, run, tmp_path, damage, message):
    run = _copy_run(run, tmp_path)
    tensors = run / "checkpoints" / "step_00000002" / checkpoint.TENSORS
    damage(tensors)
    with pytest.raises(ValueError, match=rf"checkpoint file {re.escape(str(tensors))} {message}"):
        evaluate(parse_config(_recipe(shapes, run)))


@pytest.mark.parametrize("file, text, message", [
    ("step_00000002/state.json", "{\"step\": 2, ", "checkpoint state {} is not valid JSON"),
    ("step_00000002/state.json", "[]", "checkpoint state {} is not a subquad state.json"),
    ("latest.json", "", "checkpoint pointer {} is not valid JSON"),
    ("latest.json", "{\"step\": 9, \"folder\": \"step_00000009\"}", "checkpoint pointer {} names"),
])
def test_an_invalid_state_or_pointer_file_is_named(shapes, run, tmp_path, capsys, file, text, message):
    run = _copy_run(run, tmp_path)
    path = run / "checkpoints" / file
    path.write_text(text)
    code, err = _cli(capsys, "eval", "--config", _yaml(tmp_path, _recipe(shapes, run)))
    assert code == 2 and message.format(path) in err


# --- data ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_image_is_named(tmp_path, capsys, workers):
    root = write_classification(tmp_path / "shapes", train_per_class=2, val_per_class=1, size=16)
    image = sorted((root / "train").rglob("*.png"))[3]
    image.write_bytes(image.read_bytes()[:60])
    recipe = _recipe(root, tmp_path / "run")
    recipe["data"]["workers"] = workers
    recipe["data"]["batch_size"] = 12                       # the first batch holds every image
    code, err = _cli(capsys, "train", "--config", _yaml(tmp_path, recipe))
    assert code == 2 and f"image {image} cannot be read, it is truncated or not an image" in err


# --- failed writes: the previous checkpoint stays the latest --------------------------------------------------------

def test_a_full_disk_at_a_checkpoint_is_named_and_the_previous_one_stays_usable(shapes, tmp_path, monkeypatch):
    out, save = tmp_path / "run", checkpoint.save_file

    def fill_up(tensors, path):
        if "step_00000002" in path and path.endswith(checkpoint.TENSORS):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(tensors, path)
    monkeypatch.setattr(checkpoint, "save_file", fill_up)
    failed = out / "checkpoints" / "step_00000002.tmp" / checkpoint.TENSORS
    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(failed))}: No space left on device") as e:
        _train(shapes, out)
    assert e.value.errno == errno.ENOSPC
    assert checkpoint.find_latest(out).name == "step_00000001" and not failed.parent.exists()
    monkeypatch.setattr(checkpoint, "save_file", save)      # space freed: the run resumes from step 1
    assert _train(shapes, out, resume=True)["steps"] == 2


def test_a_read_only_output_folder_is_named(shapes, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    real_open, real_io_open = builtins.open, io.open

    def read_only(opener):
        def open_(file, mode="r", *args, **kwargs):
            if any(m in mode for m in "wax+") and str(file).startswith(str(out)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return opener(file, mode, *args, **kwargs)
        return open_
    monkeypatch.setattr(builtins, "open", read_only(real_open))   # a read-only mount (root writes through chmod)
    monkeypatch.setattr(io, "open", read_only(real_io_open))
    code, err = _cli(capsys, "train", "--config", _yaml(tmp_path, _recipe(shapes, out)))
    assert code == 1 and re.search(rf"cannot write {re.escape(str(out))}/\S+: Read-only file system", err), err


# --- option values -------------------------------------------------------------------------------------------------

def test_a_recipe_value_out_of_range_names_the_option(shapes, tmp_path, capsys):
    recipe = _yaml(tmp_path, _recipe(shapes, tmp_path / "run"))
    for option, message in (("data.batch_size=0", "data.batch_size must be positive, got 0"),
                            ("data.workers=-1", "data.workers must be >= 0, got -1"),
                            ("schedule.steps=0", "schedule.steps must be positive, got 0")):
        code, err = _cli(capsys, "train", "--config", recipe, "--set", option)
        assert code == 2 and message in err, option


@pytest.mark.parametrize("option", ["--steps", "--num", "--batch-size"])
def test_sample_options_out_of_range_name_the_option(tmp_path, capsys, option):
    code, err = _cli(capsys, "sample", "--checkpoint", str(tmp_path), option, "0")
    assert code == 2 and f"{option} must be positive, got 0" in err


def test_sample_refuses_pickled_inception_weights_in_one_line(tmp_path, capsys):
    weights = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "config": Config()}, weights)
    code, err = _cli(capsys, "sample", "--checkpoint", str(tmp_path), "--fid-ref", str(tmp_path),
                     "--inception-weights", str(weights))
    assert code == 2 and f"--inception-weights {weights} is not plain weights" in err and "Unsupported global" in err
    code, err = _cli(capsys, "sample", "--checkpoint", str(tmp_path), "--fid-ref", str(tmp_path),
                     "--inception-weights", str(tmp_path / "absent.pth"))
    assert code == 1 and f"--inception-weights {tmp_path / 'absent.pth'} does not exist" in err

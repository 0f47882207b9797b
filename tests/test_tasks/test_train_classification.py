"""Classification training on the synthetic shapes, fine-tuning from checkpoints, recipe errors."""
import math
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from subquad.tasks.cli import main
from subquad.tasks.train.config import load_config, packaged_recipes
from subquad.tasks.train.data.synthetic import SHAPES
from subquad.tasks.train.pretrained import create_model
from subquad.tasks.train.trainer import train

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)


def tiny_recipe(root, out, **run) -> dict:
    return {
        "task": "cls",
        "model": {"name": "softmax_deit_tiny_patch16_224", "kwargs": TINY},
        "data": {"root": str(root), "img_size": 32, "batch_size": 16, "workers": 0, "crop_pct": 1.0,
                 "scale": [0.6, 1.0], "auto_augment": "rand-m5-mstd0.5-inc1", "re_prob": 0.1, "mixup": 0.2,
                 "cutmix": 0.2},
        "optim": {"lr": 3e-3, "weight_decay": 0.05, "clip_grad": 5.0},
        "schedule": {"epochs": 4, "warmup_epochs": 1},
        "run": {"output_dir": str(out), "ema_decay": 0.9, "log_interval": 10, "eval_interval": 22,
                "checkpoint_interval": 22, **run},
    }


def test_trains_to_well_above_chance_and_eval_reproduces_it(cls_shapes, tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(cls_shapes, tmp_path / "run")))
    metrics = train(load_config(str(tmp_path / "recipe.yaml")))
    chance = 100 / len(SHAPES)
    assert metrics["steps"] == 44                      # 180 images / 16 per batch = 11 steps per epoch, 4 epochs
    assert metrics["top1"] > chance + 30 and metrics["ema_top1"] > chance + 25, metrics
    assert math.isfinite(metrics["images_per_s"]) and metrics["peak_memory_gib"] > 0
    out = capsys.readouterr().out
    assert "final (step 44/44): top1" in out and "images/s" in out and "peak memory" in out
    logged = yaml.safe_load((tmp_path / "run" / "metrics.json").read_text())
    assert [r["step"] for r in logged["train"]] == [10, 20, 30, 40, 44]
    assert [r["step"] for r in logged["eval"]] == [22, 44]
    assert (tmp_path / "run" / "train_metrics.csv").read_text().startswith("step,epoch,loss,lr,images_per_s")
    assert main(["eval", "--config", str(tmp_path / "recipe.yaml")]) == 0     # the saved model and EMA score the same
    assert f"(step 44): top1 {metrics['top1']:.2f}" in capsys.readouterr().out
    tuned = create_model("softmax_deit_tiny_patch16_224", TINY, num_classes=3, checkpoint=str(tmp_path / "run"))
    ema = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000044" / "tensors.safetensors"))
    assert tuned.head.weight.shape == (3, 64) and torch.equal(tuned.blocks[0].attn.qkv.weight,
                                                              ema["ema.blocks.0.attn.qkv.weight"])


def test_finetuning_keeps_the_backbone_and_resets_a_head_of_another_class_count(tmp_path):
    source = timm.create_model("softmax_deit_tiny_patch16_224", num_classes=10, **TINY)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"model": source.state_dict()}, tmp_path / "w.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        model = create_model("softmax_deit_tiny_patch16_224", TINY, num_classes=6, checkpoint=str(path))
        assert model.head.weight.shape == (6, 64)
        assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
        assert torch.equal(model.pos_embed, source.pos_embed)
    same = create_model("softmax_deit_tiny_patch16_224", TINY, num_classes=10, checkpoint=str(tmp_path / "w.pth"))
    assert torch.equal(same.head.weight, source.head.weight)


def test_linear_probe_from_a_run_trains_only_the_head_and_layer_decay_scales_the_blocks(cls_shapes, tmp_path, capsys):
    """Fine-tuning from a subquad run with optim.freeze / optim.trainable (a linear probe): after training, every
    frozen tensor is the source run's; layer-wise lr decay gives the first block a smaller lr than the head."""
    source = tiny_recipe(cls_shapes, tmp_path / "source", ema_decay=None)
    source["schedule"] = {"steps": 2}
    train(load_config_dict(source, tmp_path))
    probe = tiny_recipe(cls_shapes, tmp_path / "probe", ema_decay=None)
    probe["model"]["checkpoint"] = str(tmp_path / "source")
    probe["schedule"] = {"steps": 3}
    probe["optim"].update(freeze=["*"], trainable=["head.*"], layer_decay=0.5)
    train(load_config_dict(probe, tmp_path))
    assert "frozen: " in capsys.readouterr().out
    before = load_file(str(tmp_path / "source" / "checkpoints" / "step_00000002" / "tensors.safetensors"))
    after = load_file(str(tmp_path / "probe" / "checkpoints" / "step_00000003" / "tensors.safetensors"))
    changed = sorted(k for k in before if k.startswith("model.") and not torch.equal(before[k], after[k]))
    assert changed == ["model.head.bias", "model.head.weight"], changed

    from subquad.tasks.train.trainer import Trainer
    probe["optim"].update(freeze=[], trainable=[])
    probe["run"]["output_dir"] = str(tmp_path / "decay")
    trainer = Trainer(load_config_dict(probe, tmp_path), resume=False)
    try:
        scales = {g["lr_scale"] for g in trainer.optimizer.param_groups}
        assert min(scales) < 0.5 * max(scales) and max(scales) == 1.0
    finally:
        trainer.close()


def test_a_freeze_pattern_that_matches_nothing_is_refused(cls_shapes, tmp_path):
    recipe = tiny_recipe(cls_shapes, tmp_path / "run")
    recipe["optim"]["freeze"] = ["block.*"]                    # timm names them blocks.*
    with pytest.raises(ValueError, match=r"optim.freeze pattern\(s\) \['block.\*'\] match no parameter"):
        train(load_config_dict(recipe, tmp_path))


def load_config_dict(recipe: dict, folder):
    path = folder / f"{Path(recipe['run']['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_config(str(path))


def test_a_checkpoint_of_another_model_is_refused_before_training(tmp_path):
    other = timm.create_model("softmax_deit_tiny_patch16_224", num_classes=10, **{**TINY, "embed_dim": 96})
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit model softmax_deit_tiny_patch16_224: .*shape mismatches"):
        create_model("softmax_deit_tiny_patch16_224", TINY, num_classes=6, checkpoint=str(tmp_path / "other.safetensors"))
    deeper = timm.create_model("softmax_deit_tiny_patch16_224", num_classes=6, **{**TINY, "depth": 3})
    save_file(deeper.state_dict(), str(tmp_path / "deeper.safetensors"))
    with pytest.raises(ValueError, match=r"deeper.safetensors does not fit .*unexpected keys \(\d+\): \['blocks.2"):
        create_model("softmax_deit_tiny_patch16_224", TINY, num_classes=6, checkpoint=str(tmp_path / "deeper.safetensors"))


def _cli_error(capsys, *args) -> str:
    assert main(list(args)) == 2
    return capsys.readouterr().err


def test_recipe_errors_name_the_key_and_list_the_valid_ones(cls_shapes, tmp_path, capsys):
    recipe = tiny_recipe(cls_shapes, tmp_path / "run")
    recipe["data"]["batchsize"] = 8
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    err = _cli_error(capsys, "train", "--config", str(tmp_path / "bad.yaml"))
    assert "data: unknown key(s) 'batchsize'; valid keys: root, format, synthetic" in err and "batch_size" in err
    err = _cli_error(capsys, "train", "--config", "cls/synthetic", "--set", "optim.learning_rate=0.1")
    assert "unknown key(s) 'learning_rate'; valid keys: opt, lr" in err
    err = _cli_error(capsys, "train", "--config", "cls/synthetic", "--set", "optim.lr=fast")
    assert "optim.lr: expected float, got 'fast'" in err
    err = _cli_error(capsys, "train", "--config", "cls/nonesuch")
    assert "neither a file nor a packaged recipe; packaged recipes:" in err and "cls/synthetic" in err


def test_missing_data_and_unknown_model_are_clear_errors_before_training(tmp_path, capsys, monkeypatch):
    err = _cli_error(capsys, "train", "--config", "cls/synthetic", "--set", f"data.root={tmp_path / 'absent'}",
                     "--set", "data.synthetic=false", "--set", f"run.output_dir={tmp_path / 'run'}")
    assert f"data folder {tmp_path / 'absent'} not found" in err and "--set data.root=" in err
    assert "synthetic" not in err
    err = _cli_error(capsys, "train", "--config", "cls/synthetic", "--set", "model.name=nonesuch_tiny",
                     "--set", f"run.output_dir={tmp_path / 'run'}")
    assert "unknown model 'nonesuch_tiny'" in err
    monkeypatch.setitem(sys.modules, "datasets", None)        # as on a machine without it (not a dependency)
    err = _cli_error(capsys, "train", "--config", "cls/synthetic", "--set", "data.format=hf",
                     "--set", f"data.root={tmp_path}", "--set", f"run.output_dir={tmp_path / 'run'}")
    assert "needs the `datasets` package" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name", [n for n in packaged_recipes() if n.split("/")[0] in ("cls", "seg")])
def test_packaged_recipes_are_valid(name):
    cfg = load_config(name)
    assert cfg.task == name.split("/")[0]
    assert timm.is_model(cfg.model.name if cfg.task == "cls" else cfg.model.backbone)


def test_mixed_precision_no_is_the_string_yaml_reads_as_false():
    assert load_config("cls/mala_deit_tiny_imagenet", ["run.mixed_precision=no"]).run.mixed_precision == "no"

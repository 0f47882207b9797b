"""DiT training (``task: dit``) on a small synthetic set on the CPU: the loss falls, resume is exact,
the objectives and the recipe checks behave."""
from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import AutoencoderKL
from torchvision import transforms
from torchvision.datasets import ImageFolder

from subquad.tasks.train.config import load_config, packaged_recipes, parse_config
from subquad.tasks.train.data.synthetic import write_classification
from subquad.tasks.train.objectives import DDPMObjective
from subquad.tasks.train.sample import Sampler
from subquad.tasks.train.trainer import train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The synthetic shapes, 16x16: 6 classes, 16 training and 4 validation images each."""
    return write_classification(tmp_path_factory.mktemp("data") / "shapes", train_per_class=16, val_per_class=4,
                                size=16)


def recipe(root, out, **model) -> dict:
    return {
        "task": "dit",
        "model": {"name": "dit_s_2", "kwargs": {"depth": 2, "hidden_size": 64, "num_heads": 2}, **model},
        "data": {"root": str(root), "img_size": 16, "batch_size": 16, "workers": 0, "val_images": 16},
        "optim": {"opt": "adamw", "lr": 2e-3, "weight_decay": 0.0, "clip_grad": 1.0},
        "schedule": {"sched": "cosine", "steps": 30, "min_lr": 2e-4},
        "run": {"output_dir": str(out), "ema_decay": 0.9, "log_interval": 5, "eval_interval": 30,
                "checkpoint_interval": 30},
    }


def losses(out) -> list[float]:
    return [row["loss"] for row in json.loads((out / "metrics.json").read_text())["train"]]


def test_pixel_ddpm_with_learned_sigma_loss_falls(shapes, tmp_path):
    summary = train(parse_config(recipe(shapes, tmp_path / "run")))
    curve = losses(tmp_path / "run")
    assert len(curve) == 6 and curve[-1] < 0.5 * curve[0], curve
    assert math.isfinite(summary["loss"]) and math.isfinite(summary["ema_loss"])


def test_flow_matching_loss_falls(shapes, tmp_path):
    raw = recipe(shapes, tmp_path / "run", objective="flow", flow_timesteps="logit_normal")
    raw["model"]["kwargs"]["learn_sigma"] = False
    train(parse_config(raw))
    curve = losses(tmp_path / "run")
    assert curve[-1] < 0.7 * curve[0], curve


def test_resume_continues_from_the_checkpoint(shapes, tmp_path):
    """4 steps, then a resumed run to 8, against 8 steps at once (constant LR, so the schedule does not
    depend on the length). The first 4 steps match exactly; after the resume the noise draws differ
    (a DataLoader iterator takes a seed from the global generator), so the losses only agree closely."""
    def run(out, steps, resume=False):
        raw = recipe(shapes, out)
        raw["schedule"].update(steps=steps, min_lr=raw["optim"]["lr"])
        raw["run"].update(checkpoint_interval=4, eval_interval=100, log_interval=4)
        return train(parse_config(raw), resume=resume)
    run(tmp_path / "whole", 8)
    run(tmp_path / "split", 4)
    with pytest.raises(ValueError, match="--resume"):
        run(tmp_path / "split", 8)
    summary = run(tmp_path / "split", 8, resume=True)
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert summary["steps"] == 8 and len(split) == 2
    assert split[0] == pytest.approx(whole[0], rel=1e-6)
    assert split[1] == pytest.approx(whole[1], rel=0.1) and split[1] < split[0]


def test_latent_space_with_a_local_vae(shapes, tmp_path):
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    vae.save_pretrained(tmp_path / "vae")
    raw = recipe(shapes, tmp_path / "run", vae=str(tmp_path / "vae"), name="dit_s_1")
    raw["schedule"]["steps"] = 2
    raw["run"].update(log_interval=1, eval_interval=2, checkpoint_interval=2)
    summary = train(parse_config(raw))
    assert math.isfinite(summary["loss"])
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["config"]["model"]["vae"] == str(tmp_path / "vae")
    sampler = Sampler.from_run(str(tmp_path / "run"))
    assert sampler.model.config.in_channels == 4 and sampler.model.config.input_size == 8
    images = sampler.sample([0, 3], scheduler="dpm++", steps=2, progress=False)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def tiny_classifier(images: torch.Tensor, classes: torch.Tensor, steps: int = 100) -> torch.nn.Module:
    """A two-layer conv net fitted to ``images`` (N, 3, H, W) in [0, 1]: it tells the shapes' classes apart."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, int(classes.max()) + 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(images), classes).backward()
        optimizer.step()
    return net.eval()


def test_a_briefly_trained_dit_samples_images_like_the_data_not_noise(tmp_path):
    """A small DiT trained for a few hundred steps on the synthetic shapes samples images whose nearest training
    image is about as close as a held-out image's and much closer than a Gaussian noise image's, and that a tiny
    classifier fitted to the training images mostly puts in the class asked for (chance is 1/6)."""
    root = write_classification(tmp_path / "shapes", train_per_class=30, val_per_class=6, size=16, style="simple")
    raw = recipe(root, tmp_path / "run", objective="flow")
    raw["model"]["kwargs"].update(learn_sigma=False, class_dropout_prob=0.1)
    raw["data"].update(batch_size=32, val_images=8)
    raw["optim"]["lr"] = 2e-3
    raw["schedule"] = {"sched": "cosine", "steps": 600, "warmup_steps": 20, "min_lr": 1e-5}
    raw["run"].update(ema_decay=0.99, log_interval=100, eval_interval=600, checkpoint_interval=600)
    train(parse_config(raw))
    labels = torch.arange(36) % 6
    samples = Sampler.from_run(str(tmp_path / "run")).sample(labels.tolist(), steps=20, cfg_scale=2.0, progress=False)

    def images(split):
        data = ImageFolder(str(root / split), transform=transforms.ToTensor())
        return torch.stack([image for image, _ in data]), torch.tensor(data.targets)
    (train_images, classes), (held_out, held_out_classes) = images("train"), images("val")
    noise = ((torch.randn(samples.shape) + 1) / 2).clamp(0, 1)                  # N(0, 1) in [-1, 1]

    def nearest(x):
        return torch.cdist(x.flatten(1), train_images.flatten(1)).min(1)[0].mean().item() / x[0].numel() ** 0.5
    classifier = tiny_classifier(train_images, classes)
    with torch.no_grad():
        accuracy = lambda x, y: (classifier(x).argmax(1) == y).float().mean().item()  # noqa: E731
        report = dict(samples=nearest(samples), held_out=nearest(held_out), noise=nearest(noise),
                      held_out_accuracy=accuracy(held_out, held_out_classes), accuracy=accuracy(samples, labels))
    assert report["samples"] < 0.6 * report["noise"] and report["samples"] < 1.3 * report["held_out"], report
    assert report["held_out_accuracy"] >= 0.8 and report["accuracy"] >= 0.6, report


def test_vlb_is_zero_when_the_model_matches_the_posterior():
    """With the true noise and the posterior variance (v = -1), KL(q || p) vanishes for t > 0."""
    objective = DDPMObjective(1000, "linear", learn_sigma=True)
    x0, noise = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    t = torch.tensor([1, 5, 20])           # small t: the posterior variance is far from beta_t
    xt = objective.scheduler.add_noise(x0, noise, t)
    vb = objective._vlb(noise, -torch.ones_like(x0), x0, xt, t)
    assert vb.abs().max() < 1e-4
    assert (objective._vlb(noise, torch.ones_like(x0), x0, xt, t) > 1e-4).all()


def test_recipe_checks():
    base = recipe("data", "out")
    flow = recipe("data", "out", objective="flow")
    with pytest.raises(ValueError, match="learn_sigma: false"):
        parse_config(flow)
    bad = recipe("data", "out")
    bad["model"]["kwargs"]["input_size"] = 32
    with pytest.raises(ValueError, match="input_size"):
        parse_config(bad)
    with pytest.raises(ValueError, match="objective"):
        parse_config(recipe("data", "out", objective="edm"))
    assert parse_config(base).task == "dit"
    for name in ("dit/synthetic", "dit/imagenet256_xl2", "dit/pixel256_loglinear"):
        assert name in packaged_recipes() and load_config(name).task == "dit"
    with pytest.raises(ValueError, match="data.synthetic_style must be textured or simple"):
        load_config("dit/synthetic", ["data.synthetic_style=stripes"])

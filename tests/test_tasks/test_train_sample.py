"""``subquad sample``: a briefly trained DiT samples with diffusers schedulers, seeds, CFG; PNG grid; FID."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.models import inception_v3

from subquad.tasks.cli import main
from subquad.tasks.train.config import DiTModelConfig, parse_config
from subquad.tasks.train.data.synthetic import write_classification
from subquad.tasks.train.objectives import DDPMObjective
from subquad.tasks.train.sample import Sampler, frechet_distance
from subquad.tasks.train.trainer import train


def _train(root, out, objective: str) -> str:
    torch.set_num_threads(1)
    train(parse_config({
        "task": "dit",
        "model": {"name": "dit_s_2", "kwargs": {"depth": 2, "hidden_size": 64, "num_heads": 2,
                                                "learn_sigma": objective == "ddpm"}, "objective": objective},
        "data": {"root": str(root), "img_size": 16, "batch_size": 16, "workers": 0, "val_images": 16},
        "optim": {"opt": "adamw", "lr": 2e-3, "weight_decay": 0.0},
        "schedule": {"sched": "cosine", "steps": 6},
        "run": {"output_dir": str(out), "ema_decay": 0.9, "log_interval": 6, "eval_interval": 6,
                "checkpoint_interval": 6},
    }))
    return str(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = write_classification(tmp_path_factory.mktemp("data") / "shapes", train_per_class=8, val_per_class=2,
                                size=16)
    out = tmp_path_factory.mktemp("runs")
    return {"root": root, "ddpm": _train(root, out / "ddpm", "ddpm"), "flow": _train(root, out / "flow", "flow")}


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler", "euler_a", "ddpm", "unipc", "heun",
                                       "PNDMScheduler"])
def test_ddpm_model_with_any_scheduler(runs, scheduler):
    images = Sampler.from_run(runs["ddpm"]).sample([0, 5], scheduler=scheduler, steps=4, progress=False)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("scheduler", ["euler", "dpm++", "unipc"])
def test_flow_model_with_flow_schedulers(runs, scheduler):
    images = Sampler.from_run(runs["flow"]).sample([1], scheduler=scheduler, steps=4, progress=False)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_the_default_scheduler_fits_the_objective(runs, tmp_path, capsys):
    assert Sampler.from_run(runs["ddpm"]).default_scheduler == "ddim"
    assert Sampler.from_run(runs["flow"]).default_scheduler == "euler"
    assert main(["sample", "--checkpoint", runs["flow"], "--num", "1", "--steps", "2", "--out",
                 str(tmp_path / "grid.png"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["scheduler"] == "euler"


def test_flow_model_refuses_a_ddpm_scheduler(runs):
    with pytest.raises(ValueError, match="flow-matching model"):
        Sampler.from_run(runs["flow"]).sample([1], scheduler="ddim", steps=2, progress=False)


def test_seeds_batches_and_guidance(runs):
    sampler = Sampler.from_run(runs["ddpm"])
    together = sampler.sample([0, 1, 2], steps=3, seed=7, batch_size=3, progress=False)
    one_by_one = sampler.sample([0, 1, 2], steps=3, seed=7, batch_size=1, progress=False)
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)
    assert not torch.allclose(together, sampler.sample([0, 1, 2], steps=3, seed=8, progress=False))
    guided = sampler.sample([0, 1, 2], steps=3, seed=7, cfg_scale=4.0, progress=False)
    assert not torch.allclose(guided, together)
    with pytest.raises(ValueError, match="class labels"):
        sampler.sample([6], steps=2, progress=False)


def test_cli_writes_a_grid_and_skips_fid_without_weights(runs, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", runs["ddpm"], "--num", "4", "--steps", "3", "--scheduler", "dpm++",
                 "--cfg-scale", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == (4 * 16 + 5 * 2, 16 + 2 * 2)         # torchvision's grid: 2-pixel padding
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["fid"].startswith("skipped")


def test_cli_writes_into_the_run_folder_and_counts_denoising_steps(runs, capsys):
    """Without --out the grid goes into the run folder (also when --checkpoint names one of its checkpoint
    folders), not the current folder; the progress bar counts denoising steps over all batches."""
    run = Path(runs["ddpm"])
    checkpoint = next((run / "checkpoints").glob("step_*"))
    for where in (run, checkpoint):
        (run / "samples.png").unlink(missing_ok=True)
        assert main(["sample", "--checkpoint", str(where), "--num", "3", "--batch-size", "2", "--steps", "4",
                     "--device", "cpu"]) == 0
        assert Image.open(run / "samples.png").size[1] == 16 + 2 * 2
        err = capsys.readouterr().err
        assert "8/8" in err and "step" in err, err


def test_cli_fid_with_local_inception_weights(runs, tmp_path, capsys):
    weights = tmp_path / "inception.pth"
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), weights)
    assert main(["sample", "--checkpoint", runs["ddpm"], "--num", "4", "--steps", "2", "--out",
                 str(tmp_path / "grid.png"), "--fid-ref", str(runs["root"] / "val"), "--fid-ref-limit", "6",
                 "--inception-weights", str(weights), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    assert report["fid"] >= 0 and report["fid_reference_images"] == 6


def test_frechet_distance_matches_the_formula():
    a, b = torch.randn(200, 5, dtype=torch.float64), torch.randn(300, 5, dtype=torch.float64) * 1.5 + 0.3
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    cov_a, cov_b = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + (cov_a + cov_b).trace() \
        - 2 * scipy_linalg.sqrtm(cov_a @ cov_b).real.trace()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


class Oracle(torch.nn.Module):
    """The exact denoiser of a one-image data set: eps (DDPM) or velocity (flow) of x_t towards ``image``."""

    def __init__(self, image: torch.Tensor, flow: bool) -> None:
        super().__init__()
        self.image, self.flow = image, flow
        self.anchor = torch.nn.Parameter(torch.zeros(1))          # the sampler reads the device off a parameter
        self.config = types.SimpleNamespace(num_classes=2, class_dropout_prob=0.1, in_channels=3, input_size=8,
                                            learn_sigma=not flow)
        self.abar = DDPMObjective(1000, "linear", learn_sigma=False).scheduler.alphas_cumprod

    def forward(self, x, t, y):
        if self.flow:
            return (x - self.image) / (t / 1000).view(-1, 1, 1, 1)
        abar = self.abar[t.round().long()].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * self.image) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)          # learned-sigma channels: v = 0


@pytest.mark.parametrize("objective, scheduler", [("ddpm", "ddim"), ("ddpm", "ddpm"), ("ddpm", "dpm++"),
                                                  ("ddpm", "unipc"), ("flow", "euler"), ("flow", "dpm++")])
def test_an_exact_denoiser_samples_its_data_point(objective, scheduler):
    """The scheduler wiring (timesteps, prediction type, learned-sigma channels, flow sigmas) is right:
    with the exact denoiser of a one-image data set every scheduler lands on that image."""
    image = torch.rand(3, 8, 8) * 1.6 - 0.8
    cfg = DiTModelConfig(name="dit_s_2", objective=objective, kwargs={"learn_sigma": objective == "ddpm"})
    images = Sampler(Oracle(image, objective == "flow"), None, cfg).sample([0, 1], scheduler=scheduler, steps=20,
                                                                          progress=False)
    torch.testing.assert_close(images, ((image + 1) / 2).expand(2, -1, -1, -1), atol=2e-3, rtol=0)

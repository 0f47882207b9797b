"""``subquad sample``: class-conditional images from a trained DiT with any diffusers scheduler.

    subquad sample --checkpoint runs/dit_synthetic --scheduler dpm++ --steps 25 --cfg-scale 2 --num 16

The run's recipe (saved in its checkpoint) rebuilds the DiT, its VAE and its objective; the EMA
weights are used when the run has them. The grid goes to ``<run>/samples.png`` unless ``--out`` says
otherwise; the progress bar counts denoising steps (steps x batches). Image i starts from the noise of seed ``seed + i``, so an
image does not depend on the batch it is drawn in. With ``--fid-ref`` and ``--inception-weights``
(a torchvision ``inception_v3`` state dict on disk; nothing is downloaded) the FID against a folder
of reference images is reported; it uses torchvision's Inception, so it is comparable between runs
of this command, not with the TF-Inception FID of papers.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from torchvision.models import inception_v3
from torchvision.transforms.functional import center_crop, pil_to_tensor, resize
from torchvision.utils import save_image
from tqdm import tqdm

from ...backbones import DiT
from .checkpoint import find_latest, read_state, read_tensors, writing
from .config import DiTModelConfig, parse_config
from .data.images import read_image
from .diffusion import build_dit, load_vae
from .objectives import make_objective
from .pretrained import load_plain

DDPM_SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler",
                   "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                   "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler", "heun": "HeunDiscreteScheduler"}
FLOW_SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
                   "unipc": "UniPCMultistepScheduler"}


def make_scheduler(name: str, cfg: DiTModelConfig, learn_sigma: bool) -> Any:
    """A diffusers scheduler for a model trained with ``cfg``'s objective.

    ``name``: a short name (``ddim``, ``dpm++``, ``euler``...; for flow models ``euler``, ``dpm++``,
    ``unipc``) or any diffusers scheduler class name, configured from the training noise schedule.
    Pixel-space models (no ``cfg.vae``) clip the predicted x_0 to [-1, 1] where the scheduler can
    (DDPM, DDIM), as ADM samples pixels; latents are not clipped.
    """
    objective = make_objective(cfg, learn_sigma)
    if cfg.objective == "flow":
        if name not in FLOW_SCHEDULERS and name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"a flow-matching model samples with {', '.join(FLOW_SCHEDULERS)}; got {name!r}")
        if FLOW_SCHEDULERS.get(name, name) == "FlowMatchEulerDiscreteScheduler":
            return objective.scheduler
        cls = getattr(diffusers, FLOW_SCHEDULERS[name])
        return cls(num_train_timesteps=cfg.num_train_timesteps, use_flow_sigmas=True,
                   prediction_type="flow_prediction", flow_shift=1.0)
    cls = getattr(diffusers, DDPM_SCHEDULERS.get(name, name), None)
    if cls is None or not hasattr(cls, "from_config") or "Scheduler" not in cls.__name__:
        raise ValueError(f"unknown scheduler {name!r}; short names: {', '.join(DDPM_SCHEDULERS)}, or any diffusers "
                         f"scheduler class name")
    extra = {"clip_sample": cfg.vae is None}
    if cls is not diffusers.DDPMScheduler and "variance_type" in inspect.signature(cls.__init__).parameters:
        extra["variance_type"] = None              # the sampler hands these schedulers eps only
    if cls is diffusers.DPMSolverMultistepScheduler:
        extra["algorithm_type"] = "dpmsolver++"
    return cls.from_config(objective.scheduler.config, **extra)


@dataclass
class Sampler:
    """A DiT, its optional VAE and the recipe's model section: everything sampling needs."""
    model: DiT
    vae: diffusers.AutoencoderKL | None
    cfg: DiTModelConfig

    @classmethod
    def from_run(cls, checkpoint: str, ema: bool = True, device: str = "cpu") -> Sampler:
        """The DiT of a subquad run (or one of its checkpoint folders), EMA weights unless ``ema=False``."""
        where = Path(checkpoint)
        folder = where if (where / "state.json").is_file() else find_latest(where)
        if folder is None:
            raise ValueError(f"no subquad checkpoint in {where}")
        state = read_state(folder)
        if state["task"] != "dit":
            raise ValueError(f"{folder} is a {state['task']!r} run, not a DiT")
        recipe = parse_config(state["config"], source=str(folder))
        vae = load_vae(recipe.model.vae) if recipe.model.vae else None
        model_cfg = dataclasses.replace(recipe.model, checkpoint=None)
        model = build_dit(model_cfg, state["num_classes"], recipe.data.img_size, vae)
        tensors = read_tensors(folder)
        prefix = "ema." if ema and any(k.startswith("ema.") for k in tensors) else "model."
        model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return cls(model.to(device).eval(), vae.to(device) if vae else None, model_cfg)

    @property
    def default_scheduler(self) -> str:
        """``ddim`` for a DDPM model, ``euler`` for a flow-matching one."""
        return "euler" if self.cfg.objective == "flow" else "ddim"

    @torch.no_grad()
    def sample(self, labels: list[int], *, scheduler: str | None = None, steps: int = 50, cfg_scale: float = 1.0,
               seed: int = 0, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] for the class ``labels``; image i from seed ``seed + i``; ``scheduler``
        None: ``default_scheduler``."""
        scheduler = scheduler or self.default_scheduler
        if not labels or steps < 1 or batch_size < 1:
            raise ValueError(f"sampling needs class labels, steps >= 1 and batch_size >= 1; got {len(labels)} labels, "
                             f"steps={steps}, batch_size={batch_size}")
        model = self.model
        num_classes = model.config.num_classes
        if any(not 0 <= y < num_classes for y in labels):
            raise ValueError(f"class labels must be in [0, {num_classes - 1}], got {labels}")
        if cfg_scale != 1.0 and model.config.class_dropout_prob <= 0:
            raise ValueError("classifier-free guidance needs a model trained with class_dropout_prob > 0")
        device = next(model.parameters()).device
        channels, side = model.config.in_channels, model.config.input_size
        images = []
        starts = range(0, len(labels), batch_size)
        sched = make_scheduler(scheduler, self.cfg, model.config.learn_sigma)
        sched.set_timesteps(steps, device=device)
        bar = tqdm(total=len(starts) * len(sched.timesteps), desc="sample", unit="step", disable=not progress)
        for start in starts:
            chunk = labels[start:start + batch_size]
            sched = make_scheduler(scheduler, self.cfg, model.config.learn_sigma)
            sched.set_timesteps(steps, device=device)
            noise = [torch.randn(channels, side, side, generator=torch.Generator().manual_seed(seed + start + i))
                     for i in range(len(chunk))]
            x = torch.stack(noise).to(device) * getattr(sched, "init_noise_sigma", 1.0)   # flow schedulers: 1
            y = torch.tensor(chunk, device=device)
            generator = torch.Generator(device).manual_seed(seed + start)
            keep_sigma = isinstance(sched, diffusers.DDPMScheduler) and model.config.learn_sigma
            step_kwargs = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
            for t in sched.timesteps:
                tt = t.to(device, torch.float32).expand(len(chunk))
                xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
                out = model.forward_with_cfg(xin, tt, y, cfg_scale) if cfg_scale != 1.0 else model(xin, tt, y)
                x = sched.step(out if keep_sigma else out[:, :channels], t, x, **step_kwargs).prev_sample
                bar.update(1)
            images.append(self.decode(x))
        bar.close()
        return torch.cat(images)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)).sample
        return ((x.float() + 1) / 2).clamp(0, 1).cpu()


# --- FID with local Inception weights ------------------------------------------------------------


def load_inception(weights: str | Path) -> torch.nn.Module:
    """torchvision's Inception-v3 with the state dict at ``weights``, its classifier removed: the FID's feature net.

    A file that is missing is a ``FileNotFoundError``; one that is not a plain inception_v3 state dict
    (a pickle with code in it, another model) a ``ValueError`` naming it."""
    if not Path(weights).is_file():
        raise FileNotFoundError(f"--inception-weights {weights} does not exist")
    state = load_plain(weights, "--inception-weights")
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
    if not isinstance(state, dict):
        raise ValueError(f"--inception-weights {weights} holds a {type(state).__name__}, not a state dict")
    missing, _ = net.load_state_dict({k: v for k, v in state.items() if not k.startswith("AuxLogits.")}, strict=False)
    if missing:
        raise ValueError(f"--inception-weights {weights} is not a torchvision inception_v3 state dict "
                         f"(missing {missing[:3]}...)")
    net.fc = torch.nn.Identity()
    return net.eval()


def inception_features(images: torch.Tensor, net: torch.nn.Module, batch_size: int = 32) -> torch.Tensor:
    """2048-d pool features of ``load_inception``'s net for images in [0, 1]."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    feats = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            x = F.interpolate(chunk.float(), size=(299, 299), mode="bilinear", align_corners=False)
            feats.append(net((x - mean) / std).double())
    return torch.cat(feats)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets (N, D): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    # Tr((S_a S_b)^1/2) = Tr((S_a^1/2 S_b S_a^1/2)^1/2): the eigenvalues of a symmetric PSD matrix
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def load_images(folder: str, size: int, limit: int) -> torch.Tensor:
    """Up to ``limit`` images (any depth below ``folder``, sorted) resized to ``size``, in [0, 1]."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not paths:
        raise ValueError(f"no images under {folder}")
    out = [center_crop(resize(pil_to_tensor(read_image(p)), size, antialias=True), size)
           for p in paths[:limit]]
    return torch.stack(out).float() / 255


# --- the command line ------------------------------------------------------------------------------


def run_folder(checkpoint: str | Path) -> Path:
    """The run folder of ``--checkpoint``: the folder itself, or for one of its checkpoint folders
    (``<run>/checkpoints/step_*``) the run that holds it."""
    where = Path(checkpoint)
    if (where / "state.json").is_file() and where.parent.name == "checkpoints":
        return where.parent.parent
    return where


def run_sample(args: Any) -> dict[str, Any]:
    """``subquad sample``: a PNG grid (and with --fid-ref, the FID) from a DiT run."""
    for option in ("steps", "num", "batch_size", "nrow", "fid_ref_limit"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be positive, got {value}")
    if args.fid_ref and not args.inception_weights:
        raise ValueError("--fid-ref needs --inception-weights (a local torchvision inception_v3 state dict)")
    inception = load_inception(args.inception_weights) if args.fid_ref else None      # before the slow part
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sampler = Sampler.from_run(args.checkpoint, ema=not args.no_ema, device=device)
    num_classes = sampler.model.config.num_classes
    labels = [int(v) for v in args.labels.split(",")] if args.labels else [i % num_classes for i in range(args.num)]
    scheduler = args.scheduler or sampler.default_scheduler
    images = sampler.sample(labels, scheduler=scheduler, steps=args.steps, cfg_scale=args.cfg_scale,
                            seed=args.seed, batch_size=args.batch_size)
    out = Path(args.out) if args.out else run_folder(args.checkpoint) / "samples.png"
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(images, str(out), nrow=args.nrow or min(8, len(images)))
    report: dict[str, Any] = {"images": len(images), "grid": str(out), "scheduler": scheduler,
                              "steps": args.steps, "cfg_scale": args.cfg_scale, "seed": args.seed}
    if inception is not None:
        reference = load_images(args.fid_ref, images.shape[-1], args.fid_ref_limit)
        report["fid"] = frechet_distance(inception_features(images, inception),
                                         inception_features(reference, inception))
        report["fid_reference_images"] = len(reference)
    else:
        report["fid"] = "skipped (no --fid-ref / --inception-weights)"
    print(json.dumps(report, indent=1))
    return report

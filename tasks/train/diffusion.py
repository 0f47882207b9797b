"""DiT training as a task of ``trainer.py``'s loop: ``subquad train --config dit/synthetic``.

``DiffusionTask`` is what the shared ``Trainer`` drives (accelerate, bf16, gradient accumulation,
EMA, resumable checkpoints, metrics log): the model, the data, a loss and an evaluation. The loss
encodes images with the VAE when the recipe names one (latent diffusion) or uses the pixels
(pixel-space diffusion), then applies the objective of ``objectives.py``. The evaluation
is the same loss on validation images at fixed timesteps and noise, so it is comparable across steps.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torch import nn
from torchvision import transforms
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from ...backbones import DiT
from .config import DiTDataConfig, DiTModelConfig, TrainConfig
from .data.images import data_not_found, read_image
from .data.sampling import eval_loader
from .data.synthetic import write_classification
from .objectives import make_objective
from .pretrained import read_weights


def load_vae(folder: str) -> AutoencoderKL:
    """A frozen diffusers AutoencoderKL from a local folder (no download)."""
    if not Path(folder).is_dir():
        raise ValueError(f"model.vae {folder!r} is not a folder: give a local diffusers AutoencoderKL folder "
                         f"(or null for pixel-space diffusion)")
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
    return vae.requires_grad_(False).eval()


def latent_shape(cfg: DiTModelConfig, img_size: int, vae: AutoencoderKL | None) -> tuple[int, int]:
    """(channels, side) of what the DiT denoises: the image, or its VAE latent."""
    if vae is None:
        return 3, img_size
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if img_size % scale:
        raise ValueError(f"data.img_size {img_size} is not divisible by the VAE's downsampling factor {scale}")
    return vae.config.latent_channels, img_size // scale


def build_dit(cfg: DiTModelConfig, num_classes: int, img_size: int, vae: AutoencoderKL | None) -> DiT:
    """The DiT of a recipe: ``cfg.name`` with ``cfg.kwargs``, sized for the data; weights from ``cfg.checkpoint``."""
    channels, side = latent_shape(cfg, img_size, vae)
    model = timm.create_model(cfg.name, input_size=side, in_channels=channels, num_classes=num_classes, **cfg.kwargs)
    if not isinstance(model, DiT):
        raise ValueError(f"model.name {cfg.name!r} is not a DiT; use one of dit_{{s,b,l,xl}}_{{1,2,4,8}}")
    if side % model.patch_size:
        raise ValueError(f"the {'latent' if vae else 'image'} side {side} is not divisible by patch size "
                         f"{model.patch_size}")
    if cfg.checkpoint:
        try:
            model.load_state_dict(read_weights(cfg.checkpoint))
        except RuntimeError as e:
            raise ValueError(f"model.checkpoint {cfg.checkpoint} does not fit {cfg.name}: {e}") from e
    return model


def image_transform(data: DiTDataConfig, train: bool) -> transforms.Compose:
    """ADM's preprocessing: resize the short side, centre crop, (random flip,) scale to [-1, 1]."""
    steps = [transforms.Resize(data.img_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
             transforms.CenterCrop(data.img_size)]
    if train and data.hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(data.hflip))
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])


def image_datasets(data: DiTDataConfig) -> tuple[ImageFolder, ImageFolder]:
    root = Path(data.root)
    if data.synthetic and not root.exists():
        print(f"writing the synthetic shapes set ({data.img_size}x{data.img_size}, {data.synthetic_style}) to {root}")
        write_classification(root, size=data.img_size, style=data.synthetic_style)
    sets = []
    for split, train in ((data.train_split, True), (data.val_split, False)):
        if not (root / split).is_dir():
            raise data_not_found(root / split, root, "a DiT recipe reads an ImageFolder, data.root/train/<class>/"
                                 "<image> and data.root/val/<class>/<image> (one class folder is fine)")
        sets.append(ImageFolder(str(root / split), transform=image_transform(data, train), loader=read_image))
    if sets[0].classes != sets[1].classes:
        raise ValueError(f"{root}: the {data.train_split} and {data.val_split} splits have different classes")
    return sets[0], sets[1]


class DiffusionTask:
    """Model, data, loss and evaluation of a ``dit`` recipe (the interface ``trainer.Trainer`` drives)."""

    sync_batchnorm = False
    collate_fn = None

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.train_set, self.val_set = image_datasets(cfg.data)
        self.num_classes = len(self.train_set.classes)
        self.vae = load_vae(cfg.model.vae) if cfg.model.vae else None
        self.model = build_dit(cfg.model, self.num_classes, cfg.data.img_size, self.vae)
        self.objective = make_objective(cfg.model, self.model.config.learn_sigma)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """What the DiT denoises: the images, or their VAE latents (sampled, scaled by the VAE's factor)."""
        if self.vae is None:
            return images
        self.vae.to(images.device)
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample()
        return ((latents - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor).to(images.dtype)

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return self.objective.loss(model, self.encode(images), labels).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """The mean loss over the first ``data.val_images`` validation images, at fixed timesteps and noise."""
        model.eval()
        subset = torch.utils.data.Subset(self.val_set, range(min(self.cfg.data.val_images, len(self.val_set))))
        loader = eval_loader(subset, self.cfg.data.batch_size, self.cfg.data.workers, accelerator.process_index,
                             accelerator.num_processes)
        generator = torch.Generator().manual_seed(accelerator.process_index)
        totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for images, labels in tqdm(loader, desc="eval", leave=False, disable=not accelerator.is_main_process):
            images, labels = images.to(accelerator.device), labels.to(accelerator.device)
            with accelerator.autocast():
                loss = self.objective.loss(model, self.encode(images), labels, generator=generator)
            totals += torch.stack([loss.double().sum(), loss.new_tensor(len(loss), dtype=torch.float64)])
        total, count = accelerator.reduce(totals, "sum").tolist()
        return {"loss": total / count}

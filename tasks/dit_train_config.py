"""The ``model`` and ``data`` sections of a ``task: dit`` recipe (``optim``, ``schedule``, ``run`` are the
shared ones of ``config.py``). Plain dataclasses, no heavy imports: ``config.py`` reads them.

The diffusion process is part of the model section on purpose: a checkpoint trained for one
objective, noise schedule or latent space is another model, and a resume that changes them is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

OBJECTIVES = ("ddpm", "flow")
FLOW_TIMESTEPS = ("uniform", "logit_normal")


@dataclass
class DiTModelConfig:
    """A registered DiT (``dit_{s,b,l,xl}_{1,2,4,8}``) and the diffusion it learns.

    ``input_size``, ``in_channels`` and ``num_classes`` follow from the data and the VAE; ``kwargs``
    sets the rest (``learn_sigma``, ``attn``, ``attn_kwargs``, ``depth``, ``hidden_size``...).
    ``objective: ddpm``: diffusers' ``DDPMScheduler`` noise schedule, epsilon prediction; with
    ``learn_sigma`` (DiT's default) the loss is DiT's hybrid MSE(eps) + VLB (the VLB trains the
    variance channels, with the mean frozen), without it plain MSE on eps. ``objective: flow``:
    rectified flow x_t = (1 - s) x_0 + s eps, velocity target eps - x_0, timestep s * T
    (diffusers' ``FlowMatchEulerDiscreteScheduler`` convention); needs ``learn_sigma: false``.
    """
    name: str
    kwargs: dict = field(default_factory=dict)
    checkpoint: str | None = None                  # weights to start from (a subquad run, .safetensors, .pth)
    vae: str | None = None                         # a local diffusers AutoencoderKL folder: latent space; None: pixels
    objective: str = "ddpm"                        # ddpm | flow
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"                  # ddpm: DDPMScheduler's beta_schedule
    flow_timesteps: str = "uniform"                # flow: uniform | logit_normal (SD3's timestep density)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"model.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.flow_timesteps not in FLOW_TIMESTEPS:
            raise ValueError(f"model.flow_timesteps must be one of {', '.join(FLOW_TIMESTEPS)}, "
                             f"got {self.flow_timesteps!r}")
        derived = sorted({"input_size", "in_channels", "num_classes"} & set(self.kwargs))
        if derived:
            raise ValueError(f"model.kwargs sets {', '.join(derived)}, which follow from data.img_size, the VAE "
                             f"and the data set's classes; remove them")
        if self.objective == "flow" and self.kwargs.get("learn_sigma", True):
            raise ValueError("model.objective flow predicts a velocity: set model.kwargs.learn_sigma: false")
        if self.num_train_timesteps < 1:
            raise ValueError(f"model.num_train_timesteps must be >= 1, got {self.num_train_timesteps}")


@dataclass
class DiTDataConfig:
    """An ImageFolder (``train/``, ``val/``); images resized and centre-cropped to ``img_size`` (ADM's
    preprocessing), flipped at random, scaled to [-1, 1]. The class folders are the labels."""
    root: str
    synthetic: bool = False                        # write the synthetic shapes set at root if it is missing
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 256
    batch_size: int = 32                           # per process and micro-batch
    workers: int = 4
    hflip: float = 0.5
    val_images: int = 256                          # the validation loss uses at most this many images

    def __post_init__(self) -> None:
        if self.img_size < 1 or self.val_images < 1:
            raise ValueError(f"data.img_size and data.val_images must be >= 1, got {self.img_size}, {self.val_images}")

"""Training recipes: one YAML file per recipe (model + data + schedule), checked against a schema.

A recipe names its ``task`` (``cls``, ``seg`` or ``dit``) and has the sections ``model``, ``data``,
``optim``, ``schedule`` and ``run``. The valid keys of each section are the fields of the dataclasses
below; an unknown key, a missing required key or a value of the wrong type is a ``ValueError`` that says which
key and lists the valid ones. ``--config`` takes a path or the name of a packaged recipe
(``cls/synthetic`` is ``subquad/configs/cls/synthetic.yaml``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml


@dataclass
class ClsModelConfig:
    """A timm classifier: any registered name plus ``timm.create_model`` keywords."""
    name: str
    kwargs: dict = field(default_factory=dict)       # e.g. img_size, drop_path_rate, depth
    checkpoint: str | None = None                    # local weights to fine-tune from (head reset on a class-count change)


@dataclass
class SegModelConfig:
    """A ``features_only`` timm backbone under a UPerNet or Semantic-FPN head."""
    backbone: str
    kwargs: dict = field(default_factory=dict)
    out_indices: list | None = None                  # the backbone's feature levels (timm's default if None)
    checkpoint: str | None = None                    # backbone weights (e.g. an ImageNet classifier checkpoint)
    head: str = "upernet"                            # upernet | fpn
    head_channels: int | None = None                 # None: 512 for upernet, 256 for fpn
    pool_scales: list = field(default_factory=lambda: [1, 2, 3, 6])
    dropout: float = 0.1
    aux_weight: float = 0.4                          # auxiliary FCN head on the third level; 0 = none
    aux_channels: int = 256


@dataclass
class ClsDataConfig:
    """An ImageFolder (``train/``, ``val/``) or a Hugging Face ``datasets`` folder; timm's pipeline."""
    root: str
    format: str = "imagefolder"                      # imagefolder | hf (a datasets.save_to_disk folder)
    synthetic: bool = False                          # write the synthetic data set at root if it is missing
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 224
    batch_size: int = 128                            # per process and micro-batch
    eval_batch_size: int | None = None
    workers: int = 4
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    scale: list = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    color_jitter: float = 0.3
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class SegDataConfig:
    """ADE20K as ``ADEChallengeData2016`` with mmsegmentation's recipe pipeline."""
    root: str                                        # the ADEChallengeData2016 folder
    synthetic: bool = False
    num_classes: int = 150
    crop_size: int = 512
    scale: list = field(default_factory=lambda: [2048, 512])      # (long, short) bound before the random ratio
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    eval_stride: int = 341
    batch_size: int = 2                              # per process and micro-batch
    workers: int = 4


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

    The diffusion process is part of the model section on purpose: a checkpoint trained for one
    objective, noise schedule or latent space is another model, and a resume that changes them is refused.
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
    synthetic_style: str = "textured"              # textured (the classification set) | simple (plain, upright)
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


@dataclass
class OptimConfig:
    """timm's ``create_optimizer_v2`` (weight decay skips norms, biases and ``no_weight_decay()``).

    Fine-tuning: ``layer_decay`` scales each block's learning rate by decay^(depth from the head) (timm's
    ``param_groups_layer_decay``); ``freeze`` keeps the parameters whose names match out of training, except
    those ``trainable`` matches: ``freeze: ["*"]``, ``trainable: ["head.*"]`` is a linear probe.
    """
    opt: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: list | None = None
    eps: float | None = None
    layer_decay: float | None = None                 # layer-wise lr decay (BEiT, timm): block i of L gets lr * decay^(L-i)
    no_decay: list = field(default_factory=list)     # name patterns (fnmatch) without weight decay, e.g. *pos_embed*
    clip_grad: float | None = None
    freeze: list = field(default_factory=list)       # name patterns (fnmatch) of parameters left untrained
    trainable: list = field(default_factory=list)    # patterns trained even where freeze matches (e.g. head.*)


@dataclass
class ScheduleConfig:
    """timm's scheduler, stepped per optimizer update. Length in ``epochs`` or ``steps`` (one of them)."""
    sched: str = "cosine"                            # cosine | poly | any create_scheduler_v2 name
    epochs: float | None = None
    steps: int | None = None
    warmup_epochs: float = 0
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    power: float = 1.0                               # poly


@dataclass
class RunConfig:
    """Where and how: output folder, precision, accumulation, EMA, intervals (in optimizer steps)."""
    output_dir: str
    seed: int = 0
    mixed_precision: str = "no"                      # no | bf16 | fp16 (accelerate)
    grad_accum_steps: int = 1
    ema_decay: float | None = None
    log_interval: int = 50
    eval_interval: int = 1000
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 2


SECTIONS: dict[str, dict[str, type]] = {
    "cls": dict(model=ClsModelConfig, data=ClsDataConfig, optim=OptimConfig, schedule=ScheduleConfig, run=RunConfig),
    "seg": dict(model=SegModelConfig, data=SegDataConfig, optim=OptimConfig, schedule=ScheduleConfig, run=RunConfig),
    "dit": dict(model=DiTModelConfig, data=DiTDataConfig, optim=OptimConfig, schedule=ScheduleConfig, run=RunConfig),
}


@dataclass
class TrainConfig:
    task: str
    model: Any
    data: Any
    optim: OptimConfig
    schedule: ScheduleConfig
    run: RunConfig
    source: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped in ``subquad.configs`` (e.g. ``cls/synthetic``)."""
    root = resources.files("subquad.configs")
    return sorted(f"{task.name}/{f.name[:-5]}" for task in root.iterdir() if task.is_dir()
                  for f in task.iterdir() if f.name.endswith(".yaml"))


def resolve_config_path(config: str) -> Path:
    """A path on disk, else a packaged recipe name (``cls/synthetic`` or ``cls/synthetic.yaml``)."""
    path = Path(config)
    if path.is_file():
        return path
    name = config.removesuffix(".yaml").removeprefix("configs/")
    packaged = resources.files("subquad.configs").joinpath(*f"{name}.yaml".split("/"))
    if packaged.is_file():
        return Path(str(packaged))
    raise ValueError(f"config {config!r} is neither a file nor a packaged recipe; packaged recipes: "
                     f"{', '.join(packaged_recipes())}")


def load_config(config: str, overrides: list[str] = ()) -> TrainConfig:
    """Read a recipe, apply ``section.key=value`` overrides (values parsed as YAML; keys may nest, as in
    ``model.kwargs.depth=3``), validate it."""
    path = resolve_config_path(config)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        *parents, name = key.split(".")
        if not sep or not parents:
            raise ValueError(f"an override is section.key=value (keys may nest: model.kwargs.depth=3), got {item!r}")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{path}: cannot set {key}: {part!r} is not a mapping")
        node[name] = yaml.safe_load(value)
    return parse_config(raw, source=str(path))


def parse_config(raw: dict, source: str = "<dict>") -> TrainConfig:
    """Build a ``TrainConfig`` from a plain dict (a parsed YAML recipe)."""
    raw = dict(raw)
    task = raw.pop("task", None)
    if task not in SECTIONS:
        raise ValueError(f"{source}: 'task' must be one of {sorted(SECTIONS)}, got {task!r}")
    schema = SECTIONS[task]
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; valid top-level keys: task, {', '.join(schema)}")
    sections = {name: _build_section(cls, raw.get(name) or {}, f"{source}: {name}") for name, cls in schema.items()}
    cfg = TrainConfig(task=task, source=source, **sections)
    _check(cfg, source)
    return cfg


def _build_section(cls: type, values: dict, where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(fields)}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in values]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a field's type; YAML 1.1 reads ``5e-4`` as a string, so floats accept numeric strings,
    and ``no`` as false, so ``run.mixed_precision: no`` means the string."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    if value is False and str in options and where.endswith(".mixed_precision"):
        return "no"
    for option in options:
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool, dict, list) and type(value) is option:
            return value
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise ValueError(f"{where}: expected {names}, got {value!r}")


# numbers a recipe must keep positive (counts, sizes, lengths) or >= 0; a section without the key skips it
POSITIVE = ("data.batch_size", "data.eval_batch_size", "data.img_size", "data.crop_size", "data.eval_stride",
            "data.num_classes", "data.val_images", "schedule.steps", "schedule.epochs", "run.grad_accum_steps",
            "run.log_interval", "run.eval_interval", "run.checkpoint_interval", "run.keep_checkpoints")
NON_NEGATIVE = ("data.workers", "schedule.warmup_steps", "schedule.warmup_epochs")


def _check(cfg: TrainConfig, source: str) -> None:
    """Cross-field rules a type cannot express."""
    s, r = cfg.schedule, cfg.run
    if (s.epochs is None) == (s.steps is None):
        raise ValueError(f"{source}: set exactly one of schedule.epochs and schedule.steps")
    if s.epochs is None and s.warmup_epochs:
        raise ValueError(f"{source}: a schedule in steps takes warmup_steps, not warmup_epochs")
    if s.steps is None and s.warmup_steps:
        raise ValueError(f"{source}: a schedule in epochs takes warmup_epochs, not warmup_steps")
    if r.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"{source}: run.mixed_precision must be no, bf16 or fp16, got {r.mixed_precision!r}")
    for key in POSITIVE + NON_NEGATIVE:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name, None)
        if value is not None and (value <= 0 if key in POSITIVE else value < 0):
            raise ValueError(f"{source}: {key} must be {'positive' if key in POSITIVE else '>= 0'}, got {value}")
    if cfg.optim.trainable and not cfg.optim.freeze:
        raise ValueError(f"{source}: optim.trainable names exceptions to optim.freeze, which is empty")
    if cfg.optim.no_decay and cfg.optim.layer_decay is not None:
        raise ValueError(f"{source}: optim.no_decay and optim.layer_decay cannot be combined")
    if cfg.task == "cls" and cfg.data.format not in ("imagefolder", "hf"):
        raise ValueError(f"{source}: data.format must be imagefolder or hf, got {cfg.data.format!r}")
    if cfg.task == "dit" and cfg.data.synthetic_style not in ("textured", "simple"):
        raise ValueError(f"{source}: data.synthetic_style must be textured or simple, got {cfg.data.synthetic_style!r}")
    if cfg.task == "seg" and cfg.model.head not in ("upernet", "fpn"):
        raise ValueError(f"{source}: model.head must be upernet or fpn, got {cfg.model.head!r}")

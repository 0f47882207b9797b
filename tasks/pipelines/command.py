"""``subquad accelerate-pipeline``: a local diffusers pipeline dense vs accelerated from one seed (images and
``report.json``), or one call of a random-weight transformer of a supported class dense vs accelerated."""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml
from diffusers import DiffusionPipeline
from torchvision.utils import save_image

from .accelerate import accelerate_pipeline
from .compare import compare_pipeline
from .random_models import benchmark_transformer

PIPELINE_ARGUMENTS = ("prompt", "negative_prompt", "class_labels", "height", "width", "num_frames",
                      "num_inference_steps", "guidance_scale")


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """``["kernel_size=13", "layout=official"]`` -> ``{"kernel_size": 13, "layout": "official"}`` (values as YAML)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"an attention option is KEY=VALUE, got {item!r}")
        options[key] = yaml.safe_load(value)
    return options


def parse_indices(text: str | None) -> list[int]:
    """``"0,1,4-6"`` -> ``[0, 1, 4, 5, 6]``."""
    indices = []
    for part in filter(None, (text or "").split(",")):
        first, _, last = part.partition("-")
        indices += range(int(first), int(last or first) + 1)
    return indices


def pipeline_call_kwargs(pipe: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The given ``PIPELINE_ARGUMENTS`` values (None: not given), checked against ``pipe.__call__``."""
    accepted = inspect.signature(pipe.__call__).parameters
    given = {k: v for k, v in values.items() if v is not None}
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise ValueError(f"{type(pipe).__name__} does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(k for k in PIPELINE_ARGUMENTS if k in accepted)}")
    return given


def _save_images(images: torch.Tensor, path: Path) -> None:
    save_image(images, str(path), nrow=min(8, len(images)))


def _note(text: str) -> None:
    print(f"subquad accelerate-pipeline: {text}", file=sys.stderr)


def _warn_if_all_dense(dense_layers: list[int], blocks: int) -> None:
    if blocks and set(range(blocks)) <= set(dense_layers):
        _note(f"warning: --dense-layers keeps every one of the {blocks} blocks dense, so the accelerated run is "
              f"the dense one; keep fewer (0..{blocks - 1})")


def dtype_keyword() -> str:
    """``from_pretrained``'s name for the dtype: ``dtype`` in the diffusers that renamed it (where ``torch_dtype``
    is a FutureWarning), ``torch_dtype`` before."""
    from diffusers.utils import deprecation_utils
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(folder: str, dtype: torch.dtype, device: str) -> DiffusionPipeline:
    """A local diffusers pipeline folder (nothing is downloaded); a missing folder, or one that is not a saved
    pipeline, is named as such rather than read as a Hub repo id."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {folder}: folder not found (give a local diffusers pipeline folder, the "
                                f"one with model_index.json, e.g. saved with save_pretrained)")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"--model {folder} has no model_index.json: it is not a diffusers pipeline folder "
                         f"(save one with pipe.save_pretrained(folder))")
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **{dtype_keyword(): dtype})
    return pipe.to(device)


def run_accelerate_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """``subquad accelerate-pipeline``: a local pipeline dense vs accelerated (images, report.json), or
    with ``--random KIND`` one random-weight transformer call dense vs accelerated (speed only)."""
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = parse_options(args.opt)
    swap = dict(dense_layers=parse_indices(args.dense_layers), fall_back_if_slower=not args.no_fallback, **options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compile and not args.random:
        raise ValueError("--compile times one transformer call: give it with --random KIND")
    if args.random:
        report = benchmark_transformer(args.random, args.attn, size=args.size, height=args.height, width=args.width,
                                       num_frames=args.num_frames or 1, dtype=dtype, device=device,
                                       repeats=args.repeats, compile=args.compile,
                                       steps=args.num_inference_steps or 0, dense_steps=args.dense_steps, **swap)
        _warn_if_all_dense(swap["dense_layers"], report["blocks"])
    else:
        if args.model is None:
            raise ValueError("give --model <a local diffusers pipeline folder> (or --random KIND for a speed test)")
        pipe = load_pipeline(args.model, dtype, device)
        pipe.set_progress_bar_config(disable=True)
        with accelerate_pipeline(pipe, args.attn, **swap) as dry_run:       # checks the options, counts the blocks
            _warn_if_all_dense(swap["dense_layers"], len(set(dry_run.layers.values())))
        values = {k: getattr(args, k) for k in PIPELINE_ARGUMENTS}
        if values["class_labels"] is not None:
            values["class_labels"] = parse_indices(values["class_labels"])
        report, dense, fast = compare_pipeline(pipe, pipeline_call_kwargs(pipe, values), args.attn, seed=args.seed,
                                               warmup=args.warmup, dense_steps=args.dense_steps, **swap)
        _save_images(dense, out / "dense.png")
        _save_images(fast, out / "accelerated.png")
    report = {"attn": args.attn, "options": options, "dense_layers": swap["dense_layers"],
              "dense_steps": args.dense_steps, **report}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    for key, value in report.items():
        print(f"{key:>16}  {value:.4g}" if isinstance(value, float) else f"{key:>16}  {value}")
    if args.random:
        _speed_note(args.size, device)
    return report


def _speed_note(size: str, device: str) -> None:
    """One line on what the speedup of a ``--random`` run can say on this size and device."""
    on_cpu = torch.device(device).type == "cpu"
    if size == "tiny":
        _note(f"note: tiny sizes{' on a CPU' if on_cpu else ''} cannot show a speedup (a tiny model's call is all "
              f"fixed costs): this run checks that the swap works and the output stays close; time --size full on "
              f"a GPU")
    elif on_cpu:
        _note("note: on a CPU every op runs its PyTorch reference, not the Triton kernels, so the time says nothing "
              "about them: time on a GPU")

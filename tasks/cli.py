"""The ``subquad`` command line: ``subquad models``, ``families``, ``bench``, ``train``, ``eval``,
``data synthetic``, ``sample``, ``accelerate-pipeline``.

The parser is built without torch, so that ``subquad --help`` answers at once: each sub-command imports
what it runs inside its handler, and the family names, which come from the kernels' records (and so
from torch), are listed by ``subquad families`` rather than in the help texts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .bench import SUITES
from .tables import format_table

DTYPES = ("bfloat16", "float16", "float32")       # torch dtype names, resolved in the handlers

# Each handler imports what it runs (torch, timm, diffusers) when called: the parser must not load them.


def _models(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .zoo import MODEL_COLUMNS, model_rows, subquad_model_names
    rows = model_rows(recount=args.recount)
    if args.recount:
        rows = tqdm(rows, total=len(subquad_model_names()), desc="counting", unit="model", leave=False)
    print(format_table(list(rows), MODEL_COLUMNS))


def _families(args: argparse.Namespace) -> None:
    from .zoo import FAMILY_COLUMNS, family_table
    print(format_table(family_table(), FAMILY_COLUMNS))


def _bench(args: argparse.Namespace) -> None:
    import torch

    from .. import attention
    from .bench.families import BenchConfig, parse_sizes, run_bench
    from .bench.suites import run_suite
    families = [attention.canonical_name(f) for f in args.families.split(",")] if args.families else None
    if args.suite != "families":
        modes = ("eager",) + ("compile",) * args.compile + ("cuda-graph",) * args.cuda_graph
        run_suite(args.suite, Path(args.out), families, modes=modes,
                  models=args.models.split(",") if args.models else None, profile=args.profile,
                  sizes=parse_sizes(args.sizes) if args.sizes else None, repeats=args.repeats)
        return
    cfg = BenchConfig.default(args.device)
    if args.dtype:
        cfg.dtype = getattr(torch, args.dtype)
    if args.sizes:
        cfg.sizes = parse_sizes(args.sizes)
    if families:
        cfg.families = families
    if args.repeats:
        cfg.repeats = args.repeats
    cfg.cuda_graph = args.cuda_graph
    run_bench(cfg, Path(args.out))


def _train(args: argparse.Namespace) -> None:
    from .train.config import load_config
    from .train.trainer import train
    train(load_config(args.config, args.set), resume=args.resume)


def _eval(args: argparse.Namespace) -> None:
    from .train.config import load_config
    from .train.trainer import evaluate
    evaluate(load_config(args.config, args.set), args.checkpoint)


def _data_synthetic(args: argparse.Namespace) -> None:
    from .train.data.synthetic import write_classification, write_segmentation
    out = Path(args.out)
    for name, write in (("synthetic_cls", write_classification), ("synthetic_ade/ADEChallengeData2016", write_segmentation)):
        if (out / name).exists():
            print(f"{out / name} exists: left as it is")
        else:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            print(f"wrote {write(out / name, seed=args.seed)}")


def _sample(args: argparse.Namespace) -> None:
    from .train.sample import run_sample
    run_sample(args)


def _accelerate_pipeline(args: argparse.Namespace) -> None:
    from .pipelines.command import run_accelerate_pipeline
    run_accelerate_pipeline(args)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" not in text and action.option_strings and default is not None and default is not False \
                and default != argparse.SUPPRESS and default != []:
            text += " (default: %(default)s)"
        return text


def _recipes_epilog() -> str:
    from .train.config import packaged_recipes          # yaml and the file names only, no torch
    return ("packaged recipes: " + ", ".join(packaged_recipes()) + ". The synthetic ones run on a CPU in minutes "
            "(dit/synthetic, then `subquad sample --checkpoint runs/dit_synthetic`); the others name their data in "
            "data.root (the README's 'Train on real data' section gives the layouts).")


def _data_help(args: argparse.Namespace) -> None:
    raise ValueError("name a sub-command: synthetic (write the synthetic classification and segmentation sets); "
                     "see subquad data --help")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a YAML recipe: a path, or a packaged name such as cls/synthetic, "
                                                   "seg/synthetic or dit/synthetic")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (parsed as YAML), e.g. --set schedule.steps=100; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subquad", description="Efficient-attention vision backbones.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="the model zoo: name, attention, params, GFLOPs")
    p.add_argument("--recount", action="store_true",
                   help="count parameters and FLOPs afresh (about a second per model) instead of reading the "
                        "packaged table")
    p.set_defaults(run=_models)
    p = sub.add_parser("families", help="the attention families: name, aliases, paper, cost, grids, training-free")
    p.set_defaults(run=_families)
    p = sub.add_parser("bench", help="time every attention family against SDPA (table, CSV, PNG)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--sizes", help="comma-separated BxHxW, e.g. 32x56x56,4x128x128 (models suite: the cases of these "
                   "batch sizes and image sides, e.g. 4x1024x1024; another size adds a DeiT-S case)")
    p.add_argument("--families", help="comma-separated attention families or aliases (default: all; "
                                      "`subquad families` lists them)")
    p.add_argument("--repeats", type=int, help="timed repeats per case (median reported)")
    p.add_argument("--suite", choices=SUITES, default="families",
                   help="families: every attention family vs SDPA (default); linear / block-sparse / "
                        "grid-conv: the Triton kernels' own benchmarks (CUDA); dit: DiT training step and "
                        "sampling time per family vs the SDPA DiT (CUDA); models: whole timm models vs "
                        "timm's dense peers (CUDA); pipeline: FLUX- and Wan-sized diffusers transformers, one call "
                        "dense vs attention swaps (CUDA)")
    p.add_argument("--compile", action="store_true", help="models suite: also time torch.compile(model)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="families and models suites: also time the calls captured into one CUDA graph and replayed "
                        "(the GPU time without the host time; models: inference and the training step)")
    p.add_argument("--profile", action="store_true",
                   help="models suite: instead of timing, where each model's GPU time goes in inference and in a "
                        "training step (torch.profiler: microseconds per kernel and block, bench_models_profile.csv)")
    p.add_argument("--models", help="models suite: comma-separated substrings of the model names to keep "
                                    "(e.g. mala,nat; the dense peers always run); pipeline suite: of the cases' labels "
                                    "(e.g. flux,480x832x81)")
    p.add_argument("--out", default="bench_out", help="folder for bench.csv and bench.png")
    p.set_defaults(run=_bench)
    p = sub.add_parser("train", help="train a recipe: classification, segmentation or DiT diffusion (also under "
                                     "accelerate launch)",
                       description="Train a YAML recipe: classification (cls/), segmentation (seg/) or a "
                                   "class-conditional DiT (dit/). Several GPUs: accelerate launch --multi_gpu "
                                   "--num_processes N -m subquad.tasks.cli train --config ...",
                       epilog=_recipes_epilog(), formatter_class=DefaultsHelpFormatter)
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in run.output_dir from its last checkpoint")
    p.set_defaults(run=_train)
    p = sub.add_parser("eval", help="evaluate a run's latest checkpoint (and its EMA)",
                       formatter_class=DefaultsHelpFormatter)
    _add_recipe_args(p)
    p.add_argument("--checkpoint", help="a run or checkpoint folder (default: the recipe's run.output_dir)")
    p.set_defaults(run=_eval)
    p = sub.add_parser("data", help="data sets: subquad data synthetic writes the synthetic ones")
    p.set_defaults(run=_data_help)
    data = p.add_subparsers(dest="data_command", title="sub-commands")
    p = data.add_parser("synthetic", help="write the synthetic classification (ImageFolder) and segmentation "
                                          "(ADEChallengeData2016) sets", formatter_class=DefaultsHelpFormatter)
    p.add_argument("--out", default="data", help="folder for synthetic_cls/ and synthetic_ade/")
    p.add_argument("--seed", type=int, default=0, help="the generator's seed (the same seed writes the same images)")
    p.set_defaults(run=_data_synthetic)
    p = sub.add_parser("sample", help="class-conditional images from a trained DiT run: a PNG grid (and FID)",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a DiT run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--scheduler",
                   help="ddim, dpm++, euler, euler_a, ddpm, unipc, heun, pndm (flow models: euler, dpm++, unipc) "
                        "or any diffusers scheduler class name (default: ddim, for a flow model euler)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--num", type=int, default=16, help="images, the classes in turn (unless --labels)")
    p.add_argument("--labels", help="comma-separated class labels, one image each")
    p.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i")
    p.add_argument("--batch-size", type=int, default=16, help="images denoised at once")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--nrow", type=int, help="images per row of the grid")
    p.add_argument("--out", help="the PNG grid (default: samples.png in the run folder)")
    p.add_argument("--fid-ref", help="a folder of reference images: report the FID (needs --inception-weights)")
    p.add_argument("--fid-ref-limit", type=int, default=50000, help="reference images to read at most")
    p.add_argument("--inception-weights", help="a local torchvision inception_v3 state dict (nothing is downloaded)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.set_defaults(run=_sample)
    p = sub.add_parser("accelerate-pipeline", help="a diffusers pipeline with structured attention over its image "
                                                   "tokens: time and fidelity against the dense run",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", help="a local diffusers pipeline folder")
    p.add_argument("--random", choices=["dit", "pixart", "sd3", "flux", "wan"],
                   help="instead of --model: time one call of a random-weight transformer of this class (and "
                        "with --num-inference-steps a denoising loop end to end)")
    p.add_argument("--size", choices=["tiny", "full"], default="full", help="--random: the released model's size or tiny")
    p.add_argument("--attn", required=True, help="an attention family or alias that is training-free, dense softmax "
                                                 "aside (`subquad families` lists them)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the attention op, e.g. kernel_size=13; repeatable")
    p.add_argument("--dense-layers", help="blocks kept dense, e.g. 0,1,27 or 0-3")
    p.add_argument("--dense-steps", type=int, default=0, help="the first denoising steps kept dense")
    p.add_argument("--no-fallback", action="store_true",
                   help="run the attention family even where it measures slower than dense attention (on a "
                        "CUDA device the default times both on the first call of each token grid and runs the "
                        "faster)")
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt")
    p.add_argument("--class-labels", help="class-conditional pipelines (DiT): e.g. 207,360")
    p.add_argument("--height", type=int, help="pixels; --random: 1024 at --size full, 256 at tiny; else the "
                                             "pipeline's default")
    p.add_argument("--width", type=int, help="pixels; defaults as --height")
    p.add_argument("--num-frames", type=int)
    p.add_argument("--num-inference-steps", type=int,
                   help="denoising steps; --random: also time a loop of this many steps end to end, dense and "
                        "accelerated (its first --dense-steps dense), and compare the final latents")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int, default=0, help="the seed of both runs")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant before the timed one")
    p.add_argument("--repeats", type=int, default=3, help="--random: timed calls (median reported)")
    p.add_argument("--compile", action="store_true",
                   help="--random: also time torch.compile(transformer), dense and accelerated, with compile times")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the weights' and activations' dtype")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--out", default="accelerate_out", help="folder for dense.png, accelerated.png and report.json")
    p.set_defaults(run=_accelerate_pipeline)
    return parser


def one_line(error: BaseException) -> str:
    """An error's message on one line; for one a DataLoader re-raised from a worker process, the worker's message
    (the last line of the worker's traceback) rather than the whole traceback."""
    text = str(error).strip()
    if "\nOriginal Traceback" in text:
        text = text.splitlines()[-1].partition(": ")[2]
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; bad input (``ValueError``: exit 2) and files that cannot be read or written
    (``OSError``: exit 1) are one line ``subquad <command>: error: ...`` on stderr, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        print(f"subquad {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

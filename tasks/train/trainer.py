"""``subquad train`` and ``subquad eval``: one training loop for classification and segmentation.

Runs as a plain process (CPU or one GPU) or under ``accelerate launch`` (several processes, DDP);
mixed precision and devices come from accelerate. Counts are in optimizer steps: one step is
``run.grad_accum_steps`` micro-batches of ``data.batch_size`` on every process. Every
``run.log_interval`` steps the mean loss, learning rate and images/s are logged (CSV, JSON, and the
curves as ``curves.png`` at every evaluation); every
``run.eval_interval`` steps the model (and its EMA) is evaluated; every ``run.checkpoint_interval``
steps a resumable checkpoint is written (see ``checkpoint.py``). ``resume=True`` restores model,
optimizer, scheduler, EMA, loss scaler, data position and random states, so the run continues as
if it had never stopped. A run holds ``run.output_dir`` while it runs (``run_lock.py``): a second run
into the same folder is refused. At the end the final metrics, the training throughput and the peak memory
are printed.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import math
import os
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from .checkpoint import (begin_checkpoint, commit_checkpoint, decode_tree, encode_tree, find_latest, read_rng,
                         read_state, read_tensors, set_rng_state, writing, write_rng, STATE)
from .config import TrainConfig
from .data.sampling import train_loader
from .launch_check import checked
from .metrics_log import MetricsLog
from .run_lock import acquire_run_lock, release_run_lock


class Task(Protocol):
    """What the loop needs from a task (``ClassificationTask``, ``SegmentationTask``)."""
    model: nn.Module
    train_set: Dataset
    collate_fn: Callable | None
    num_classes: int
    sync_batchnorm: bool

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict: ...


def build_task(cfg: TrainConfig) -> Task:
    """The task of a recipe; each is imported when used, so a classification run never loads diffusers."""
    if cfg.task == "cls":
        from .classification import ClassificationTask
        return ClassificationTask(cfg)
    if cfg.task == "dit":
        from .diffusion import DiffusionTask
        return DiffusionTask(cfg)
    from .segmentation import SegmentationTask
    return SegmentationTask(cfg)


def model_identity(cfg: TrainConfig) -> dict:
    """The model section without what leaves its tensors alone (fine-tuning source, dropout, the auxiliary
    loss weight beyond whether there is an auxiliary head), as JSON reads it back."""
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("checkpoint", "dropout")}
    if "aux_weight" in model:
        model["aux_weight"] = model["aux_weight"] > 0
    return json.loads(json.dumps(model))


def check_checkpoint_model(state: dict, cfg: TrainConfig, folder: Path, num_classes: int | None = None) -> None:
    """A clear error if the checkpoint at ``folder`` holds another model than ``cfg`` builds."""
    saved, mine = {"task": state["task"], **state["model"]}, {"task": cfg.task, **model_identity(cfg)}
    if saved != mine:
        diff = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {mine.get(k)!r} in the config"
                         for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k))
        raise ValueError(f"checkpoint {folder} was saved for another model ({diff})")
    if num_classes is not None and state["num_classes"] != num_classes:
        raise ValueError(f"checkpoint {folder} has {state['num_classes']} classes, the data set has {num_classes}")


def make_accelerator(mixed_precision: str) -> Accelerator:
    """accelerate's choice of device, except that a multi-process launch on a machine without CUDA
    (torchrun, ``accelerate launch --multi_gpu``) runs on CPU processes over gloo; accelerate would
    otherwise start independent single-process runs."""
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return checked(Accelerator(mixed_precision=mixed_precision, cpu=multi_process and not torch.cuda.is_available()),
                   mixed_precision)         # a launch that started other processes than it was asked for is refused


def _load_module(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, folder: Path) -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {folder} does not fit the model: {e}") from e


def freeze_parameters(model: nn.Module, freeze: list[str], trainable: list[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """Stop the gradient of the parameters whose names match a ``freeze`` pattern (fnmatch) and no ``trainable``
    one; the frozen (name, parameter) pairs. A pattern that matches no parameter is a ValueError (a typo would
    otherwise train what was meant to be frozen)."""
    names = [name for name, _ in model.named_parameters()]
    for key, patterns in (("freeze", freeze), ("trainable", trainable)):
        unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
        if unmatched:
            raise ValueError(f"optim.{key} pattern(s) {unmatched} match no parameter; the parameters are named like "
                             f"{', '.join(names[:3])} ... {names[-1]}")
    frozen = [(name, p) for name, p in model.named_parameters()
              if any(fnmatch.fnmatchcase(name, f) for f in freeze) and not any(fnmatch.fnmatchcase(name, t) for t in trainable)]
    if len(frozen) == len(names):
        raise ValueError(f"optim.freeze {freeze} freezes every parameter: name the ones to train in optim.trainable")
    for _, p in frozen:
        p.requires_grad_(False)
    return frozen


def _format(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))


def _per_class_table(metrics: dict) -> str:
    rows = [f"{'class':<24}{'IoU':>8}{'Acc':>8}"]
    rows += [f"{name:<24}{s['IoU']:>8.2f}{s['Acc']:>8.2f}" for name, s in metrics["per_class"].items()]
    return "\n".join(rows)


class Stopwatch:
    """Seconds and images of training only: paused (after a device sync) for logging, evaluation and checkpoints."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.images, self.started = device, 0.0, 0, None
        self.reported = (0.0, 0)

    def resume(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def pause(self) -> None:
        if self.started is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - self.started
            self.started = None

    def interval_rate(self) -> float | None:
        """Images/s since the previous call (None if nothing was timed)."""
        seconds, images = self.seconds - self.reported[0], self.images - self.reported[1]
        self.reported = (self.seconds, self.images)
        return images / seconds if seconds > 0 else None


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool) -> None:
        self.cfg, run = cfg, cfg.run
        self.out = Path(run.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        latest = find_latest(self.ckpt_root)
        if latest is not None and not resume:
            raise ValueError(f"{self.out} already holds a run (checkpoint at step {read_state(latest)['step']}): "
                             f"pass --resume to continue it, or set run.output_dir to a new folder")
        self.resume_from = latest if resume else None
        if self.resume_from is not None:
            check_checkpoint_model(read_state(self.resume_from), cfg, self.resume_from)
        elif resume:
            print(f"--resume: no checkpoint in {self.ckpt_root} yet, starting from step 0")
        self.accelerator, self.bar = make_accelerator(run.mixed_precision), None
        self.lock = self._hold_output()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _hold_output(self) -> Path | None:
        """The main process locks ``run.output_dir`` (see ``run_lock.py``); if it cannot, every process
        raises its error (no process is left waiting for the others)."""
        acc, lock, error = self.accelerator, None, None
        if acc.is_main_process:
            try:
                lock = acquire_run_lock(self.out)
            except (ValueError, OSError) as e:
                error = e
        if acc.num_processes > 1:
            error = broadcast_object_list([error])[0]
        if error is not None:
            raise error
        return lock

    def close(self) -> None:
        """End the progress bar and release ``run.output_dir`` (``train`` calls it at the end, also on an error)."""
        if self.bar is not None:
            self.bar.close()
        if self.lock is not None:
            release_run_lock(self.lock)
            self.lock = None

    def _build(self) -> None:
        """Task, data, model, optimizer and schedule; the checkpoint's state when resuming."""
        cfg, run, acc = self.cfg, self.cfg.run, self.accelerator
        set_seed(run.seed + acc.process_index)
        with acc.main_process_first():
            self.task = build_task(cfg)
        self.loader = train_loader(self.task.train_set, cfg.data.batch_size, cfg.data.workers, run.seed,
                                   acc.process_index, acc.num_processes, self.task.collate_fn)
        self.steps_per_epoch = self.loader.sampler.batches // run.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch has {self.loader.sampler.batches} batches, fewer than "
                             f"run.grad_accum_steps = {run.grad_accum_steps}")
        s = cfg.schedule
        self.total = s.steps if s.steps is not None else math.ceil(s.epochs * self.steps_per_epoch)
        warmup = s.warmup_steps if s.steps is not None else round(s.warmup_epochs * self.steps_per_epoch)

        model = self.task.model
        if self.task.sync_batchnorm and acc.num_processes > 1 and acc.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(acc.device)
        self.ema = ModelEmaV3(model, decay=run.ema_decay) if run.ema_decay else None   # before prepare wraps forward
        o = cfg.optim
        if o.freeze:
            frozen = freeze_parameters(model, o.freeze, o.trainable)
            if acc.is_main_process:
                total = sum(p.numel() for p in model.parameters())
                print(f"frozen: {sum(p.numel() for _, p in frozen):,} of {total:,} parameters ({len(frozen)} tensors "
                      f"matching optim.freeze {o.freeze}" + (f", not optim.trainable {o.trainable})" if o.trainable else ")"))
        extra = {k: v for k, v in (("betas", tuple(o.betas) if o.betas else None), ("eps", o.eps)) if v is not None}
        params: nn.Module | list = model
        if o.no_decay:          # mmseg's paramwise decay_mult=0, added to the model's own no_weight_decay()
            own = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
            params = param_groups_weight_decay(model, o.weight_decay, no_weight_decay_list=set(own) | set(o.no_decay))
        optimizer = create_optimizer_v2(params, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                        layer_decay=o.layer_decay, **extra)
        self.scheduler, _ = create_scheduler_v2(
            optimizer, sched=s.sched, num_epochs=self.total, warmup_epochs=warmup, warmup_lr=s.warmup_lr,
            min_lr=s.min_lr, step_on_epochs=False, updates_per_epoch=1,
            **({"decay_rate": s.power} if s.sched == "poly" else {}))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.step, self.epoch, self.batch = 0, 0, 0
        self.interval_losses: list[torch.Tensor] = []      # this session's losses since the last log row
        self.carried_loss = (0.0, 0)        # (sum, steps) of the mean losses before the checkpoint resumed from
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.log = MetricsLog(self.out) if acc.is_main_process else None
        if self.log:
            self.log.truncate(self.step)
            with writing(self.out / "config.yaml"):
                (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            name = cfg.model.name if cfg.task != "seg" else f"{cfg.model.head} on {cfg.model.backbone}"
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"{cfg.task}: {name} ({params:.2f}M parameters), {len(self.task.train_set)} training images, "
                  f"{self.task.num_classes} classes; {self.total} steps ({self.steps_per_epoch} per epoch) of "
                  f"{cfg.data.batch_size} x {run.grad_accum_steps} x {acc.num_processes} images on {acc.device}")

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _save(self) -> None:
        acc = self.accelerator
        pending = self._pending_losses()           # every process takes part in the reduction
        tmp = begin_checkpoint(self.ckpt_root, self.step) if acc.is_main_process else \
            self.ckpt_root / f"step_{self.step:08d}.tmp"
        acc.wait_for_everyone()
        write_rng(tmp, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            tensors = {f"model.{k}": v.detach().to("cpu", copy=True).contiguous()
                       for k, v in acc.unwrap_model(self.model).state_dict().items()}
            if self.ema is not None:
                tensors.update({f"ema.{k}": v.detach().to("cpu", copy=True).contiguous()
                                for k, v in self.ema.module.state_dict().items()})
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            state = {
                "step": self.step, "epoch": self.epoch, "batch": self.batch, "total_steps": self.total,
                "num_processes": acc.num_processes, "task": self.cfg.task, "model": model_identity(self.cfg),
                "num_classes": self.task.num_classes,
                "optimizer": encode_tree(self.optimizer.state_dict(), "optimizer", tensors),
                "scheduler": encode_tree(self.scheduler.state_dict(), "scheduler", tensors),
                "scaler": encode_tree(scaler, "scaler", tensors),
                "log_pending": pending,
                "config": self.cfg.to_dict(),
            }
            commit_checkpoint(tmp, tensors, state, self.cfg.run.keep_checkpoints)
        acc.wait_for_everyone()

    def _load(self, folder: Path) -> None:
        acc = self.accelerator
        state, tensors = read_state(folder), read_tensors(folder)
        check_checkpoint_model(state, self.cfg, folder, self.task.num_classes)
        _load_module(acc.unwrap_model(self.model), tensors, "model.", folder)
        if self.ema is not None:
            if not any(k.startswith("ema.") for k in tensors):
                raise ValueError(f"checkpoint {folder} has no EMA weights but run.ema_decay is set")
            _load_module(self.ema.module, tensors, "ema.", folder)
        self.optimizer.load_state_dict(decode_tree(state["optimizer"], tensors))
        self.scheduler.load_state_dict(decode_tree(state["scheduler"], tensors))
        scaler = decode_tree(state["scaler"], tensors)
        if acc.scaler is not None and scaler is not None:
            acc.scaler.load_state_dict(scaler)
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        pending = state.get("log_pending") or {"loss_sum": 0.0, "steps": 0}
        self.carried_loss = (float(pending["loss_sum"]), int(pending["steps"]))
        self.scheduler.step_update(self.step)
        rng = read_rng(folder, acc.process_index)
        if rng is None or state["num_processes"] != acc.num_processes:
            print(f"resuming on {acc.num_processes} process(es) from a checkpoint of {state['num_processes']}: "
                  f"random states re-seeded and the epoch re-sharded (not bit-exact)")
            set_seed(self.cfg.run.seed + 1000 * self.step + acc.process_index)
        else:
            set_rng_state(rng)
        if acc.is_main_process:
            print(f"resumed from {folder} at step {self.step}")

    # -- the loop ----------------------------------------------------------------------------------------------
    def _pending_losses(self) -> dict:
        """The steps since the last log row, as the sum of their losses (each the mean over processes) and
        their count: saved with a checkpoint, so that a resumed run's first row averages the same steps as
        an uninterrupted run's."""
        acc = self.accelerator
        local = torch.stack(self.interval_losses).sum() if self.interval_losses else torch.zeros((), device=acc.device)
        total = acc.reduce(local.float(), "sum").item() / acc.num_processes
        return {"loss_sum": total + self.carried_loss[0], "steps": len(self.interval_losses) + self.carried_loss[1]}

    def _micro_batches(self) -> Iterator[tuple[int, int, list]]:
        """(epoch, batch within the epoch, micro-batches of one step), from the resumed position on."""
        accum, epoch, batch = self.cfg.run.grad_accum_steps, self.epoch, self.batch
        while True:
            self.loader.sampler.set_position(epoch, batch * accum)
            batches = iter(self.loader)
            for batch in range(batch, self.steps_per_epoch):
                yield epoch, batch, [next(batches) for _ in range(accum)]
            epoch, batch = epoch + 1, 0

    def _train_step(self, micro: list) -> torch.Tensor:
        acc, accum = self.accelerator, len(micro)
        self.model.train()
        losses = []
        for i, batch in enumerate(micro):
            batch = [t.to(acc.device, non_blocking=True) for t in batch]
            with acc.no_sync(self.model) if i < accum - 1 else nullcontext():
                loss = self.task.loss(self.model, batch)
                acc.backward(loss / accum)
            losses.append(loss.detach())
        if self.cfg.optim.clip_grad:
            acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(acc.unwrap_model(self.model), step=self.step + 1)
        return torch.stack(losses).mean()

    def evaluate(self) -> dict:
        acc = self.accelerator
        metrics = self.task.evaluate(acc.unwrap_model(self.model), acc)
        if self.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in self.task.evaluate(self.ema.module, acc).items()})
        return metrics

    def fit(self) -> dict:
        acc, run = self.accelerator, self.cfg.run
        images_per_step = self.cfg.data.batch_size * run.grad_accum_steps * acc.num_processes
        self.bar = bar = tqdm(total=self.total, initial=self.step, desc=f"train {self.cfg.task}", unit="step",
                              disable=not acc.is_main_process, dynamic_ncols=True)
        watch = Stopwatch(acc.device)
        first_step, metrics = self.step, {}
        batches = self._micro_batches()
        while self.step < self.total:
            self.epoch, self.batch, micro = next(batches)
            self.interval_losses.append(self._train_step(micro))
            self.step, self.batch = self.step + 1, self.batch + 1
            self.scheduler.step_update(self.step)
            if self.step == first_step + 1:
                watch.resume()                  # a session's first step warms up (allocator, autotuning): not timed
            else:
                watch.images += images_per_step
            bar.update(1)
            last = self.step == self.total
            if self.step % run.log_interval == 0 or last:
                watch.pause()
                pending = self._pending_losses()
                loss = pending["loss_sum"] / pending["steps"]
                row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "loss": loss,
                       "lr": max(g["lr"] for g in self.optimizer.param_groups), "images_per_s": watch.interval_rate()}
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}")
                if self.log:
                    self.log.log("train", row)
                self.interval_losses, self.carried_loss = [], (0.0, 0)
            if self.step % run.eval_interval == 0 or last:
                watch.pause()
                metrics = self.evaluate()
                if self.log:
                    self.log.log("eval", {"step": self.step, **metrics})
                    if not last:                # the summary draws the final curves
                        self.log.plot()
                    bar.write(f"step {self.step}: {_format(metrics)}")
            if self.step % run.checkpoint_interval == 0 or last:
                watch.pause()
                self._save()
            watch.resume()
        bar.close()
        watch.pause()
        return self._summary(metrics or self.evaluate(), watch.images, watch.seconds)

    def _summary(self, metrics: dict, images: int, seconds: float) -> dict:
        acc = self.accelerator
        if acc.device.type == "cuda":
            peak, how = torch.cuda.max_memory_allocated(acc.device) / 2 ** 30, "CUDA allocator peak, per process"
        else:
            peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "max RSS of the main process"
        summary = {**metrics, "steps": self.step, "images_per_s": images / seconds if seconds else None,
                   "peak_memory_gib": peak}
        if acc.is_main_process:
            if "per_class" in metrics:
                print(_per_class_table(metrics))
            print(f"final (step {self.step}/{self.total}): {_format(metrics)}")
            rate = f"{summary['images_per_s']:.1f}" if images else "n/a"
            mixed = self.cfg.run.mixed_precision
            precision = "float32" if mixed == "no" else f"{mixed} mixed precision"
            print(f"throughput: {rate} images/s over {images} training images on "
                  f"{acc.num_processes} process(es) ({acc.device.type}, {precision}; "
                  f"evaluation, checkpoints and each session's first step excluded)")
            print(f"peak memory: {peak:.2f} GiB ({how})")
            curves = self.log.plot() if self.log else None
            if curves is not None:
                score = {"cls": "top-1 accuracy", "seg": "mIoU"}.get(self.cfg.task, "validation loss")
                print(f"curves: {curves} (loss, {score}, learning rate; the numbers beside it in "
                      f"train_metrics.csv and eval_metrics.csv)")
        return summary


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train a recipe to its last step (resuming from ``run.output_dir`` if asked); the final metrics."""
    trainer = Trainer(cfg, resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def evaluate(cfg: TrainConfig, checkpoint: str | None = None) -> dict[str, Any]:
    """Evaluate the latest checkpoint of a run (``checkpoint``: a run or checkpoint folder, default
    ``run.output_dir``), its EMA weights too when it has them."""
    where = Path(checkpoint or cfg.run.output_dir)
    folder = where if (where / STATE).is_file() else find_latest(where)
    if folder is None:
        raise ValueError(f"no subquad checkpoint in {where}")
    state = read_state(folder)
    check_checkpoint_model(state, cfg, folder)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=None))
    accelerator = make_accelerator(cfg.run.mixed_precision)
    task = build_task(cfg)
    check_checkpoint_model(state, cfg, folder, task.num_classes)
    tensors = read_tensors(folder)
    model = task.model.to(accelerator.device)
    _load_module(model, tensors, "model.", folder)
    metrics = task.evaluate(model, accelerator)
    if any(k.startswith("ema.") for k in tensors):
        ema = copy.deepcopy(model)
        _load_module(ema, tensors, "ema.", folder)
        metrics.update({f"ema_{k}": v for k, v in task.evaluate(ema, accelerator).items()})
    if accelerator.is_main_process:
        if "per_class" in metrics:
            print(_per_class_table(metrics))
        print(f"{folder} (step {state['step']}): {_format(metrics)}")
    return metrics

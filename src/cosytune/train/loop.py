"""The training loop, written out in full (no trainer framework).

One loop serves the LLM and the flow: the model is wrapped by a *step function* that maps a
collated batch to ``{"loss": tensor, "acc": tensor?}``. Per optimiser step it does gradient
accumulation (DDP ``no_sync`` on all but the last micro-batch, so gradients are all-reduced once),
autocast (bf16, or fp16 with a grad scaler), clipping (a non-finite norm skips the update),
the scheduler step, a log line with it/s, ETA and memory, TensorBoard scalars, optional CV +
checkpoint every N steps, and at each epoch end CV, checkpoint, keep-best pruning and early
stopping.

Exact resume: checkpoints hold the optimiser, scheduler, scaler and all RNG states and the
position in the epoch; an epoch's batch order depends only on (seed, epoch), so ``resume="auto"``
continues mid-epoch and ends where an uninterrupted run ends — with any number of ranks, as long as it
is the number the run was started with. Resumed on another number of ranks, the weights, optimiser,
scheduler (so the learning rate), step and epoch are kept; mid-epoch, the rest of the epoch is dealt
anew: an epoch's global batch order is the same for any rank count and the first ``batch_in_epoch ×
old world size`` batches of it count as done (rounded down to whole optimiser steps of the new layout,
so none is skipped); rank r takes the RNG state of old rank ``r mod old world size``. The log says so,
and the result is then not bit-identical to an uninterrupted run on either number of ranks.

The time each step waits for the data loader is measured: the log line shows its share of the step
time, and each epoch's history entry records it (``data_wait``) with the utterances trained on
(``utts``, all ranks) and the seconds of the training pass (``train_seconds``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cosytune.fileio import exclusive_lock
from cosytune.ranks import Ranks
from cosytune.train.checkpoint import (
    CheckpointRef,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_stale_temps,
    rng_state,
    run_disk_bytes,
    save_checkpoint,
    set_rng_state,
)
from cosytune.train.config import TrainConfig, scaled_lr
from cosytune.train.distributed import all_reduce_mean, wrap_ddp

logger = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, dict], dict]


class BatchSource:
    """What the loop needs from a dataset: per-epoch batch index lists and a collate function."""

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> list[list[int]]:  # pragma: no cover
        raise NotImplementedError

    def collate(self, indices: list[int]) -> dict:  # pragma: no cover
        raise NotImplementedError

    def num_utts(self, indices: list[int]) -> int:
        return len(indices)


class _BatchDataset(torch.utils.data.Dataset):
    def __init__(self, source: BatchSource, batches: list[list[int]]) -> None:
        self.source, self.batches = source, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.source.collate(self.batches[i])


class _TimedIter:
    """Iterates ``it`` and adds the seconds spent waiting for each item to ``wait_s``."""

    def __init__(self, it) -> None:
        self.it, self.wait_s = iter(it), 0.0

    def __iter__(self) -> _TimedIter:
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.wait_s += time.perf_counter() - t


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    best_cv_loss: float = math.inf
    best_name: str = ""
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    state: TrainState
    checkpoints: list[CheckpointRef]
    seconds: float
    disk_bytes: int = 0
    """What the run dir holds on disk at the end (checkpoints, one resume state, logs)."""


def resolve_amp(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use grad scaler) for the config and device."""
    amp = cfg.amp
    if amp == "auto":
        if device.type != "cuda":
            return None, False
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "none":
        return None, False
    if amp == "bf16":
        return torch.bfloat16, False
    return torch.float16, device.type == "cuda"


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device,
                    lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = cfg.optim.fused if cfg.optim.fused is not None else device.type == "cuda"
    kw: dict[str, Any] = {"lr": cfg.optim.lr if lr is None else lr, "betas": tuple(cfg.optim.betas), "eps": cfg.optim.eps,
                          "weight_decay": cfg.optim.weight_decay}
    if fused:
        kw["fused"] = True
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optim.name]
    return cls(params, **kw)


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    name, warm = cfg.scheduler.name, cfg.scheduler.warmup_steps
    if name in ("constant", "constantlr") or warm == 0:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    if name == "warmuplr":
        # upstream's WarmupLR: base * warmup^0.5 * min(step^-0.5, step * warmup^-1.5), step = n + 1.
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warm**0.5 * min((s + 1) ** -0.5, (s + 1) * warm**-1.5)
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))


def _mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    except (ImportError, OSError, AttributeError):  # pragma: no cover - platform without resource
        return float("nan")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _loader(source: BatchSource, batches: list[list[int]], cfg: TrainConfig, seed: int) -> torch.utils.data.DataLoader:
    nw = cfg.data.num_workers
    # A private generator: creating a DataLoader iterator draws a seed, and drawing it from the
    # global RNG would make a resumed run diverge from an uninterrupted one.
    return torch.utils.data.DataLoader(
        _BatchDataset(source, batches),
        batch_size=None,
        shuffle=False,
        num_workers=nw,
        prefetch_factor=cfg.data.prefetch if nw > 0 else None,
        pin_memory=cfg.data.pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )


def _remap_position(state: TrainState, old_world: int, dist: Ranks, accum_grad: int, name: str) -> None:
    """Move a resumed position made on ``old_world`` ranks onto this layout (see the module docstring)."""
    done = state.batch_in_epoch * old_world  # batches of the epoch's global order already trained on
    state.batch_in_epoch = done // dist.world_size // accum_grad * accum_grad
    if dist.is_main:
        logger.warning(
            "%s was saved by a run on %d process(es) and is resumed on %d: the weights, optimiser, learning rate, "
            "step %d and epoch %d are kept; the epoch goes on from batch %d of its %d-rank order (%d of its batches "
            "counted done); the result will not be bit-identical to an uninterrupted run", name, old_world,
            dist.world_size, state.step, state.epoch, state.batch_in_epoch, dist.world_size, done)


@torch.inference_mode()
def evaluate(model: nn.Module, step_fn: StepFn, cv: BatchSource, cfg: TrainConfig, device: torch.device,
             dist: Ranks) -> dict[str, float]:
    """CV loss/acc averaged over utterances; every rank reads the whole CV set (as upstream)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    n_utts = 0
    for indices, batch in zip(cv.epoch_batches(0, 0, 1), _loader(cv, cv.epoch_batches(0, 0, 1), cfg, cfg.seed)):
        out = step_fn(model, _to_device(batch, device))
        n = cv.num_utts(indices)
        n_utts += n
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                totals[k] = totals.get(k, 0.0) + float(v) * n
    model.train(was_training)
    if n_utts == 0:
        return {}
    return {k: v / n_utts for k, v in totals.items()}


def train(
    cfg: TrainConfig,
    model: nn.Module,
    step_fn: StepFn,
    train_set: BatchSource,
    cv_set: BatchSource | None,
    run_dir: Path,
    device: torch.device,
    dist: Ranks | None = None,
    resume: str | Path | None = "auto",
    progress: bool = True,
    extra_info: dict | None = None,
    tensorboard_dir: Path | None = None,
    lock: bool = True,
) -> TrainResult:
    """Train ``model`` according to ``cfg``; checkpoints go to ``run_dir`` (rank 0 writes).

    Rank 0 holds an exclusive lock on ``run_dir`` for the whole run (``lock=False``: the caller holds it
    already), so a second training into the same dir fails at once (:class:`~cosytune.errors.BusyError`,
    naming the holder) instead of both overwriting each other's checkpoints.

    Args:
        dist: this process's place in the job (default: a single process).
        resume: ``"auto"`` continues from the newest complete checkpoint in ``run_dir`` if any;
            a path resumes from that checkpoint; ``None`` starts fresh.
    """
    dist = dist if dist is not None else Ranks()
    with contextlib.ExitStack() as held:
        if dist.is_main and lock:
            held.enter_context(exclusive_lock(run_dir, "training run dir"))
        t_start = time.time()
        run_dir = Path(run_dir)
        model.to(device)
        model.train()
        raw_model = model
        opt = build_optimizer(cfg, raw_model, device, scaled_lr(cfg, dist.world_size))
        sched = build_scheduler(cfg, opt)
        amp_dtype, use_scaler = resolve_amp(cfg, device)
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        state = TrainState()
        torch.manual_seed(cfg.seed)
        import random as _random

        _random.seed(cfg.seed)

        if dist.is_main and Path(run_dir).is_dir():
            remove_stale_temps(run_dir)
        ref: CheckpointRef | None = None
        if resume == "auto":
            ref = latest_checkpoint(run_dir)
        elif resume:
            p = Path(resume)
            refs = [c for c in list_checkpoints(p.parent, with_state=True) if c.path == p or c.name == p.stem]
            if not refs:
                from cosytune.errors import CheckpointError

                raise CheckpointError(
                    f"cannot resume from {p}: expected a checkpoint .pt with its .yaml and resume state (.state.pt); "
                    "only the newest checkpoint of a run keeps a resume state. Use --resume auto, or start a new run "
                    f"from these weights with --checkpoint {p}")
            ref = refs[0]
        if ref is not None:
            from cosytune.train.checkpoint import load_resume_state, read_checkpoint_weights

            raw_model.load_state_dict(read_checkpoint_weights(ref.path), strict=True)
            st = load_resume_state(ref.state_path)
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            if st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            state = TrainState(**st["train_state"])
            rngs = st["rng"] if isinstance(st["rng"], list) else [st["rng"]]
            set_rng_state(rngs[dist.rank % len(rngs)])
            if len(rngs) != dist.world_size:
                _remap_position(state, len(rngs), dist, cfg.accum_grad, ref.name)
            logger.info("resumed from %s (epoch %d, step %d, batch %d of the epoch)", ref.name, state.epoch,
                        state.step, state.batch_in_epoch)
        elif dist.is_main and cfg.optim.lr_scaling != "none":
            logger.info("learning rate %.3g: optim.lr %.3g scaled (%s) to a global batch of %d ranks x %d x %d frames",
                        opt.param_groups[0]["lr"], cfg.optim.lr, cfg.optim.lr_scaling, dist.world_size,
                        cfg.accum_grad, cfg.data.max_frames_in_batch)

        if dist.distributed:
            model = wrap_ddp(raw_model, cfg.ddp, cfg.model, device, accum_grad=cfg.accum_grad, compiled=cfg.compile)

        if cfg.compile:
            model = torch.compile(model)

        writer = None
        if dist.is_main and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(tensorboard_dir or run_dir / "tensorboard"))
            except ImportError:  # pragma: no cover
                logger.warning("tensorboard is not installed; no TensorBoard scalars will be written")

        def autocast():
            if amp_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type=device.type, dtype=amp_dtype)

        def checkpoint(name: str, epoch: int, cv_metrics: dict[str, float], grad_norm: float) -> CheckpointRef | None:
            rngs = [rng_state()]
            if dist.distributed:
                gathered: list[Any] = [None] * dist.world_size
                torch.distributed.all_gather_object(gathered, rngs[0])
                rngs = gathered
            ref_out = None
            if dist.is_main:
                info = {
                    "epoch": epoch, "step": state.step, "batch_idx": state.batch_in_epoch, "tag": "CV",
                    "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm, "loss_dict": cv_metrics,
                    "model": cfg.model, "world_size": dist.world_size, **(extra_info or {}),
                }
                train_state = {
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if use_scaler else None,
                    "train_state": state.__dict__.copy(), "rng": rngs if dist.distributed else rngs[0],
                }
                ref_out = save_checkpoint(run_dir, name, raw_model.state_dict(), info, train_state)
                logger.info("saved %s (cv %s)", ref_out.path.name,
                            ", ".join(f"{k}={v:.4f}" for k, v in cv_metrics.items()) or "n/a")
            dist.barrier()
            return ref_out

        def run_cv() -> dict[str, float]:
            if cv_set is None:
                return {}
            return evaluate(raw_model, step_fn, cv_set, cfg, device, dist)

        grad_norm = float("nan")
        total_steps_est = None
        done = False
        while state.epoch < cfg.max_epoch and not done and not state.stopped_early:
            batches = train_set.epoch_batches(state.epoch, dist.rank, dist.world_size)
            if not batches:
                from cosytune.errors import DataError

                raise DataError("the training set produced no batches (all utterances filtered?); see the data summary")
            if total_steps_est is None:
                total_steps_est = cfg.max_epoch * math.ceil(len(batches) / cfg.accum_grad)
            skip = state.batch_in_epoch
            todo = batches[skip:]
            t_epoch = time.time()
            t_log, steps_at_log = time.time(), state.step
            metrics_acc: dict[str, float] = {}
            n_acc = n_utts = 0
            opt.zero_grad(set_to_none=True)
            loader = _TimedIter(_loader(train_set, todo, cfg, cfg.seed * 1000 + state.epoch))
            wait_at_log = 0.0
            for i, batch in enumerate(loader, start=skip):
                boundary = (i + 1) % cfg.accum_grad == 0 or i + 1 == len(batches)
                sync_ctx = model.no_sync() if (dist.distributed and not boundary) else contextlib.nullcontext()
                batch = _to_device(batch, device)
                with sync_ctx:
                    with autocast():
                        out = step_fn(model, batch)
                    loss = out["loss"] / cfg.accum_grad
                    scaler.scale(loss).backward() if use_scaler else loss.backward()
                for k, v in out.items():
                    if isinstance(v, torch.Tensor) and v.numel() == 1:
                        metrics_acc[k] = metrics_acc.get(k, 0.0) + float(v.detach())
                n_acc += 1
                n_utts += train_set.num_utts(batches[i])
                state.batch_in_epoch = i + 1
                if not boundary:
                    continue
                if use_scaler:
                    scaler.unscale_(opt)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip))
                if math.isfinite(grad_norm):
                    scaler.step(opt) if use_scaler else opt.step()
                else:
                    logger.warning("step %d: gradient norm is %s; update skipped", state.step, grad_norm)
                if use_scaler:
                    scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                state.step += 1
                if dist.is_main and writer is not None:
                    writer.add_scalar("TRAIN/lr", opt.param_groups[0]["lr"], state.step)
                    writer.add_scalar("TRAIN/grad_norm", grad_norm, state.step)
                    for k, v in metrics_acc.items():
                        writer.add_scalar(f"TRAIN/{k}", v / max(n_acc, 1), state.step)
                if state.step % cfg.log_interval == 0 and dist.is_main:
                    el = time.time() - t_log
                    its = (state.step - steps_at_log) / el if el > 0 else float("nan")
                    left = (total_steps_est - state.step) / its if math.isfinite(its) and its > 0 else float("nan")
                    eta = time.strftime("%H:%M:%S", time.gmtime(left)) if math.isfinite(left) else "?"
                    logger.info(
                        "epoch %d step %d | %s | lr %.2e | grad %.2f | %.2f it/s | data %.0f%% | ETA %s | mem %.1f GB",
                        state.epoch, state.step,
                        " | ".join(f"{k} {v / max(n_acc, 1):.4f}" for k, v in metrics_acc.items()),
                        opt.param_groups[0]["lr"], grad_norm, its, 100 * (loader.wait_s - wait_at_log) / el if el > 0
                        else 0.0, eta, _mem_gb(device),
                    )
                    t_log, steps_at_log, wait_at_log = time.time(), state.step, loader.wait_s
                metrics_acc, n_acc = {}, 0
                if cfg.save_per_step > 0 and state.step % cfg.save_per_step == 0 and state.batch_in_epoch < len(batches):
                    cvm = run_cv()
                    checkpoint(f"epoch_{state.epoch}_step_{state.step}", state.epoch, cvm, grad_norm)
                if cfg.max_steps and state.step >= cfg.max_steps:
                    done = True
                    break
            # End of the epoch (or of max_steps): CV, checkpoint, early stopping.
            train_s = time.time() - t_epoch
            pace = all_reduce_mean({"utts": float(n_utts), "data_wait": loader.wait_s / train_s if train_s > 0 else 0.0},
                                   dist, device)
            cvm = run_cv()
            cvm = all_reduce_mean(cvm, dist, device) if cvm else cvm
            finished_epoch = state.epoch
            state.history.append({"epoch": finished_epoch, "step": state.step, **cvm,
                                  "seconds": round(time.time() - t_epoch, 2), "train_seconds": round(train_s, 3),
                                  "utts": round(pace["utts"] * dist.world_size),
                                  "data_wait": round(pace["data_wait"], 4)})
            improved = False
            if "loss" in cvm:
                improved = cvm["loss"] < state.best_cv_loss - cfg.early_stop_min_delta
                if improved:
                    state.best_cv_loss = cvm["loss"]
                    state.best_name = f"epoch_{finished_epoch}_whole"
                    state.epochs_without_improvement = 0
                else:
                    state.epochs_without_improvement += 1
            if dist.is_main and writer is not None:
                for k, v in cvm.items():
                    writer.add_scalar(f"CV/{k}", v, state.step)
                writer.flush()
            if cfg.early_stop_patience and state.epochs_without_improvement >= cfg.early_stop_patience:
                state.stopped_early = True
                logger.info("early stop: CV loss has not improved for %d epochs (best %.4f at %s)",
                            state.epochs_without_improvement, state.best_cv_loss, state.best_name)
            if dist.is_main:
                logger.info("epoch %d done in %.1fs (%.1f utts/s over %d rank(s), data loader %.0f%% of step time): %s",
                            finished_epoch, time.time() - t_epoch, state.history[-1]["utts"] / train_s if train_s > 0
                            else 0.0, dist.world_size, 100 * pace["data_wait"],
                            ", ".join(f"cv_{k}={v:.4f}" for k, v in cvm.items()) or "no CV set")
            if state.batch_in_epoch >= len(batches):
                state.epoch += 1
                state.batch_in_epoch = 0
            name = f"epoch_{finished_epoch}_whole" if state.batch_in_epoch == 0 else f"epoch_{finished_epoch}_step_{state.step}"
            checkpoint(name, finished_epoch, cvm, grad_norm)
            if dist.is_main:
                prune_checkpoints(run_dir, cfg.keep_best, protect={name, state.best_name})
        if writer is not None:
            writer.close()
        return TrainResult(run_dir, state, list_checkpoints(run_dir), time.time() - t_start, run_disk_bytes(run_dir))

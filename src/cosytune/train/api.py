"""Speaker SFT as one library call: :func:`run_training` (what ``cosytune train`` and ``cosytune run`` call).

Settings come from the shipped preset (train_llm.yaml / train_flow.yaml), then ``config`` (our YAML or an
upstream recipe yaml, from which only train_conf is read), then the ``overrides`` (``key=value``), then the
typed fields of :class:`TrainRequest` that are set. The resolved config is saved as
:data:`CONFIG_NAME` in the run dir — a name upstream's ``average_model.py --val_best`` skips (it reads every
``*.yaml`` not starting with ``train``/``init`` as a checkpoint record). Only rank 0 writes.

``inputs_key`` ties a run dir to the inputs it was made with: it is recorded in :data:`INPUTS_KEY_NAME`, and a
run dir holding a run made with another key (or ``restart=True``) is cleared before training, so a run is
never resumed onto other data or settings.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosytune.console import print_summary
from cosytune.errors import CosytuneError, UsageError
from cosytune.fileio import LOCK_NAME, exclusive_lock, read_json_or, write_json
from cosytune.train.checkpoint import check_free_space, estimate_run_bytes
from cosytune.train.loop import TrainResult

logger = logging.getLogger(__name__)

CONFIG_NAME = "train_config.yaml"
"""The resolved training config in a run dir (upstream's averaging script skips ``train*`` yamls)."""

INPUTS_KEY_NAME = "train_inputs.json"
"""The inputs key a run dir's checkpoints were made with (see :func:`run_training`)."""


@dataclass(frozen=True)
class TrainRequest:
    """One training run. Paths are resolved by :func:`run_training`; None means "the default"."""

    model: str  # "llm" or "flow"
    train_data: Path
    run_dir: Path
    cv_data: Path | None = None
    config: Path | None = None
    overrides: tuple[str, ...] | Mapping[str, Any] = ()  # key=value strings, or a nested dict
    base_model_dir: Path | None = None
    qwen_pretrain_path: Path | None = None
    onnx_path: Path | None = None
    checkpoint: Path | None = None
    from_scratch: bool = False
    tensorboard_dir: Path | None = None
    max_epoch: int | None = None
    num_workers: int | None = None
    no_amp: bool = False
    device: str = "auto"
    onnx_device: str = "auto"
    dist_backend: str | None = None
    train_engine: str = "torch_ddp"
    resume: str | Path | None = "auto"  # "auto", a checkpoint path, or None (start fresh)
    inputs_key: str | None = None
    restart: bool = False  # clear the run dir's checkpoints first


@dataclass(frozen=True)
class TrainingOutcome:
    """What :func:`run_training` did; ``result`` is None on ranks other than 0."""

    model: str
    result: TrainResult | None
    cleared: str = ""  # why an earlier run in the run dir was cleared ("" when none was)


def _typed_overrides(req: TrainRequest) -> dict:
    """``req.overrides`` (``key=value`` strings or a nested dict) with the typed fields that are set on top."""
    from cosytune.config.loading import parse_overrides, set_dotted

    out = copy.deepcopy(dict(req.overrides)) if isinstance(req.overrides, Mapping) else parse_overrides(
        list(req.overrides))
    for key, value in (("max_epoch", req.max_epoch), ("data.num_workers", req.num_workers)):
        if value is not None:
            set_dotted(out, key, int(value))
    if req.no_amp:
        set_dotted(out, "amp", "none")
    return out


def _clear_reason(req: TrainRequest) -> str:
    """Why the run dir's earlier checkpoints must go ("" to keep and resume them)."""
    run_dir = req.run_dir
    if not run_dir.is_dir() or not any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        return ""  # nothing there but (maybe) the lock this process holds
    if req.restart:
        return "restart requested"
    if req.inputs_key is None:
        return ""
    recorded = read_json_or(run_dir / INPUTS_KEY_NAME, {}).get("key")
    if recorded == req.inputs_key:
        return ""
    return "made with other inputs or settings" if recorded else "made by an unknown earlier run"


def _clear_run_dir(run_dir: Path) -> None:
    """Remove everything a training run wrote into ``run_dir`` (the dir itself and its lock file stay)."""
    for p in run_dir.iterdir():
        if p.name == LOCK_NAME:  # held by this process: a new file would let a second run lock it too
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _warn_if_settings_differ(req: TrainRequest, cfg: object) -> None:
    """Resuming a run whose recorded config differs trains on from weights made with other settings: say so."""
    from cosytune.config.loading import config_to_dict, read_yaml
    from cosytune.train.checkpoint import latest_checkpoint

    old_path = req.run_dir / CONFIG_NAME
    if req.resume != "auto" or not old_path.is_file() or latest_checkpoint(req.run_dir) is None:
        return
    try:
        old = read_yaml(old_path)
    except (OSError, ValueError, CosytuneError):  # an unreadable old config only loses the warning
        return
    new = config_to_dict(cfg)
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
        logger.warning("%s: resuming a run made with other settings (%s differ); give a new --model_dir to "
                       "train from the base weights with these settings", req.run_dir, ", ".join(differ))


def _resume(req: TrainRequest) -> str | Path | None:
    """``req.resume`` with its spellings of "start fresh" ("none", "no", "false") as None."""
    return None if req.resume is None or str(req.resume).lower() in ("none", "no", "false") else req.resume


def _will_resume(req: TrainRequest) -> bool:
    """Training will continue a checkpoint of the run dir (after any clearing), not start from weights."""
    from cosytune.train.checkpoint import latest_checkpoint

    if _resume(req) is None:
        return False
    if str(req.resume) != "auto":
        return True
    return req.run_dir.is_dir() and not _clear_reason(req) and latest_checkpoint(req.run_dir) is not None


def run_training(req: TrainRequest, *, summary: bool = True) -> TrainingOutcome:
    """Train ``req.model`` (in this process, or as one rank under torchrun) and return what happened.

    Raises:
        UsageError: an unsupported engine; ConfigError / CheckpointError / DataError from the config,
            the base model's weights and the data, unchanged.
    """
    from cosytune.config.loading import dump_config
    from cosytune.ranks import Ranks, leave_process_group
    from cosytune.text.tokenizer import load_tokenizer
    from cosytune.train import build
    from cosytune.train.config import load_train_config
    from cosytune.train.data import SFTDataset
    from cosytune.train.distributed import init_distributed, pick_device
    from cosytune.train.loop import train

    if req.train_engine != "torch_ddp":
        raise UsageError("--train_engine deepspeed is not supported (upstream's DeepSpeed path silently "
                         "switches to AdamW lr 1e-3); use torch_ddp, the default")
    if req.model not in build.STEP_FUNCTIONS:
        raise UsageError(f"model: expected one of {sorted(build.STEP_FUNCTIONS)}, found {req.model!r}")
    cfg = load_train_config(req.model, req.config, _typed_overrides(req))

    dist = Ranks.from_env()
    device = pick_device(dist, req.device)
    init_distributed(dist, device, req.dist_backend)
    held = contextlib.ExitStack()
    cleared = ""
    try:
        if dist.is_main:  # rank 0 holds the run dir for the whole run, before anything in it is cleared
            held.enter_context(exclusive_lock(req.run_dir, "training run dir"))
        base = build.find_base_model_dir(req.base_model_dir, req.onnx_path, req.checkpoint, req.qwen_pretrain_path)
        tokenizer = load_tokenizer(req.qwen_pretrain_path or base / "CosyVoice-BlankEN")
        resuming = _will_resume(req)
        model = build.build_model(req.model, base, req.checkpoint, req.from_scratch, resuming=resuming)
        tok_x = emb_x = None
        if req.onnx_path is not None:
            tok_x, emb_x = build.online_extractors(req.onnx_path if req.onnx_path.is_dir() else base,
                                                   req.onnx_device)
        train_set = SFTDataset(req.train_data, tokenizer, req.model, cfg.data, cfg.seed, tok_x, emb_x)
        cv_set = (SFTDataset(req.cv_data, tokenizer, req.model, cfg.data, cfg.seed, tok_x, emb_x)
                  if req.cv_data else None)
        if cv_set is None:
            logger.warning("no --cv_data: no CV loss, so no early stopping and --val_best averaging cannot rank")
        if dist.is_main:
            cleared = _clear_reason(req)
            if cleared:
                logger.warning("%s holds a training run %s; clearing it and starting fresh", req.run_dir, cleared)
                _clear_run_dir(req.run_dir)
            req.run_dir.mkdir(parents=True, exist_ok=True)
            if not resuming:
                weights = req.checkpoint or (base / f"{req.model}.pt")
                size = weights.stat().st_size if weights.is_file() else 0
                check_free_space(req.run_dir, estimate_run_bytes(size, cfg.keep_best, cfg.max_epoch),
                                 f"training {req.model}")
            if req.inputs_key is not None:
                write_json(req.run_dir / INPUTS_KEY_NAME, {"key": req.inputs_key})
            _warn_if_settings_differ(req, cfg)
            dump_config(cfg, req.run_dir / CONFIG_NAME)
        dist.barrier()  # no rank looks for checkpoints to resume while rank 0 clears them
        logger.info("training %s on %s: %d train / %d cv utterances, world size %d, amp %s",
                    req.model, device, len(train_set), len(cv_set) if cv_set else 0, dist.world_size, cfg.amp)
        res = train(cfg, model, build.STEP_FUNCTIONS[req.model], train_set, cv_set, req.run_dir, device, dist,
                    resume=_resume(req), extra_info={"base_model_dir": str(base)},
                    tensorboard_dir=req.tensorboard_dir, lock=False)
    finally:
        held.close()
        leave_process_group()
    if not dist.is_main:
        return TrainingOutcome(req.model, None)
    if summary:
        print_summary(f"train {req.model}", training_rows(req.model, res))
    return TrainingOutcome(req.model, res, cleared)


def training_rows(model: str, res: TrainResult) -> list[tuple[str, object]]:
    """The summary ``cosytune train`` prints."""
    st = res.state
    return [
        ("run dir", res.run_dir),
        ("epochs done", st.epoch),
        ("optimizer steps", st.step),
        ("best CV loss", f"{st.best_cv_loss:.4f} ({st.best_name})" if st.best_name else "n/a"),
        ("stopped early", st.stopped_early),
        ("checkpoints", ", ".join(c.name for c in res.checkpoints[-5:]) or "none"),
        ("time", f"{res.seconds:.1f}s"),
        ("disk", f"{res.disk_bytes / 2**20:.1f} MiB held on disk by the run dir (best checkpoints, newest, resume state)"),
        ("next", f"cosytune average --src_path {res.run_dir} --dst_model {res.run_dir}/{model}_avg.pt"),
    ]

"""Training checkpoints in upstream's format, plus the state needed for an exact resume.

For a checkpoint named ``NAME`` (``epoch_{E}_whole`` or ``epoch_{E}_step_{S}``) the run dir holds:

* ``NAME.pt``: the model state dict plus int ``epoch`` and ``step`` keys, exactly as upstream's
  ``save_model`` writes it (so upstream's ``average_model.py`` and loaders accept it);
* ``NAME.yaml``: upstream's info dict — ``epoch``, ``step``, ``tag``, ``lr``, ``grad_norm``,
  ``loss_dict`` (the CV averages) and ``save_time`` — read by ``cosytune average --val_best``;
* ``NAME.state.pt``: ours — optimiser, scheduler, grad scaler, every RNG state and the position in
  the epoch (about twice the size of the weights). Only the newest checkpoint keeps one: it is all an
  exact resume needs.

The yaml is written last, so a ``.pt`` + ``.yaml`` pair marks a complete checkpoint. Every file is
written atomically; an interrupted save leaves no file that looks finished (and the temporaries a
killed save leaves behind are removed by :func:`remove_stale_temps` when training starts again).
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cosytune.config.loading import config_to_dict
from cosytune.fileio import atomic_path, write_text

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^epoch_(\d+)_(whole|step_(\d+))$")


@dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint in a run dir."""

    name: str
    epoch: int
    step: int
    path: Path
    info: dict

    @property
    def state_path(self) -> Path:
        return self.path.with_suffix(".state.pt")

    @property
    def cv_loss(self) -> float | None:
        loss = (self.info.get("loss_dict") or {}).get("loss")
        return None if loss is None else float(loss)


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process in a form ``torch.load(weights_only=True)`` reads back:
    tensors, ints, floats, strings and plain containers only (no numpy arrays, no tuples of objects)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss_next": None if gauss is None else float(gauss)},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: The entries of a ``NAME.state.pt`` resume file.
RESUME_STATE_KEYS = ("optimizer", "scheduler", "scaler", "train_state", "rng")


def load_resume_state(path: Path) -> dict[str, Any]:
    """Read a ``NAME.state.pt`` safely (``weights_only=True``: tensors, numbers, strings, plain containers).

    A file that needs anything else — a crafted pickle that would run code, or a state file written by
    cosytune before 0.2, which kept numpy RNG arrays — is refused with a :class:`CheckpointError`.
    """
    from cosytune.errors import CheckpointError
    from cosytune.weights.io import torch_load_safely

    st = torch_load_safely(path, CheckpointError, what="resume state")
    missing = [k for k in RESUME_STATE_KEYS if not isinstance(st, dict) or k not in st]
    if missing:
        raise CheckpointError(
            f"{path}: expected a resume state with entries {list(RESUME_STATE_KEYS)}; missing {missing}. "
            "Delete it to restart from the weights, or resume from another checkpoint"
        )
    return st


def save_checkpoint(
    run_dir: Path,
    name: str,
    model_state: dict[str, torch.Tensor],
    info: dict,
    train_state: dict[str, Any],
) -> CheckpointRef:
    """Write ``NAME.pt``, ``NAME.state.pt`` and ``NAME.yaml`` atomically (the yaml last: it marks completion)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    from cosytune.weights.io import save_state_dict

    pt = save_state_dict(run_dir / f"{name}.pt", model_state, {"epoch": int(info["epoch"]), "step": int(info["step"])})
    with atomic_path(pt.with_suffix(".state.pt")) as tmp:
        torch.save(train_state, tmp)
    info = {**info, "tag": info.get("tag", "CV"), "save_time": time.strftime("%d/%m/%Y %H:%M:%S")}
    write_text(run_dir / f"{name}.yaml", yaml.safe_dump(config_to_dict(info), sort_keys=True, allow_unicode=True))
    return CheckpointRef(name, int(info["epoch"]), int(info["step"]), pt, info)


def list_checkpoints(run_dir: Path, with_state: bool = False) -> list[CheckpointRef]:
    """Complete checkpoints (``.pt`` + ``.yaml``) in ``run_dir`` ordered by (step, epoch); with
    ``with_state`` only those that also have the resume state."""
    out = []
    for pt in Path(run_dir).glob("epoch_*.pt"):
        if pt.name.endswith(".state.pt"):
            continue
        m = _NAME_RE.match(pt.stem)
        y = pt.with_suffix(".yaml")
        if not m or not y.exists():
            continue
        if with_state and not pt.with_suffix(".state.pt").exists():
            continue
        try:
            info = yaml.safe_load(y.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            logger.warning("skipping %s: its yaml is unreadable", pt)
            continue
        out.append(CheckpointRef(pt.stem, int(info.get("epoch", m.group(1))), int(info.get("step", 0)), pt, info))
    return sorted(out, key=lambda c: (c.step, c.epoch, c.name.endswith("whole")))


def latest_checkpoint(run_dir: Path) -> CheckpointRef | None:
    """The newest checkpoint a run can resume from (it has a resume state)."""
    cks = list_checkpoints(run_dir, with_state=True)
    return cks[-1] if cks else None


def read_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint file (its ``epoch``/``step`` entries dropped), read safely."""
    from cosytune.weights.io import read_state_dict

    return read_state_dict(path)[0]


def prune_checkpoints(run_dir: Path, keep_best: int, protect: set[str]) -> list[str]:
    """Keep the disk use of a run bounded.

    * Only the newest checkpoint keeps its resume state (``.state.pt``): resuming needs no other.
    * With ``keep_best`` > 0, only the ``keep_best`` checkpoints with the lowest CV loss stay, plus those
      in ``protect`` (the newest and the best); the others are deleted with their yaml. 0 keeps all.

    Returns the names of the checkpoints deleted.
    """
    cks = list_checkpoints(run_dir)
    if cks:
        newest = cks[-1].name
        for c in cks:
            if c.name != newest:
                c.state_path.unlink(missing_ok=True)
    if keep_best <= 0:
        return []
    ranked = sorted((c for c in cks if c.cv_loss is not None), key=lambda c: c.cv_loss)
    removed = []
    for c in ranked[keep_best:]:
        if c.name in protect:
            continue
        for p in (c.path.with_suffix(".yaml"), c.path, c.state_path):  # the yaml first: no half-deleted look
            p.unlink(missing_ok=True)
        removed.append(c.name)
    return removed


def remove_stale_temps(run_dir: Path) -> list[str]:
    """Delete the temporaries a killed save left behind (``.NAME.*.tmp.pt`` and the like)."""
    removed = []
    for p in Path(run_dir).glob(".*.tmp*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted save: %s", len(removed), ", ".join(removed))
    return removed


def run_disk_bytes(run_dir: Path) -> int:
    """Bytes held by the files of a run dir (checkpoints, states, TensorBoard logs)."""
    return sum(p.stat().st_size for p in Path(run_dir).rglob("*") if p.is_file())


def estimate_run_bytes(weights_bytes: int, keep_best: int, max_epoch: int) -> int:
    """Disk a training run will hold at most: ``keep_best`` + 1 checkpoints (all of them when
    ``keep_best`` is 0) of ``weights_bytes`` each (fp32 weights, as trained), one resume state of about
    twice that (Adam's two moments), plus 5 % for yaml files and TensorBoard logs."""
    checkpoints = max_epoch if keep_best <= 0 else min(max_epoch, keep_best + 1)
    return int((checkpoints * weights_bytes + 2 * weights_bytes) * 1.05)


def check_free_space(run_dir: Path, need_bytes: int, what: str = "training") -> None:
    """Raise a DataError before any work when the filesystem of ``run_dir`` lacks ``need_bytes``."""
    import shutil

    from cosytune.errors import DataError

    probe = Path(run_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise DataError(
            f"{what} needs about {need_bytes / 2**30:.1f} GiB in {run_dir} (the best checkpoints, the newest one "
            f"and its resume state) but only {free / 2**30:.1f} GiB are free there. Free some space, point the work "
            "dir at a larger disk, or keep fewer checkpoints (keep_best=K)"
        )


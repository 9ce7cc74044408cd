"""Average the N best (by CV loss) or last N checkpoints of a run into one state dict.

Unlike upstream's ``average_model.py`` (upstream-spec §7.7) this accumulates in float32 whatever
the stored dtype, refuses checkpoints whose key sets or shapes differ, maps each yaml to *its own*
``.pt`` (upstream maps step-level yamls to the epoch's whole file), works without ``--val_best``,
and records which checkpoints went in (``<dst>.json`` beside the output).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cosytune.errors import CheckpointError, DataError
from cosytune.fileio import write_json
from cosytune.train.checkpoint import CheckpointRef, list_checkpoints, read_checkpoint_weights
from cosytune.weights.io import compare_state_dict, save_state_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AverageResult:
    dst_model: Path
    sources: list[CheckpointRef]
    num_tensors: int


def select_checkpoints(src_path: Path, num: int, val_best: bool) -> list[CheckpointRef]:
    """Pick ``num`` checkpoints: lowest CV loss with ``val_best``, else the newest."""
    src_path = Path(src_path)
    if not src_path.is_dir():
        raise DataError(f"--src_path {src_path} is not a directory; point it at a training run dir")
    cks = list_checkpoints(src_path)
    if not cks:
        raise DataError(
            f"no checkpoints (epoch_*.pt with a matching .yaml) in {src_path}; train first or check the path"
        )
    if val_best:
        scored = [c for c in cks if c.cv_loss is not None]
        if not scored:
            raise DataError(f"no checkpoint in {src_path} has a CV loss in its yaml; use --last instead of --val_best")
        chosen = sorted(scored, key=lambda c: (c.cv_loss, -c.step))[:num]
    else:
        chosen = cks[-num:]
    if len(chosen) < num:
        logger.warning("asked for %d checkpoints but only %d are available; averaging those", num, len(chosen))
    return chosen


def _tied_groups(sd: dict[str, torch.Tensor]) -> set[tuple[str, ...]]:
    """Groups of keys that are one tensor in the file (a tied embedding and lm_head are saved once)."""
    groups: dict[tuple, list[str]] = {}
    for k, v in sd.items():
        view = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        groups.setdefault(view, []).append(k)
    return {tuple(ks) for ks in groups.values() if len(ks) > 1}


def average_state_dicts(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean in float32, cast back to each tensor's stored dtype.

    Keys that are one shared tensor in every input (the LLM's tied text embedding and ``lm_head``) stay one
    tensor in the output, so the averaged file is no larger than its inputs and stays tied on loading.
    """
    acc: dict[str, torch.Tensor] | None = None
    dtypes: dict[str, torch.dtype] = {}
    tied: set[tuple[str, ...]] = set()
    first = None
    for p in paths:
        sd = read_checkpoint_weights(p)
        if acc is None:
            tied = _tied_groups(sd)
            acc = {}
            for k, v in sd.items():  # shared tensors are accumulated once
                group = next((g for g in tied if k in g), (k,))
                acc[k] = acc[group[0]] if group[0] in acc else v.float().clone()
            dtypes = {k: v.dtype for k, v in sd.items()}
            first = p
            continue
        missing, extra, shapes = map(sorted, compare_state_dict({k: tuple(v.shape) for k, v in acc.items()}, sd))
        if missing or extra or shapes:
            raise CheckpointError(
                f"{p} does not match {first}: missing keys {missing[:5]}, unexpected keys {extra[:5]}, "
                f"different shapes {shapes[:5]}; average only checkpoints of the same model"
            )
        still = tied & _tied_groups(sd)  # tied only if tied in every input
        for group in tied - still:  # untied here: each key accumulates on its own from now on
            for k in group[1:]:
                acc[k] = acc[k].clone()
        tied = still
        for k in {id(t): k for k, t in acc.items()}.values():
            acc[k] += sd[k].float()
    assert acc is not None
    n = float(len(paths))
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for k, v in acc.items():
        group = next((g for g in tied if k in g), None)
        mean = done.get(id(v)) if group is not None else None
        if mean is None:
            mean = (v / n).to(dtypes[k])
            done[id(v)] = mean
        out[k] = mean
    return out


def average_checkpoints(src_path: Path, dst_model: Path, num: int = 5, val_best: bool = True) -> AverageResult:
    """Average checkpoints of a run and save a plain state dict loadable by inference (and upstream)."""
    if num < 1:
        raise DataError(f"--num must be >= 1, found {num}")
    chosen = select_checkpoints(Path(src_path), num, val_best)
    avg = average_state_dicts([c.path for c in chosen])
    dst_model = save_state_dict(dst_model, avg)
    write_json(
        dst_model.with_suffix(".json"),
        {
            "averaged_from": [
                {"name": c.name, "path": str(c.path), "epoch": c.epoch, "step": c.step, "cv_loss": c.cv_loss}
                for c in chosen
            ],
            "selection": "val_best" if val_best else "last",
            "num": len(chosen),
        },
    )
    return AverageResult(dst_model, chosen, len(avg))

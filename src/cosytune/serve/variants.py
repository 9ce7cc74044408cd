"""Checkpoint variants a request may name: ``llm_ckpt=epoch_5``, ``flow_ckpt=base``.

A variant is a *name* in a listing built by scanning known folders; a request's name is looked up in that
listing and never joined onto a path, so no request can reach a file outside the model and run dirs.

Names
    * ``model``: the model dir's own ``llm.pt`` / ``flow.pt`` (the default).
    * ``base``: the base model's file, when the model dir was made by ``cosytune assemble`` (its
      ``cosytune_manifest.json`` names the base model dir) and that file still exists.
    * ``epoch_N`` (``epoch_N_whole.pt``), ``epoch_N_step_S`` (``epoch_N_step_S.pt``): complete training
      checkpoints (``.pt`` + ``.yaml``) of the run dir, as ``cosytune train`` writes them.
    * ``llm_avg`` / ``flow_avg`` and any other ``<name>.pt`` weight file directly in the run dir
      (``cosytune average`` output), except resume states (``*.state.pt``).

Run dir layouts accepted for ``--run_dir``: a training run dir itself (``exp/llm``, ``exp/flow``: the kind
comes from the folder name or its ``train_config.yaml``), a folder holding ``llm/`` and ``flow/``
(``exp/``), or a ``cosytune run`` work dir (holding ``exp/``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from cosytune.errors import UsageError

logger = logging.getLogger(__name__)

KINDS = ("llm", "flow")
#: What a variant name may look like (anything else is refused before the lookup).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")


@dataclass(frozen=True)
class Variant:
    """One weight file a request may select."""

    kind: str
    """``llm`` or ``flow``."""
    name: str
    """What a request names (``model``, ``base``, ``epoch_5``, ``llm_avg`` ...)."""
    path: Path
    """The weight file (resolved); never shown to clients."""
    source: str
    """``model_dir``, ``base_model_dir`` or ``run_dir``."""
    epoch: int | None = None
    step: int | None = None
    cv_loss: float | None = None

    def public(self) -> dict:
        """What ``GET /v1/variants`` shows (no filesystem paths)."""
        return {"kind": self.kind, "name": self.name, "source": self.source, "epoch": self.epoch,
                "step": self.step, "cv_loss": self.cv_loss, "bytes": _size(self.path)}


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _run_dirs(run_dir: Path | None) -> dict[str, Path]:
    """{kind: training run dir} found under ``run_dir`` (see the module docstring)."""
    if run_dir is None:
        return {}
    run_dir = Path(run_dir)
    found: dict[str, Path] = {}
    for kind in KINDS:
        for cand in (run_dir / "exp" / kind, run_dir / kind):
            if cand.is_dir():
                found[kind] = cand
                break
    if not found:
        kind = run_dir.name if run_dir.name in KINDS else None
        cfg = run_dir / "train_config.yaml"
        if kind is None and cfg.is_file():
            import yaml

            try:
                kind = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("model")
            except yaml.YAMLError:
                kind = None
        if kind in KINDS:
            found[kind] = run_dir
    return found


def scan_variants(model_dir: Path, run_dir: Path | None = None) -> dict[str, dict[str, Variant]]:
    """``{"llm": {name: Variant}, "flow": {name: Variant}}`` for a model dir and an optional run dir."""
    from cosytune.train.checkpoint import list_checkpoints

    model_dir = Path(model_dir)
    out: dict[str, dict[str, Variant]] = {k: {} for k in KINDS}
    for kind in KINDS:
        p = model_dir / f"{kind}.pt"
        if p.is_file():
            out[kind]["model"] = Variant(kind, "model", p.resolve(), "model_dir")
    manifest = model_dir / "cosytune_manifest.json"
    if manifest.is_file():
        try:
            base = json.loads(manifest.read_text(encoding="utf-8")).get("base_model_dir")
        except (OSError, ValueError, AttributeError):
            base = None
        if isinstance(base, str) and base:
            for kind in KINDS:
                p = Path(base) / f"{kind}.pt"
                if p.is_file():
                    out[kind]["base"] = Variant(kind, "base", p.resolve(), "base_model_dir")
    for kind, rdir in _run_dirs(run_dir).items():
        taken = set()
        for ck in list_checkpoints(rdir):
            name = ck.name.removesuffix("_whole")
            out[kind].setdefault(name, Variant(kind, name, ck.path.resolve(), "run_dir", ck.epoch, ck.step,
                                               ck.cv_loss))
            taken.add(ck.path.name)
        for p in sorted(rdir.glob("*.pt")):
            if p.name in taken or p.name.endswith(".state.pt") or p.name.startswith("epoch_") or p.name.startswith("."):
                continue
            if NAME_RE.match(p.stem):
                out[kind].setdefault(p.stem, Variant(kind, p.stem, p.resolve(), "run_dir"))
    return out


def lookup(variants: dict[str, dict[str, Variant]], kind: str, name: str | None) -> Variant | None:
    """The variant ``name`` of ``kind`` (None/``model`` → None: the model dir's own file).

    Raises:
        UsageError: a name that is not in the listing (path-like names included), listing the known ones.
    """
    if name is None or name == "model":
        return None
    known = sorted(variants.get(kind, {}))
    if not isinstance(name, str) or not NAME_RE.match(name) or name not in variants.get(kind, {}):
        raise UsageError(f"unknown {kind} variant {name!r}; expected one of: {', '.join(known) or '(none)'} "
                         "(see GET /v1/variants; variants are names, not paths)")
    return variants[kind][name]

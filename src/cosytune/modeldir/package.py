"""Assemble a speaker model directory: base model files + tuned llm.pt (and flow.pt) + spk2info.pt.

The result has upstream's layout, so both ``cosytune infer`` and upstream CosyVoice load it. Large
unchanged files (hift.pt, the ONNX models, CosyVoice-BlankEN/, and flow.pt when no tuned flow is
given) are hard-linked, else symlinked, else copied — never duplicated needlessly. Tuned weights
are checked against the base file key for key and shape for shape before anything is written,
and training-only entries (``epoch``/``step``) are stripped. ``cosytune_manifest.json`` records
where every file came from with its SHA-256.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cosytune.errors import CheckpointError, DataError, ModelDirError
from cosytune.fileio import atomic_path, read_json_or, sha256_file, write_json
from cosytune.weights.io import compare_state_dict, read_state_dict, torch_load_safely

logger = logging.getLogger(__name__)

#: Files of a model dir that are linked from the base unless replaced.
BASE_FILES = ("cosyvoice3.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v3.onnx")
BASE_DIRS = ("CosyVoice-BlankEN",)


@dataclass
class AssembleResult:
    out_dir: Path
    linked: dict[str, str] = field(default_factory=dict)  # file -> "reflink" | "hardlink" | "symlink" | "copy"
    written: list[str] = field(default_factory=list)
    speakers: list[str] = field(default_factory=list)


_FICLONE = 0x40049409  # linux/fs.h: share the source's blocks copy-on-write (btrfs, XFS, bcachefs, ...)


def _reflink(src: Path, dst: Path) -> bool:
    """Copy-on-write clone of ``src`` at ``dst`` where the filesystem supports it; False otherwise."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    try:
        with atomic_path(dst) as tmp:
            with open(src, "rb") as fs, open(tmp, "wb") as fd:
                fcntl.ioctl(fd.fileno(), _FICLONE, fs.fileno())
            shutil.copystat(src, tmp)
        return True
    except OSError:
        return False


def link_or_copy(src: Path, dst: Path) -> str:
    """Make ``dst`` hold ``src``'s content without copying it where possible. Returns the method.

    A reflink (copy-on-write clone) comes first: it costs no space and is independent of the base file.
    Otherwise a hard link (no space, but the *same* file: writing into it in place — ``cp x dst`` —
    changes the base model's file too; cosytune itself only ever replaces files by rename), then a
    symlink, then a copy.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if _reflink(src, dst):
        return "reflink"
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        pass
    try:
        os.symlink(src.resolve(), dst)
        return "symlink"
    except OSError:
        pass
    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)
    return "copy"


def shared_files(model_dir: Path) -> list[str]:
    """Files of a model dir that are the same file as another path (hard links or symlinks): replacing
    them by rename is safe, writing into them in place (``cp other.pt flow.pt``) also changes the other."""
    out = []
    for p in sorted(Path(model_dir).rglob("*")):
        if p.is_symlink() or (p.is_file() and p.stat().st_nlink > 1):
            out.append(str(p.relative_to(model_dir)))
    return out


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass the averaged or epoch checkpoint you want to use")
    return read_state_dict(path)[0]


def check_same_layout(tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError unless ``tuned`` has exactly ``base``'s keys and shapes (compared by
    :func:`cosytune.weights.io.compare_state_dict`, like every weight check)."""
    missing, extra, shapes = map(sorted, compare_state_dict({k: tuple(v.shape) for k, v in base.items()}, tuned))
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:8]}")
        if extra:
            parts.append(f"unexpected keys ({len(extra)}): {extra[:8]}")
        if shapes:
            parts.append("shape mismatches: " + ", ".join(
                f"{k} {tuple(tuned[k].shape)} vs base {tuple(base[k].shape)}" for k in shapes[:8]))
        raise CheckpointError(
            f"{what} does not match the base model's layout: " + "; ".join(parts)
            + ". Was it trained from this base model (same --model llm/flow)?"
        )


def spk2info_from_embeddings(spk2embedding: dict, spk_ids: list[str] | None = None) -> dict[str, dict]:
    """SFT entries ``{spk: {"embedding": (1, 192) float32}}`` from ``spk2embedding.pt`` contents."""
    if not spk2embedding:
        raise DataError("spk2embedding.pt is empty; run cosytune extract-embedding first")
    ids = list(spk2embedding) if not spk_ids else spk_ids
    unknown = [s for s in ids if s not in spk2embedding]
    if unknown:
        raise DataError(
            f"speaker(s) {unknown} not in spk2embedding.pt; available: {sorted(spk2embedding)[:20]}"
        )
    out = {}
    for s in ids:
        emb = torch.as_tensor(spk2embedding[s], dtype=torch.float32).reshape(1, -1)
        out[s] = {"embedding": emb}
    return out


def load_spk2embedding(path: Path) -> dict:
    if not Path(path).is_file():
        raise DataError(f"{path} does not exist; run cosytune extract-embedding on the training dir first")
    table = torch_load_safely(path, DataError, what="speaker embedding table")
    if not isinstance(table, dict):
        raise DataError(f"{path}: expected a dict {{speaker: embedding}}, found a {type(table).__name__}; "
                        "re-run cosytune extract-embedding")
    return table


def save_spk2info(path: Path, entries: dict[str, dict], merge: bool = True) -> dict[str, dict]:
    """Write (or update) spk2info.pt atomically; existing speakers not in ``entries`` are kept."""
    table: dict[str, dict] = {}
    if merge and path.exists():
        table = torch_load_safely(path, DataError, what="speaker table (spk2info.pt)")
        if not isinstance(table, dict):
            raise DataError(f"{path}: expected a dict {{speaker: {{field: tensor}}}}, found a {type(table).__name__}; "
                            "delete it or pass a fresh --out_spk2info_pt")
    table.update(entries)
    with atomic_path(path) as tmp:
        torch.save(table, tmp)
    return table


def assemble(
    base_model_dir: Path,
    out_model_dir: Path,
    llm_pt: Path,
    flow_pt: Path | None = None,
    spk2embedding_pt: Path | None = None,
    spk_ids: list[str] | None = None,
    overwrite: bool = False,
) -> AssembleResult:
    """Build ``out_model_dir`` from ``base_model_dir`` with the tuned weights."""
    base, out = Path(base_model_dir), Path(out_model_dir)
    missing = [f for f in BASE_FILES if not (base / f).is_file()] + [d for d in BASE_DIRS if not (base / d).is_dir()]
    if missing:
        raise ModelDirError(f"base model dir {base} lacks {missing}; point --base_model_dir at a complete model dir")
    if out.resolve() == base.resolve():
        raise DataError("--out_model_dir must differ from --base_model_dir (the base must stay untouched)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} already exists and is not empty; pass --overwrite to replace its files")

    tuned_llm = _load_state(Path(llm_pt))
    check_same_layout(tuned_llm, _load_state(base / "llm.pt"), f"--llm_pt {llm_pt}")
    tuned_flow = None
    if flow_pt is not None:
        tuned_flow = _load_state(Path(flow_pt))
        check_same_layout(tuned_flow, _load_state(base / "flow.pt"), f"--flow_pt {flow_pt}")
    spk_entries = None
    if spk2embedding_pt is not None:
        spk_entries = spk2info_from_embeddings(load_spk2embedding(Path(spk2embedding_pt)), spk_ids)

    res = AssembleResult(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in BASE_FILES:
        if f == "llm.pt" or (f == "flow.pt" and tuned_flow is not None):
            continue
        res.linked[f] = link_or_copy(base / f, out / f)
    for d in BASE_DIRS:
        for src in sorted((base / d).rglob("*")):
            if src.is_file():
                rel = src.relative_to(base)
                res.linked[str(rel)] = link_or_copy(src, out / rel)
    for name, sd in (("llm.pt", tuned_llm), ("flow.pt", tuned_flow)):
        if sd is None:
            continue
        dst = out / name
        if dst.exists() or dst.is_symlink():
            dst.unlink()  # never write through a hard link into the base model's file
        with atomic_path(dst) as tmp:
            torch.save(sd, tmp)
        res.written.append(name)
    if spk_entries is not None:
        spk_path = out / "spk2info.pt"
        if spk_path.exists() or spk_path.is_symlink():
            spk_path.unlink()
        base_spk = base / "spk2info.pt"
        if base_spk.is_file():
            shutil.copy2(base_spk, spk_path)
        save_spk2info(spk_path, spk_entries)
        res.written.append("spk2info.pt")
        res.speakers = list(spk_entries)
    provenance = {str(p): read_json_or(Path(p).with_suffix(".json")) for p in (llm_pt, flow_pt)
                  if p is not None and Path(p).with_suffix(".json").is_file()}
    write_json(out / "cosytune_manifest.json", {
        "base_model_dir": str(base.resolve()),
        "llm_pt": str(Path(llm_pt).resolve()),
        "flow_pt": str(Path(flow_pt).resolve()) if flow_pt else None,
        "flow": "tuned" if tuned_flow is not None else "base",
        "speakers": res.speakers,
        "linked": res.linked,
        "sha256": {n: sha256_file(out / n) for n in res.written},
        "provenance": provenance,
    })
    return res


"""Reading, checking and writing the upstream weight files (``llm.pt``, ``flow.pt``, ``hift.pt``, checkpoints).

File formats handled (spec §1.1, §2.9, §3.7, §4.5, §7.4, §7.7):

* **Inference files** ``llm.pt`` / ``flow.pt`` / ``hift.pt``: a plain ``{name: Tensor}`` dict written by
  ``torch.save``. Key names are upstream's module paths and are kept unchanged in both directions.
* **Training checkpoints** ``epoch_N_whole.pt`` / ``epoch_N_step_M.pt``: the same dict plus two int
  entries ``epoch`` and ``step``. These are the only non-tensor entries accepted; they are returned
  separately as metadata and never reach the model.
* **Averaged files** (``average_model.py`` output): a plain dict again.
* ``.safetensors`` files with the same key names are accepted too.

Everything is read with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is
refused, never executed. Loading into a module is strict: every key and every shape must match, with
explicit, named allow-lists (:data:`TIED_ALIASES`). Mismatches raise :class:`CheckpointError` listing the
missing, unexpected and mis-shaped keys together.

Upstream reference: ``cosyvoice/cli/model.py`` (``load``), ``cosyvoice/utils/train_utils.py``
(``save_model``), ``cosyvoice/bin/average_model.py``; read for facts only.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from cosytune.errors import CheckpointError
from cosytune.errors import listing as _list
from cosytune.fileio import atomic_path
from cosytune.models.llm import TIED_KEYS

logger = logging.getLogger(__name__)

ModelKind = Literal["llm", "flow", "hift"]

#: Non-tensor entries upstream's training ``save_model`` adds to every checkpoint (spec §7.4).
TRAINING_META_KEYS: tuple[str, ...] = ("epoch", "step")

#: Keys that are the same tensor as another key, per model. Upstream's ``llm.pt`` carries both names of
#: the tied Qwen2 embedding; a file may omit the alias (the golden fixtures do), never the source.
TIED_ALIASES: dict[str, dict[str, str]] = {"llm": dict(TIED_KEYS), "flow": {}, "hift": {}}

def _unsafe_global(err: BaseException) -> str:
    """The offending global named in torch's weights-only error, without its advice to unpickle anyway."""
    text = str(err)
    m = re.search(r"(Unsupported global: GLOBAL [^\s]+|Unsupported operand \d+|Unsupported class [^\s]+)", text)
    if m:
        return m.group(1)
    first = text.splitlines()[0] if text else type(err).__name__
    return first.split(" This file can still be loaded")[0].split(" Re-running `torch.load`")[0]


def torch_load_safely(path: str | os.PathLike, error: type[Exception] = CheckpointError, *, mmap: bool = False,
                      what: str = "file") -> Any:
    """``torch.load(weights_only=True)`` of any file cosytune reads, with one clear message per failure.

    This is the only place cosytune calls ``torch.load``. A file whose pickle needs anything beyond
    tensors, numbers, strings and plain containers (a crafted file that would run code, or an object
    saved by another tool) is refused before any of it runs; a truncated or corrupt file gets a
    message that names it and what to do.

    Args:
        path: the file.
        error: the exception type to raise (:class:`CheckpointError` for weights, ``DataError`` for
            data tables, ...).
        mmap: memory-map the tensors (zip-format files only).
        what: what the file is, for the message ("resume state", "speaker table", ...).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise error(f"{path}: the {what} is empty (an interrupted copy or save?); write or copy it again")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise error(
            f"{path}: refusing to load this {what}: it contains Python objects other than tensors, numbers and "
            f"plain containers ({_unsafe_global(e)}), and cosytune never unpickles arbitrary objects, because "
            "a crafted file can run code when unpickled. Use a file written by cosytune or upstream CosyVoice, or "
            "re-save it as a plain dict of tensors."
        ) from e
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise error(
            f"{path}: not a readable torch {what} ({type(e).__name__}: {detail}); it may be truncated or "
            "corrupted: write or copy it again"
        ) from e


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a weight file safely and split it into tensors and training metadata.

    Args:
        path: a ``torch.save`` file (``.pt``) or a ``.safetensors`` file.

    Returns:
        ``(tensors, meta)``: ``tensors`` maps key → CPU tensor; ``meta`` holds the allow-listed
        non-tensor entries (``epoch``, ``step``) if present.

    Raises:
        CheckpointError: missing or unreadable file, a file that needs unsafe unpickling, a DeepSpeed
            checkpoint directory, or non-tensor entries other than ``epoch``/``step``.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: expected a weight file, found a directory (a DeepSpeed checkpoint?). DeepSpeed checkpoints "
            "must first be converted to one state-dict file (e.g. with DeepSpeed's zero_to_fp32.py)."
        )
    if path.suffix == ".safetensors" and path.is_file() and path.stat().st_size:  # else torch_load_safely says why
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path))), {}
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    # mmap keeps large files (llm.pt ~2 GB) out of RAM until a tensor is touched; it needs the zip format.
    obj = torch_load_safely(path, mmap=zipfile.is_zipfile(path), what="weight file")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    bad: list[str] = []
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        elif key in TRAINING_META_KEYS and isinstance(value, (int, float)):
            meta[str(key)] = value
        else:
            bad.append(f"{key!r} ({type(value).__name__})")
    if bad:
        nested = [b for b in bad if "(dict)" in b or "(OrderedDict)" in b]
        hint = (
            f" The weights seem to be nested under {nested[0].split(' ')[0]}: extract that entry and save it alone."
            if nested else ""
        )
        raise CheckpointError(
            f"{path}: expected only tensors plus the training entries {list(TRAINING_META_KEYS)}; found non-tensor "
            f"entries {_list(bad)}.{hint}"
        )
    return tensors, meta


def normalize_upstream_keys(state_dict: Mapping[str, torch.Tensor], kind: ModelKind) -> dict[str, torch.Tensor]:
    """Apply the key rewrites upstream's loader applies, so files upstream accepts are accepted here.

    * ``hift``: every occurrence of ``generator.`` is removed from each key (a HiFiGan-wrapper
      checkpoint's generator half then matches the vocoder).
    * ``hift``: legacy weight-norm names ``<m>.weight_g`` / ``<m>.weight_v`` become
      ``<m>.parametrizations.weight.original0`` / ``original1``.

    Args:
        state_dict: tensors as read from the file.
        kind: which network the file is for.

    Returns:
        A new dict with rewritten keys (tensors are not copied).
    """
    if kind != "hift":
        return dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        # CHECKPOINT-COMPAT: upstream strips the substring "generator." from every hift key (spec §1.1).
        new = key.replace("generator.", "")
        # CHECKPOINT-COMPAT: torch's old weight_norm naming; the parametrized module stores g/v as original0/1.
        if new.endswith(".weight_g"):
            new = new[: -len("weight_g")] + "parametrizations.weight.original0"
        elif new.endswith(".weight_v"):
            new = new[: -len("weight_v")] + "parametrizations.weight.original1"
        out[new] = value
    return out


def compare_state_dict(
    expected: Mapping[str, tuple[int, ...] | torch.Size],
    actual: Mapping[str, torch.Tensor | tuple[int, ...] | torch.Size],
    *,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> tuple[list[str], list[str], list[str]]:
    """Compare key sets and shapes.

    Args:
        expected: key → shape the model needs.
        actual: key → tensor (or shape) the file provides.
        allow_missing: keys that may be absent from ``actual``.
        allow_unexpected: keys that may appear in ``actual`` without being expected.

    Returns:
        ``(missing, unexpected, mis_shaped)`` key lists.
    """
    allow_missing = set(allow_missing)
    allow_unexpected = set(allow_unexpected)
    missing = [k for k in expected if k not in actual and k not in allow_missing]
    unexpected = [k for k in actual if k not in expected and k not in allow_unexpected]
    mis_shaped = [k for k, shape in expected.items() if k in actual and _shape(actual[k]) != tuple(shape)]
    return missing, unexpected, mis_shaped


def _shape(value: torch.Tensor | tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def check_state_dict(
    expected: Mapping[str, tuple[int, ...] | torch.Size],
    actual: Mapping[str, torch.Tensor | tuple[int, ...] | torch.Size],
    *,
    source: str,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected and mis-shaped key.

    Args:
        expected: key → shape the model needs.
        actual: key → tensor (or shape) the file provides.
        source: what the file is (path and model), used in the message.
        allow_missing: keys that may be absent.
        allow_unexpected: keys that may be present without being expected.

    Raises:
        CheckpointError: if anything does not match.
    """
    missing, unexpected, mis_shaped = compare_state_dict(
        expected, actual, allow_missing=allow_missing, allow_unexpected=allow_unexpected
    )
    if not (missing or unexpected or mis_shaped):
        return
    parts = []
    if missing:
        parts.append(f"  missing keys ({len(missing)}): {_list(missing)}")
    if unexpected:
        parts.append(f"  unexpected keys ({len(unexpected)}): {_list(unexpected)}")
    if mis_shaped:
        shapes = [f"{k}: file {list(_shape(actual[k]))} vs model {list(expected[k])}" for k in mis_shaped]
        parts.append(f"  mis-shaped keys ({len(mis_shaped)}): {_list(shapes)}")
    hint = ""
    if mis_shaped and not missing and not unexpected:
        hint = " The file is for a model of another size: check that cosyvoice3.yaml matches the weights."
    elif any(k.startswith("discriminator.") for k in unexpected):
        hint = " It has discriminator keys: this is a HiFiGAN training checkpoint; keep only the generator.* entries."
    elif missing and unexpected:
        hint = " The file may belong to another network (llm.pt vs flow.pt vs hift.pt) or another model version."
    raise CheckpointError(
        f"{source}: the weights do not match the model ({len(expected)} keys expected, {len(actual)} in the file):\n"
        + "\n".join(parts) + (f"\n  {hint.strip()}" if hint else "")
    )


def strict_load(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> None:
    """Load ``state_dict`` into ``module`` after checking every key and shape.

    Values are copied into the module's existing tensors (and cast to their dtype), so tied parameters
    stay tied.

    Args:
        module: the network.
        state_dict: key → tensor.
        source: description used in error messages (e.g. the file path).
        allow_missing: keys the file may omit (tied aliases).
        allow_unexpected: keys the file may carry in addition.

    Raises:
        CheckpointError: listing every missing, unexpected and mis-shaped key.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, source=source, allow_missing=allow_missing,
                     allow_unexpected=allow_unexpected)
    # A tied alias stored with other values than its source: upstream would silently keep whichever
    # copy loads last. Refuse instead; the file was edited inconsistently.
    for aliases in TIED_ALIASES.values():
        for alias, src in aliases.items():
            if alias in state_dict and src in state_dict and alias in expected and not torch.equal(
                    state_dict[alias].to(torch.float32), state_dict[src].to(torch.float32)):
                raise CheckpointError(f"{source}: {alias} must equal {src} (tied weights), but the values differ")
    allow_unexpected = set(allow_unexpected)
    to_load = {k: v for k, v in state_dict.items() if k not in allow_unexpected or k in expected}
    result = module.load_state_dict(to_load, strict=False)
    leftover = set(result.missing_keys) - set(allow_missing)
    if leftover or result.unexpected_keys:  # pragma: no cover - guarded by check_state_dict above
        raise CheckpointError(f"{source}: load_state_dict disagreed: missing {sorted(leftover)}, "
                              f"unexpected {sorted(result.unexpected_keys)}")


def load_state_dict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    kind: ModelKind,
    *,
    source: str | None = None,
    allow_unexpected: Iterable[str] = (),
) -> None:
    """Strictly load upstream-named tensors into the ``kind`` network, as :func:`load_weights` does for a file.

    Applies :func:`normalize_upstream_keys` (upstream's ``hift.pt`` key rule) and the tied-alias
    allow-list, then :func:`strict_load`.

    Args:
        module: the llm, flow or hift network.
        state_dict: key → tensor, upstream key names.
        kind: which network ``module`` is.
        source: what the tensors are, for messages (default: ``"<kind> weights"``).
        allow_unexpected: extra keys to ignore.

    Raises:
        CheckpointError: any key/shape mismatch (all listed).
    """
    tensors = normalize_upstream_keys(state_dict, kind)
    strict_load(module, tensors, source=source or f"{kind} weights", allow_missing=TIED_ALIASES[kind],
                allow_unexpected=allow_unexpected)


def load_weights(
    module: torch.nn.Module, path: str | os.PathLike, kind: ModelKind
) -> dict[str, Any]:
    """Strictly load an upstream weight file (inference file, training checkpoint or average) into ``module``.

    Args:
        module: the llm, flow or hift network.
        path: ``llm.pt``/``flow.pt``/``hift.pt``, ``epoch_N_whole.pt``, an averaged file or ``.safetensors``.
        kind: which network ``module`` is; selects key rewrites and allow-lists.

    Returns:
        The training metadata found in the file (``{"epoch": E, "step": S}`` for checkpoints, else ``{}``).

    Raises:
        CheckpointError: unreadable file or any key/shape mismatch (all listed).
    """
    tensors, meta = read_state_dict(path)
    load_state_dict(module, tensors, kind, source=f"{path} ({kind})")
    if meta:
        logger.info("%s: training checkpoint (%s); the epoch/step entries were set aside", path,
                    ", ".join(f"{k}={v}" for k, v in meta.items()))
    return meta


def upstream_state_dict(module: torch.nn.Module, kind: ModelKind) -> dict[str, torch.Tensor]:
    """The module's weights under upstream's key names, with tied aliases present as upstream saves them.

    Args:
        module: the network.
        kind: which network it is.

    Returns:
        key → detached CPU tensor. Tied aliases share storage with their source, so ``torch.save``
        stores the data once.
    """
    sd = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    for alias, src in TIED_ALIASES[kind].items():
        if alias not in sd and src in sd:
            sd[alias] = sd[src]
    if kind == "llm" and TIED_ALIASES["llm"]:
        # keep upstream's order: the alias follows the backbone's final norm, before the speech tables
        order = [k for k in sd if k not in TIED_ALIASES["llm"]]
        idx = next((i for i, k in enumerate(order) if k == "llm.model.model.norm.weight"), len(order) - 1) + 1
        for alias in TIED_ALIASES["llm"]:
            order.insert(idx, alias)
        sd = {k: sd[k] for k in order}
    return sd


def save_state_dict(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, int | float] | None = None
) -> Path:
    """Atomically write a plain state dict (plus optional ``epoch``/``step``) with ``torch.save``.

    The result loads in upstream CosyVoice with ``torch.load(weights_only=True)`` and, for files without
    ``meta``, with ``load_state_dict(strict=True)``.

    Args:
        path: output file (``.pt``); a ``.safetensors`` suffix writes safetensors instead.
        state_dict: key → tensor (moved to CPU, made contiguous).
        meta: training entries to add (only ``epoch`` and ``step`` are allowed).

    Returns:
        ``path`` as a Path.

    Raises:
        CheckpointError: a ``meta`` key other than ``epoch``/``step``, or a non-tensor value.
    """
    path = Path(path)
    out: dict[str, Any] = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: cannot save {k!r}: expected a tensor, found {type(v).__name__}")
        out[k] = v.detach().cpu()
    for k, v in (meta or {}).items():
        if k not in TRAINING_META_KEYS:
            raise CheckpointError(f"{path}: only {list(TRAINING_META_KEYS)} may be stored next to the weights, got {k!r}")
        out[k] = v
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            if meta:
                raise CheckpointError(f"{path}: safetensors files cannot carry epoch/step entries; save as .pt")
            # safetensors refuses shared storage; clone aliases so each key owns its data
            seen: set[int] = set()
            flat = {}
            for k, v in out.items():
                ptr = v.untyped_storage().data_ptr()
                flat[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
                seen.add(ptr)
            save_file(flat, str(tmp))
        else:
            torch.save(out, str(tmp))
    return path


def save_weights(
    module: torch.nn.Module, path: str | os.PathLike, kind: ModelKind, meta: Mapping[str, int | float] | None = None
) -> Path:
    """Save ``module`` in upstream's format and key names (``llm.pt``/``flow.pt``/``hift.pt`` or a checkpoint).

    Args:
        module: the network.
        path: output file.
        kind: which network it is (adds tied aliases upstream expects).
        meta: ``{"epoch": E, "step": S}`` to write a training checkpoint; omit for an inference file.

    Returns:
        ``path`` as a Path.
    """
    return save_state_dict(path, upstream_state_dict(module, kind), meta)

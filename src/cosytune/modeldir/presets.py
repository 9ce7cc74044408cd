"""Named model presets and :func:`write_model_dir`: a complete upstream-layout model dir with random weights.

Presets:

* ``tiny``: the architecture of Fun-CosyVoice3-0.5B at test size (the golden fixtures' widths:
  Qwen2 32-d × 2 layers with the real 151,936-row text table, DiT 64-d × 2, HiFT 64 channels).
  A whole model dir is ~67 MB and builds in 5-15 s on one CPU core, most of it the tokenizer.
* ``full``: the released sizes (llm 506,148,480, flow 332,257,088, hift 20,779,887 parameters),
  random weights. Useful to test memory and speed without the real checkpoint (~5.2 GB on disk, ~40 s).

The written directory has every file the real one has (spec §1.1): ``cosyvoice3.yaml`` in upstream's
tagged format, ``llm.pt``/``flow.pt``/``hift.pt`` in upstream's key names, tiny stand-ins for
``campplus.onnx`` and ``speech_tokenizer_v3.onnx`` (+ ``.batch.onnx``) with the real input/output
interface, and ``CosyVoice-BlankEN/`` with a real Qwen2-vocabulary tokenizer built offline, the Qwen2
``config.json`` and ``model.safetensors``. Every command that takes ``--model_dir`` accepts it, and
upstream CosyVoice can load it too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch

from cosytune import __version__
from cosytune.errors import UsageError
from cosytune.fileio import dir_mode, file_mode, read_json_or, sha256_file, write_json, write_text
from cosytune.modeldir.upstream_yaml import CosyVoice3Hparams, dump_cosyvoice3_yaml
from cosytune.models.flow import FlowConfig
from cosytune.models.hift import HiFTConfig
from cosytune.models.llm import LLMConfig

logger = logging.getLogger(__name__)

Preset = Literal["tiny", "full"]
PRESETS: tuple[str, ...] = ("tiny", "full")

#: Provenance file written into every generated model dir (ignored by upstream).
INIT_INFO_NAME = "cosytune_init.json"


def preset_hparams(preset: str) -> CosyVoice3Hparams:
    """The configs of a preset (the networks' ``fun_cosyvoice3``/``tiny`` configs).

    Raises:
        UsageError: unknown preset name.
    """
    if preset == "full":
        return CosyVoice3Hparams()
    if preset == "tiny":
        return CosyVoice3Hparams(llm=LLMConfig.tiny(), flow=FlowConfig.tiny(), hift=HiFTConfig.tiny())
    raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def preset_qwen2_config(preset: str):
    """The Qwen2 backbone config (``CosyVoice-BlankEN/config.json``) of a preset.

    The text vocabulary keeps its real size (151,936 rows) in both presets, so real tokenizer ids work.
    """
    return preset_hparams(preset).llm.qwen2


def _init_networks(hp: CosyVoice3Hparams, seed: int) -> dict[str, torch.nn.Module]:
    """Build the three networks with seeded random weights (the global RNG is left untouched)."""
    from cosytune.modeldir.builders import build_network

    nets: dict[str, torch.nn.Module] = {}
    # fork_rng: module constructors draw from the global generator; the caller's RNG state survives.
    with torch.random.fork_rng(devices=[]):
        for i, kind in enumerate(("llm", "flow", "hift")):
            torch.manual_seed(seed + i)
            net = build_network(kind, hp, device="cpu")
            if kind == "llm" and hasattr(net, "init_weights"):
                # nn.Embedding's default N(0, 1) would make a 151,936-row table dominate; use a GPT-style init.
                net.init_weights(torch.Generator().manual_seed(seed))
            nets[kind] = net.eval()
    return nets


def _write_blanken(out: Path, qwen2, llm: torch.nn.Module, tokenizer_from: Path | None) -> None:
    """``CosyVoice-BlankEN/``: tokenizer files, Qwen2 config.json and the backbone weights."""
    from safetensors.torch import save_file

    from cosytune.text.tokenizer import build_tiny_qwen_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            src = Path(tokenizer_from) / name
            if src.is_file():
                shutil.copy2(src, out / name)
    else:
        build_tiny_qwen_tokenizer(out)
    write_json(out / "config.json", qwen2.to_hf_dict())
    write_json(out / "generation_config.json", {"bos_token_id": 151643, "eos_token_id": 151643,
                                                "max_new_tokens": 2048})
    # HF layout of the backbone: the keys of llm.pt without the "llm.model." wrapper prefix; the tied
    # lm_head is omitted, as transformers' save_pretrained does.
    prefix = "llm.model."
    sd = {k[len(prefix):]: v.detach().contiguous() for k, v in llm.state_dict().items()
          if k.startswith(prefix) and k != prefix + "lm_head.weight"}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", file_mode())  # safetensors creates it 0600 whatever the umask


def write_model_dir(
    out: str | os.PathLike,
    preset: str = "tiny",
    seed: int = 0,
    *,
    overwrite: bool = False,
    tokenizer_from: str | os.PathLike | None = None,
) -> Path:
    """Write a complete CosyVoice 3 model dir with random weights, offline.

    The directory is assembled in a temporary sibling and renamed into place, so ``out`` is either
    absent or complete.

    Args:
        out: target directory; must not exist or be empty unless ``overwrite``.
        preset: ``"tiny"`` or ``"full"``.
        seed: seeds every random weight (networks and ONNX stand-ins); same seed, same files.
        overwrite: replace an existing non-empty ``out``. Without it, an ``out`` that already is an intact
            model dir of the same preset and seed is kept as is (re-running is a no-op).
        tokenizer_from: copy the tokenizer files from this ``CosyVoice-BlankEN`` folder instead of
            building them (saves ~10 s).

    Returns:
        ``out`` as a Path.

    Raises:
        UsageError: unknown preset, or ``out`` exists and is not empty without ``overwrite``.
    """
    from cosytune.modeldir.onnx_tiny import build_tiny_campplus, build_tiny_speech_tokenizer
    from cosytune.weights.io import save_weights

    out = Path(out)
    hp = preset_hparams(preset)
    qwen2 = hp.llm.qwen2
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        if is_complete_model_dir(out, preset, seed):
            logger.info("%s is already a complete %s model dir with seed %d; nothing to do", out, preset, seed)
            return out
        raise UsageError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, dir_mode())  # mkdtemp makes it private; use the umask like mkdir
    try:
        write_text(tmp / "cosyvoice3.yaml", dump_cosyvoice3_yaml(
            hp, header=f"CosyVoice 3 model config written by cosytune {__version__} (preset {preset}, seed {seed}).\n"
                       "Random weights: this model produces noise-like speech until trained."))
        nets = _init_networks(hp, seed)
        for kind, net in nets.items():
            save_weights(net, tmp / f"{kind}.pt", kind)  # type: ignore[arg-type]
        _write_blanken(tmp / "CosyVoice-BlankEN", qwen2, nets["llm"],
                       Path(tokenizer_from) if tokenizer_from is not None else None)
        build_tiny_campplus(tmp / "campplus.onnx", seed=seed + 1234)
        build_tiny_speech_tokenizer(tmp / "speech_tokenizer_v3.onnx", seed=seed + 4321)
        build_tiny_speech_tokenizer(tmp / "speech_tokenizer_v3.batch.onnx", seed=seed + 4321, batch=True)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / INIT_INFO_NAME, {
            "created_by": f"cosytune {__version__} init-model",
            "preset": preset,
            "seed": seed,
            "hparams": json.loads(json.dumps(dataclasses.asdict(hp), default=sorted)),  # frozensets as lists
            "qwen2": qwen2.to_hf_dict(),
            "parameters": {k: sum(p.numel() for p in {id(p): p for p in n.parameters()}.values())
                           for k, n in nets.items()},
            "sha256": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
        })
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s model dir %s in %.1f s", preset, out, time.monotonic() - t0)
    return out


def is_complete_model_dir(model_dir: str | os.PathLike, preset: str, seed: int) -> bool:
    """Whether ``model_dir`` was written by :func:`write_model_dir` with this preset and seed and is intact.

    Every file listed in the provenance must exist with its recorded SHA-256, so a dir whose files were
    replaced (e.g. by fine-tuned weights) is not mistaken for a fresh one.
    """
    info = read_init_info(model_dir)
    if not info or info.get("preset") != preset or info.get("seed") != seed:
        return False
    root = Path(model_dir)
    for rel, digest in (info.get("sha256") or {}).items():
        path = root / rel
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return bool(info.get("sha256"))


def read_init_info(model_dir: str | os.PathLike) -> dict | None:
    """The provenance written by :func:`write_model_dir`, or None for other model dirs."""
    return read_json_or(Path(model_dir) / INIT_INFO_NAME)

"""Everything a training run needs besides the loop: model, step function, tokenizer, datasets.

The base model dir (upstream layout) supplies the architecture (``cosyvoice3.yaml`` +
``CosyVoice-BlankEN/config.json``), the tokenizer and the ONNX models for online features.
Initial weights come from ``--checkpoint`` — loaded strictly (upstream silently trains from random
weights when keys do not match) — or, by default, from the base dir's ``llm.pt``/``flow.pt``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cosytune.errors import UsageError

logger = logging.getLogger(__name__)


def find_base_model_dir(base_model_dir: Path | None, onnx_path: Path | None, checkpoint: Path | None,
                        qwen_pretrain_path: Path | None) -> Path:
    """The base model dir: given explicitly, or the seed flags' directories that hold cosyvoice3.yaml."""
    if base_model_dir is not None:
        return Path(base_model_dir)
    candidates = []
    if onnx_path is not None:
        candidates.append(Path(onnx_path) if Path(onnx_path).is_dir() else Path(onnx_path).parent)
    if checkpoint is not None:
        candidates.append(Path(checkpoint).parent)
    if qwen_pretrain_path is not None:
        candidates.append(Path(qwen_pretrain_path).parent)
    for c in candidates:
        if (c / "cosyvoice3.yaml").is_file():
            return c
    raise UsageError(
        "cannot tell which base model to fine-tune: pass --base_model_dir DIR (a CosyVoice 3 model dir), or "
        f"--onnx_path/--checkpoint inside one (looked in: {[str(c) for c in candidates] or 'nothing given'})"
    )


def build_model(kind: str, base_model_dir: Path, checkpoint: Path | None, from_scratch: bool = False, *,
                resuming: bool = False) -> nn.Module:
    """The ``kind`` network with its initial weights loaded strictly (``resuming``: only to be replaced by the
    checkpoint the run resumes, which the log says instead of "starting from the base model")."""
    from cosytune.modeldir.model_dir import ModelDir
    from cosytune.weights.io import load_weights

    md = ModelDir.open(base_model_dir)
    model = md.build(kind)
    if from_scratch:
        logger.warning("training %s from random weights (--from_scratch)", kind)
        return model
    src = Path(checkpoint) if checkpoint is not None else md.weight_path(kind)
    if resuming:
        logger.info("loading the base model's %s to build the network; the resumed checkpoint replaces its weights",
                    src.name)
    elif checkpoint is None:
        logger.info("no --checkpoint given: starting from the base model's %s", src.name)
    load_weights(model, src, kind)
    return model


def llm_step(model: nn.Module, batch: dict) -> dict:
    """LLM loss: the bistream/unistream draw uses Python's global RNG (saved with checkpoints)."""
    out = model(batch, random)
    return {"loss": out.loss, "acc": out.acc}


def flow_step(model: nn.Module, batch: dict) -> dict:
    """Flow-matching loss on (tokens, 24 kHz mel, speaker embedding)."""
    out = model(batch)
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if k in ("loss", "acc")}
    return {"loss": out.loss}


STEP_FUNCTIONS = {"llm": llm_step, "flow": flow_step}


def online_extractors(base_model_dir: Path, onnx_device: str = "auto"):
    """(token_extractor, embedding_extractor) running the base dir's ONNX models on 16 kHz audio."""
    from cosytune.data.embedding import compute_campplus_feature
    from cosytune.data.speech_token import compute_tokenizer_feature
    from cosytune.modeldir.model_dir import ModelDir
    from cosytune.modeldir.onnx_models import CampPlus, SpeechTokenizer

    md = ModelDir(base_model_dir)
    state: dict = {}

    def tokens(wavs: list[np.ndarray]) -> list[list[int]]:
        if "tok" not in state:
            state["tok"] = SpeechTokenizer(md.speech_tokenizer_path, device=onnx_device)
        feats = [compute_tokenizer_feature(torch.from_numpy(w)) for w in wavs]
        return [list(map(int, t)) for t in state["tok"].tokenize_many(feats)]

    def embeddings(wavs: list[np.ndarray]) -> list[np.ndarray]:
        if "spk" not in state:
            state["spk"] = CampPlus(md.campplus_path, device=onnx_device)
        feats = [compute_campplus_feature(torch.from_numpy(w)) for w in wavs]
        return state["spk"].embed_many(feats)

    return tokens, embeddings

"""Inference front end: a prompt wav (+ its text) → the features every CosyVoice 3 mode conditions on.

Role
    Upstream's ``frontend_zero_shot`` (spec §5.3-5.8) for one prompt: decode the wav once, resample it
    **separately** from its own rate to 16 kHz (speech tokenizer, CAM++) and to 24 kHz (flow prompt mel),
    then

    * ``speech_token`` (1, P) int32: ``speech_tokenizer_v3.onnx`` on the 128-bin Whisper log-mel;
    * ``speech_feat``  (1, 2P, 80) float32: the 24 kHz Matcha mel, frames first;
    * ``embedding``    (1, 192) float32: ``campplus.onnx`` on the CMN Kaldi fbank.

    The token/mel pair is forced to the 2:1 ratio the flow needs (:func:`align_token_mel`:
    ``n = min(T_mel // 2, T_tok)``, keep ``2n`` frames and ``n`` tokens).

Speakers
    :class:`Speaker` is what a request conditions on, whichever way it was obtained: an SFT entry of
    ``spk2info.pt`` (only an embedding), a zero-shot entry of ``spk2info.pt`` (stored prompt features, spec
    §5.8 keys), or a prompt wav processed now. :func:`speaker_to_spk2info` / :func:`speaker_from_spk2info`
    convert to and from upstream's ``spk2info.pt`` entry layout, so entries written here load in upstream
    (``inference_zero_shot(..., zero_shot_spk_id=...)`` / ``inference_sft``) and vice versa.

Shapes: P prompt speech tokens (25 Hz); 2P prompt mel frames (50 Hz); D = 192 embedding dims.

Upstream reference (facts only): ``cosyvoice/cli/frontend.py`` (``frontend_zero_shot``,
``frontend_sft``, ``add_zero_shot_spk``), ``cosyvoice/utils/file_utils.py`` (``load_wav``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cosytune.errors import DataError
from cosytune.text.special import DEFAULT_INSTRUCT, ENDOFPROMPT

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_PROMPT_SECONDS",
    "PromptFrontend",
    "Speaker",
    "align_token_mel",
    "speaker_from_spk2info",
    "speaker_to_spk2info",
    "zero_shot_entry_from_dir",
]

#: Upstream asserts the prompt is at most 30 s (speech tokenizer limit).
MAX_PROMPT_SECONDS = 30.0
TOKENIZER_SAMPLE_RATE = 16000
MEL_SAMPLE_RATE = 24000

# Keys of a zero-shot spk2info entry, as upstream's add_zero_shot_spk stores them (spec §5.8).
ZERO_SHOT_KEYS = (
    "prompt_text", "prompt_text_len", "llm_prompt_speech_token", "llm_prompt_speech_token_len",
    "flow_prompt_speech_token", "flow_prompt_speech_token_len", "prompt_speech_feat", "prompt_speech_feat_len",
    "llm_embedding", "flow_embedding",
)


@dataclass
class Speaker:
    """What a synthesis request conditions on (all tensors on CPU; batch dim 1).

    Attributes:
        embedding: (1, D) float32 speaker embedding (the flow L2-normalises it, so scale is free).
        speech_token: (1, P) int32 prompt speech tokens, P may be 0 (SFT speakers).
        speech_feat: (1, 2P, 80) float32 prompt mel (frames first), matching ``speech_token``.
        prompt_text_ids: stored prompt-text ids of a zero-shot speaker (None when not stored).
        source: where it came from, for run.json (``spk2info:<id>`` or the prompt wav path).
    """

    embedding: Tensor
    speech_token: Tensor
    speech_feat: Tensor
    prompt_text_ids: list[int] | None = None
    source: str = ""

    @property
    def num_prompt_tokens(self) -> int:
        """P."""
        return int(self.speech_token.shape[1])

    @property
    def has_prompt_speech(self) -> bool:
        """Whether prompt tokens and mel are present (zero-shot style) or not (SFT style)."""
        return self.num_prompt_tokens > 0


def align_token_mel(speech_token: Tensor, speech_feat: Tensor, token_mel_ratio: int = 2) -> tuple[Tensor, Tensor]:
    """Force ``token_mel_ratio`` mel frames per token by truncating the longer of the two (upstream rule).

    Args:
        speech_token: (1, T_tok) ids.
        speech_feat: (1, T_mel, 80) mel.
        token_mel_ratio: mel frames per token (2).

    Returns:
        ``(speech_token[:, :n], speech_feat[:, :ratio·n])`` with ``n = min(T_mel // ratio, T_tok)``.
    """
    n = min(int(speech_feat.shape[1]) // token_mel_ratio, int(speech_token.shape[1]))
    return speech_token[:, :n], speech_feat[:, : token_mel_ratio * n]


def speaker_to_spk2info(speaker: Speaker, prompt_text_ids: list[int] | None = None) -> dict[str, Tensor]:
    """A zero-shot ``spk2info.pt`` entry in upstream's layout (int32 ids and lengths, spec §5.8).

    Args:
        speaker: a speaker with prompt speech.
        prompt_text_ids: the prompt text's ids (default ``speaker.prompt_text_ids``; must include
            ``<|endofprompt|>`` for CosyVoice 3).

    Raises:
        DataError: the speaker has no prompt speech or no prompt text.
    """
    ids = prompt_text_ids if prompt_text_ids is not None else speaker.prompt_text_ids
    if not speaker.has_prompt_speech or ids is None:
        raise DataError("a zero-shot speaker entry needs prompt speech and its prompt text; got "
                        f"{speaker.num_prompt_tokens} prompt tokens and "
                        f"{'no' if ids is None else len(ids)} prompt text ids")
    tok = speaker.speech_token.to(torch.int32)
    feat = speaker.speech_feat.float()
    emb = speaker.embedding.float()
    text = torch.tensor([ids], dtype=torch.int32)
    return {
        "prompt_text": text,
        "prompt_text_len": torch.tensor([text.shape[1]], dtype=torch.int32),
        "llm_prompt_speech_token": tok,
        "llm_prompt_speech_token_len": torch.tensor([tok.shape[1]], dtype=torch.int32),
        "flow_prompt_speech_token": tok.clone(),
        "flow_prompt_speech_token_len": torch.tensor([tok.shape[1]], dtype=torch.int32),
        "prompt_speech_feat": feat,
        "prompt_speech_feat_len": torch.tensor([feat.shape[1]], dtype=torch.int32),
        "llm_embedding": emb,
        "flow_embedding": emb.clone(),
    }


def speaker_from_spk2info(spk_id: str, entry: Mapping[str, Any]) -> Speaker:
    """Read an SFT (``{"embedding"}``) or zero-shot (spec §5.8 keys) ``spk2info.pt`` entry.

    Raises:
        DataError: the entry has neither layout, or inconsistent shapes.
    """
    def tensor(key: str) -> Tensor:
        return torch.as_tensor(entry[key]).detach().cpu()

    if "flow_embedding" in entry or "prompt_speech_feat" in entry:
        missing = [k for k in ("flow_prompt_speech_token", "prompt_speech_feat", "flow_embedding") if k not in entry]
        if missing:
            raise DataError(f"spk2info entry {spk_id!r} looks zero-shot but lacks {missing}; re-create it with "
                            "'cosytune spk2info --prompt_wav ... --prompt_text ...'")
        emb = tensor("flow_embedding").float().reshape(1, -1)
        tok = tensor("flow_prompt_speech_token").long().reshape(1, -1)
        feat = tensor("prompt_speech_feat").float()
        if feat.dim() == 2:
            feat = feat[None]
        text = tensor("prompt_text").reshape(-1).tolist() if "prompt_text" in entry else None
        tok, feat = align_token_mel(tok, feat)
        return Speaker(emb, tok, feat, [int(t) for t in text] if text is not None else None, f"spk2info:{spk_id}")
    if "embedding" in entry:
        emb = tensor("embedding").float().reshape(1, -1)
        return Speaker(emb, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80), None, f"spk2info:{spk_id}")
    raise DataError(f"spk2info entry {spk_id!r} has keys {sorted(entry)}; expected 'embedding' (SFT) or the "
                    f"zero-shot keys {list(ZERO_SHOT_KEYS)}")


class PromptFrontend:
    """Turns a prompt wav into a :class:`Speaker` with the model dir's two ONNX models (built lazily).

    Args:
        campplus_path: ``campplus.onnx``.
        speech_tokenizer_path: ``speech_tokenizer_v3.onnx``.
        device: onnxruntime device (``"cpu"``, ``"cuda"``, ``"auto"``); upstream runs CAM++ on CPU.
        token_mel_ratio: mel frames per token (2).
        max_seconds: longest accepted prompt (upstream: 30 s).
    """

    def __init__(self, campplus_path: str | os.PathLike, speech_tokenizer_path: str | os.PathLike, *,
                 device: str = "cpu", token_mel_ratio: int = 2, max_seconds: float = MAX_PROMPT_SECONDS) -> None:
        self.campplus_path = Path(campplus_path)
        self.speech_tokenizer_path = Path(speech_tokenizer_path)
        self.device = device
        self.token_mel_ratio = token_mel_ratio
        self.max_seconds = max_seconds
        self._campplus: Any = None
        self._tokenizer: Any = None

    def _models(self) -> tuple[Any, Any]:
        if self._campplus is None:
            from cosytune.modeldir.onnx_models import CampPlus, SpeechTokenizer

            self._campplus = CampPlus(self.campplus_path, device="cpu")
            self._tokenizer = SpeechTokenizer(self.speech_tokenizer_path, device=self.device)
        return self._campplus, self._tokenizer

    def load_waves(self, path: str | os.PathLike) -> tuple[Tensor, Tensor]:
        """Decode ``path`` and resample it to 16 kHz and (separately) to 24 kHz.

        Raises:
            DataError: missing/unreadable file, rate below 16 kHz, silence-only, too short or too long.
        """
        from cosytune.audio.io import load_wav

        p = Path(path)
        if not p.is_file():
            raise DataError(f"prompt wav {p} does not exist; pass --prompt_wav with the path of a 3-10 s clip of "
                            "the voice (wav, mp3, flac, ...)")
        try:
            wav16 = load_wav(p, TOKENIZER_SAMPLE_RATE)
            wav24 = load_wav(p, MEL_SAMPLE_RATE)
        except DataError as e:
            raise DataError(f"cannot use prompt wav {p}: {e}. Expected a readable audio file of at least "
                            "16 kHz; convert it with 'cosytune prepare-audio' or pick another clip") from e
        seconds = wav16.shape[0] / TOKENIZER_SAMPLE_RATE
        if seconds > self.max_seconds:
            raise DataError(f"prompt wav {p} is {seconds:.1f} s long; the speech tokenizer takes at most "
                            f"{self.max_seconds:.0f} s. Cut a 3-10 s clip of clean speech")
        # 0.1 s is below any useful prompt; the mel needs > 720 samples for its reflect padding anyway.
        if seconds < 0.1:
            raise DataError(f"prompt wav {p} is only {seconds * 1000:.0f} ms long; use a 3-10 s clip")
        if float(wav16.abs().max()) == 0.0:
            raise DataError(f"prompt wav {p} is pure digital silence; use a clip with speech")
        return wav16, wav24

    def speaker_from_wav(self, path: str | os.PathLike) -> Speaker:
        """Prompt features of one wav (tokens, 24 kHz mel and embedding, 2:1 aligned).

        Raises:
            DataError: see :meth:`load_waves`; or the tokenizer returned no tokens.
        """
        from cosytune.audio.features import cmn, kaldi_fbank, mel_spectrogram, whisper_log_mel

        wav16, wav24 = self.load_waves(path)
        campplus, tokenizer = self._models()
        feat = mel_spectrogram(wav24).T[None].contiguous()  # (1, T_mel, 80)
        tokens = tokenizer.tokenize(whisper_log_mel(wav16, n_mels=tokenizer.n_mels).numpy())
        token = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)
        fbank = cmn(kaldi_fbank(wav16, sample_rate=TOKENIZER_SAMPLE_RATE, num_mel_bins=80)).numpy()
        embedding = torch.from_numpy(np.asarray(campplus.embed(fbank), dtype=np.float32)).reshape(1, -1)
        token, feat = align_token_mel(token, feat, self.token_mel_ratio)
        if token.shape[1] == 0:
            raise DataError(f"prompt wav {path}: the speech tokenizer produced no tokens; use a longer clip")
        return Speaker(embedding, token, feat, None, str(path))


def zero_shot_entry_from_dir(model_dir: str | os.PathLike, prompt_wav: str | os.PathLike, prompt_text: str, *,
                             device: str = "cpu") -> dict[str, Tensor]:
    """A zero-shot ``spk2info.pt`` entry from a model dir's tokenizer and ONNX models (no networks loaded).

    Args:
        model_dir: the model dir (``CosyVoice-BlankEN/``, ``campplus.onnx``, ``speech_tokenizer_v3.onnx``).
        prompt_wav: the prompt clip.
        prompt_text: ``"<instruction><|endofprompt|><transcript of the clip>"`` (stored unnormalised, as
            upstream's ``add_zero_shot_spk`` does).
        device: onnxruntime device of the speech tokenizer.

    Raises:
        DataError: missing ``<|endofprompt|>``, unusable wav. ModelDirError: missing model files.
    """
    from cosytune.modeldir.model_dir import ModelDir

    if ENDOFPROMPT not in prompt_text:
        raise DataError(f"--prompt_text {prompt_text[:60]!r} lacks {ENDOFPROMPT}; CosyVoice 3 needs it, e.g. "
                        f"'{DEFAULT_INSTRUCT}<transcript of the prompt wav>'")
    md = ModelDir(model_dir)
    missing = [p.name for p in (md.campplus_path, md.speech_tokenizer_path, md.blanken_path) if not p.exists()]
    if missing:
        from cosytune.errors import ModelDirError

        raise ModelDirError(f"{md.path} lacks {missing}, needed to turn a prompt wav into a speaker entry")
    ratio = md.hparams.flow.token_mel_ratio if md.yaml_path.is_file() else 2
    frontend = PromptFrontend(md.campplus_path, md.speech_tokenizer_path, device=device, token_mel_ratio=ratio)
    ids = list(md.load_tokenizer().encode(prompt_text))
    return speaker_to_spk2info(frontend.speaker_from_wav(prompt_wav), ids)

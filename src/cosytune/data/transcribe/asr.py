"""The ASR backends (faster-whisper, openai-whisper; imported lazily) and their per-utterance result cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cosytune.console import progress as progress_bar
from cosytune.data.transcribe.config import ASR_BACKENDS, TranscribeConfig
from cosytune.data.transcribe.metrics import normalize_transcript
from cosytune.data.transcribe.records import Utterance
from cosytune.errors import CosytuneError, DataError, UsageError, require
from cosytune.fileio import read_json_or, sha256_file, sha256_json, write_json

logger = logging.getLogger(__name__)

# Prompts in the punctuated style we want back: Whisper imitates the prompt's style.
PUNCTUATION_PROMPTS = {
    "zh": "以下是普通话的句子，带有标点符号。",
    "en": "Hello, welcome to my recording. This is a sentence, with punctuation.",
    "ja": "こんにちは。これは、句読点のある文章です。",
    "ko": "안녕하세요. 이것은 문장 부호가 있는 문장입니다.",
    "yue": "你好，歡迎收聽。呢個係有標點符號嘅句子。",
}


@dataclass(frozen=True)
class AsrResult:
    """Text and confidence of one decoded clip."""

    text: str
    language: str
    avg_logprob: float | None = None
    """Duration-weighted mean of the segments' average token log-probabilities."""
    no_speech_prob: float | None = None
    """Highest no-speech probability of any segment."""
    compression_ratio: float | None = None
    """Highest gzip compression ratio of any segment (high = repetitive output)."""
    language_prob: float | None = None


def load_audio_16k(path: str | os.PathLike) -> Any:
    """Decode an audio file to mono float32 at 16 kHz (Whisper's input rate), resampled with soxr HQ."""
    from cosytune.audio.io import load_mono

    return load_mono(path, target_rate=16000, quality="HQ").samples


def _prompt(cfg: TranscribeConfig) -> str | None:
    if cfg.initial_prompt != "auto":
        return cfg.initial_prompt or None
    return PUNCTUATION_PROMPTS.get(cfg.language or "")


def _aggregate(
    segments: list[tuple[str, float, float, float, float]], language: str, lang_prob: float | None
) -> AsrResult:
    """Combine (text, duration, avg_logprob, no_speech_prob, compression_ratio) segment tuples."""
    text = normalize_transcript("".join(s[0] for s in segments))
    if not segments:
        return AsrResult(text="", language=language, language_prob=lang_prob)
    total = sum(max(s[1], 1e-3) for s in segments)
    return AsrResult(
        text=text,
        language=language,
        avg_logprob=sum(s[2] * max(s[1], 1e-3) for s in segments) / total,
        no_speech_prob=max(s[3] for s in segments),
        compression_ratio=max(s[4] for s in segments),
        language_prob=lang_prob,
    )


def _check_model_path(model: str) -> None:
    """A model given as a path must exist (otherwise it would be taken for a hub name)."""
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise DataError(
            f"Whisper model dir {model} does not exist; pass an existing model dir or a model name such as large-v3"
        )


class FasterWhisperBackend:
    """faster-whisper (CTranslate2) ASR; the model loads from a local dir or the usual cache."""

    name = "faster-whisper"

    def __init__(self, cfg: TranscribeConfig) -> None:
        fw = require("faster_whisper", "asr", "the faster-whisper transcription backend")
        self.cfg = cfg
        _check_model_path(cfg.whisper_model)
        try:
            self.model = fw.WhisperModel(
                cfg.whisper_model,
                device=cfg.device,
                compute_type=cfg.compute_type,
                cpu_threads=cfg.num_threads,
            )
        except Exception as e:
            raise DataError(
                f"could not load faster-whisper model {cfg.whisper_model!r} on device {cfg.device!r} "
                f"(compute_type {cfg.compute_type!r}): {e}. Pass --whisper_model as a local CTranslate2 "
                "model dir or a model name (e.g. large-v3, downloaded once into the Hugging Face cache), "
                "and a compute type the device supports (int8 on CPU)."
            ) from e

    def transcribe(self, audio_16k: Any) -> AsrResult:
        """Decode one clip (mono float32 at 16 kHz)."""
        cfg = self.cfg
        segments, info = self.model.transcribe(
            audio_16k,
            language=cfg.language,
            beam_size=cfg.beam_size,
            vad_filter=cfg.vad_filter,
            initial_prompt=_prompt(cfg),
            condition_on_previous_text=False,  # a clip is one utterance; carrying text over invites loops
            max_new_tokens=cfg.max_new_tokens,
        )
        segs = [
            (s.text, s.end - s.start, s.avg_logprob, s.no_speech_prob, s.compression_ratio) for s in segments
        ]
        return _aggregate(segs, info.language, info.language_probability)


class OpenAIWhisperBackend:
    """openai-whisper ASR (PyTorch); optional, installed with ``pip install 'cosytune[whisper]'``."""

    name = "openai-whisper"

    def __init__(self, cfg: TranscribeConfig) -> None:
        whisper = require("whisper", "whisper", "the openai-whisper transcription backend")
        import torch

        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg = cfg
        self.fp16 = device.startswith("cuda")
        _check_model_path(cfg.whisper_model)
        try:
            self.model = whisper.load_model(cfg.whisper_model, device=device)
        except (RuntimeError, OSError) as e:
            raise DataError(
                f"could not load openai-whisper model {cfg.whisper_model!r} on {device}: {e}"
            ) from e

    def transcribe(self, audio_16k: Any) -> AsrResult:
        """Decode one clip (mono float32 at 16 kHz)."""
        cfg = self.cfg
        res = self.model.transcribe(
            audio_16k,
            language=cfg.language,
            beam_size=cfg.beam_size,
            initial_prompt=_prompt(cfg),
            condition_on_previous_text=False,
            fp16=self.fp16,
        )
        segs = [
            (s["text"], s["end"] - s["start"], s["avg_logprob"], s["no_speech_prob"], s["compression_ratio"])
            for s in res.get("segments", [])
        ]
        return _aggregate(segs, res.get("language") or cfg.language or "", None)


def build_asr_backend(name: str, cfg: TranscribeConfig) -> FasterWhisperBackend | OpenAIWhisperBackend:
    """Construct an ASR backend by name (imports its package lazily)."""
    if name == "faster-whisper":
        return FasterWhisperBackend(cfg)
    if name == "openai-whisper":
        return OpenAIWhisperBackend(cfg)
    raise UsageError(f"unknown ASR backend {name!r}; expected one of {', '.join(ASR_BACKENDS)}")


def asr_settings(cfg: TranscribeConfig, backend: str) -> dict[str, Any]:
    """The settings that change ASR output; a cached result is reused only when they match."""
    return {
        "backend": backend,
        "model": cfg.whisper_model,
        "language": cfg.language,
        "beam_size": cfg.beam_size,
        "vad_filter": cfg.vad_filter,
        "initial_prompt": _prompt(cfg),
        "compute_type": cfg.compute_type,
        "max_new_tokens": cfg.max_new_tokens,
    }


class AsrCache:
    """ASR results per utterance, keyed by the wav's SHA-256 and the settings hash.

    Saved atomically every ``save_every`` new results and at the end, so an interrupted run
    loses at most that many decodes.
    """

    def __init__(self, path: Path, settings_hash: str, save_every: int = 20) -> None:
        self.path = path
        self.settings_hash = settings_hash
        self.save_every = save_every
        self._dirty = 0
        cache = read_json_or(path) if path.is_file() else {}
        if cache is None:
            logger.warning("ASR cache %s is unreadable; starting a new one", path)
        self.entries: dict[str, dict] = (cache or {}).get("entries", {})

    def get(self, utt: str, wav_sha: str) -> AsrResult | None:
        e = self.entries.get(utt)
        if e and e.get("wav_sha256") == wav_sha and e.get("settings") == self.settings_hash:
            return AsrResult(**e["result"])
        return None

    def put(self, utt: str, wav_sha: str, result: AsrResult) -> None:
        self.entries[utt] = {"wav_sha256": wav_sha, "settings": self.settings_hash, "result": asdict(result)}
        self._dirty += 1
        if self._dirty >= self.save_every:
            self.save()

    def save(self) -> None:
        if self._dirty or not self.path.exists():
            write_json(self.path, {"entries": self.entries}, indent=None)
            self._dirty = 0


def run_asr(
    utts: list[Utterance],
    name: str,
    cfg: TranscribeConfig,
    out_dir: Path,
    progress: bool,
    backend_factory: Callable[[str, TranscribeConfig], Any],
    counts: list[int],
) -> dict[str, AsrResult]:
    """Decode ``utts`` with ASR backend ``name``, reusing ``asr_cache_<name>.json``.

    The model loads only when some clip is not cached. A clip whose decoding raises is left
    out of the result (the caller records it as ``asr_failed``). ``counts`` gets
    ``[decoded, from_cache]`` added.
    """
    out: dict[str, AsrResult] = {}
    if not utts:
        return out
    cache = AsrCache(out_dir / f"asr_cache_{name}.json", sha256_json(asr_settings(cfg, name)))
    backend = None
    try:
        for u in progress_bar(utts, desc=name, enabled=progress, unit="clip"):
            sha = sha256_file(u.wav)
            res = cache.get(u.utt, sha)
            if res is not None:
                counts[1] += 1
                out[u.utt] = res
                continue
            if backend is None:
                logger.info("loading %s model %s", name, cfg.whisper_model)
                backend = backend_factory(name, cfg)
            try:
                res = backend.transcribe(load_audio_16k(u.wav))
            except CosytuneError:
                raise
            except Exception as e:  # noqa: BLE001 - one bad clip is a reject, not a crashed run
                logger.warning("%s failed on %s: %s", name, u.wav, e)
                continue
            cache.put(u.utt, sha, res)
            counts[0] += 1
            out[u.utt] = res
    finally:
        cache.save()
    return out

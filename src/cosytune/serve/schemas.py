"""Request bodies of the HTTP API (pydantic models) and their translation into Synthesizer calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cosytune.errors import ConfigError, UsageError

OPENAI_MODELS = ("cosytune", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")


class SamplingBody(BaseModel):
    """RAS sampling overrides (unset fields keep the model yaml's values)."""

    model_config = ConfigDict(extra="forbid")
    top_p: float | None = None
    top_k: int | None = None
    win_size: int | None = None
    tau_r: float | None = None
    temperature: float | None = None


class TTSBody(BaseModel):
    """``POST /v1/tts``: every control ``cosytune infer`` has. A prompt clip comes *in* the request
    (``prompt_audio``: base64 of a wav/flac/mp3/ogg file), never as a file name."""

    model_config = ConfigDict(extra="forbid")
    text: str
    mode: Literal["sft", "zero_shot", "instruct2", "cross_lingual"] | None = None
    spk_id: str | None = None
    prompt_text: str | None = None
    prompt_audio: str | None = None
    prompt_strategy: Literal["default", "guide_prefix"] = "default"
    guide_sep: str = " "
    instruct: str | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    speed: float = 1.0
    sampling: SamplingBody | None = None
    text_frontend: bool = True
    llm_ckpt: str | None = None
    flow_ckpt: str | None = None
    stream: bool = False
    response_format: str = "wav"


class SpeechBody(BaseModel):
    """``POST /v1/audio/speech`` (OpenAI's fields; unknown ones are ignored, as new clients send more)."""

    model_config = ConfigDict(extra="ignore")
    model: str = "cosytune"
    input: str
    voice: str
    response_format: str = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream: bool = False
    stream_format: Literal["audio", "sse"] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)


@dataclass
class Plan:
    """A checked request, ready for the engine."""

    text: str
    mode: str | None
    spk_id: str | None
    prompt_text: str | None
    options: Any  # SynthesisOptions
    llm: str
    flow: str
    stream: bool
    fmt: str
    prompt_audio: bytes | None = None

    def kwargs(self, prompt_wav: Any = None) -> dict[str, Any]:
        return {"mode": self.mode, "spk_id": self.spk_id, "prompt_text": self.prompt_text, "options": self.options,
                "prompt_wav": prompt_wav}


#: Leading bytes of the audio containers a prompt clip may come in -> the suffix its temporary file gets.
_MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"),
          (b"\xff\xf3", ".mp3"), (b"\xff\xf2", ".mp3"))


def decode_prompt_audio(data: str) -> bytes:
    """The clip of ``prompt_audio`` (base64), checked to be a known audio container."""
    import base64
    import binascii

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise UsageError(f"prompt_audio must be base64 of an audio file (wav, flac, mp3, ogg): {e}") from e
    if not any(raw.startswith(m) for m, _ in _MAGIC):
        raise UsageError("prompt_audio is not a wav, flac, mp3 or ogg file (its first bytes say otherwise)")
    return raw


def prompt_suffix(raw: bytes) -> str:
    return next(s for m, s in _MAGIC if raw.startswith(m))


def check_text(text: str, max_chars: int, what: str = "text") -> str:
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"'{what}' is empty; expected the sentence to speak")
    if len(text) > max_chars:
        raise UsageError(f"'{what}' has {len(text)} characters; this server takes at most {max_chars} per request "
                         "(--max_text_chars). Split the text and send one request per sentence or paragraph")
    return text


def build_options(base_sampling: Any, *, speed: float, seed: int | None, sampling: SamplingBody | None,
                  text_frontend: bool = True, prompt_strategy: str = "default", guide_sep: str = " ",
                  instruct: str | None = None) -> Any:
    """SynthesisOptions from request fields (the seed is drawn here when absent, so it can be reported
    before any audio exists)."""
    import dataclasses

    from cosytune.infer.synthesizer import SynthesisOptions, Synthesizer

    samp = base_sampling
    if sampling is not None:
        changes = {k: v for k, v in sampling.model_dump().items() if v is not None}
        try:
            samp = dataclasses.replace(base_sampling, **changes)
        except ConfigError as e:
            raise UsageError("invalid sampling values: " + "; ".join(e.problems)) from e
    extra = {"instruct": instruct} if instruct is not None else {}
    options = SynthesisOptions(speed=float(speed), seed=seed, sampling=samp, text_frontend=bool(text_frontend),
                               prompt_strategy=prompt_strategy, guide_sep=guide_sep, **extra)
    options.check()
    return dataclasses.replace(options, seed=Synthesizer.resolve_seed(options))

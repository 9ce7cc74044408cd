"""Streaming synthesis state: upstream's CosyVoice 3 chunk schedule, kept per request.

Role
    Decides *when* a chunk of speech tokens is turned into audio and *which* tokens it covers. The
    Synthesizer feeds tokens in as the LLM produces them and asks :meth:`StreamState.next_chunk` whether a
    chunk is due; it owns nothing else. Every counter lives in a :class:`StreamState` created for one
    request, so concurrent or consecutive requests never see each other's hop sizes (upstream grows a
    hop length stored on the shared model object and never resets it, spec §6.3 / §9.1.5).

Chunk schedule (spec §6.3; constants from upstream's ``CosyVoice2Model``/``CosyVoice3Model``)
    * ``token_hop_len`` = 25 tokens per chunk at first, doubled after every chunk
      (``stream_scale_factor`` 2) up to ``token_max_hop_len`` = 100.
    * The first hop is padded with ``ceil(P / 25)·25 − P`` tokens (P = flow prompt tokens), so that
      prompt + first hop ends on a DiT chunk boundary (25 tokens = 50 mel frames).
    * A chunk is due when ``len(tokens) − offset ≥ hop + pre_lookahead_len`` (3 look-ahead tokens that
      are given to the flow as context only). It covers ``tokens[: offset + hop + 3]`` in the flow
      (the whole prefix is recomputed, as upstream does), of which the mel of tokens
      ``offset … offset + hop − 1`` is new. With ``Synthesizer(stream_cache=True)`` the flow instead keeps
      each chunk's DiT keys/values per Euler step and solves only the new frames (the streaming mask makes
      earlier frames independent of later ones: ``CausalMaskedDiffWithDiT.inference_chunk``).
    * After the LLM ends, one final chunk covers every token with ``finalize=True`` and *full* attention
      (``streaming=False``), exactly as upstream's final ``token2wav`` call.

Silence thinning (CosyVoice 3 runtime, spec §6.2)
    After ``max_silent_run`` (5) consecutive silent/breath tokens, further consecutive ones are not given
    to the flow (the LLM still saw them). :class:`SilenceThinner` holds that counter per request too.

Upstream reference (facts only): ``cosyvoice/cli/model.py`` (``CosyVoice3Model.tts``, ``token2wav``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cosytune.models.llm import LLMConfig

__all__ = ["SilenceThinner", "StreamChunk", "StreamSchedule", "StreamState"]


@dataclass(frozen=True)
class StreamSchedule:
    """Constants of the chunk schedule (defaults are upstream's)."""

    token_hop_len: int = 25
    """Tokens in the first chunk (before prompt padding)."""
    token_max_hop_len: int = 100
    """Largest hop."""
    stream_scale_factor: int = 2
    """Hop growth factor after each chunk."""
    pre_lookahead_len: int = 3
    """Look-ahead tokens the flow sees as context only (the flow config's ``pre_lookahead_len``)."""
    token_mel_ratio: int = 2
    """Mel frames per token."""

    def __post_init__(self) -> None:
        if self.token_hop_len < 1 or self.token_max_hop_len < self.token_hop_len:
            raise ValueError(f"need 1 <= token_hop_len <= token_max_hop_len, got {self.token_hop_len}, "
                             f"{self.token_max_hop_len}")
        if self.stream_scale_factor < 1 or self.pre_lookahead_len < 0 or self.token_mel_ratio < 1:
            raise ValueError("stream_scale_factor and token_mel_ratio must be >= 1, pre_lookahead_len >= 0")

    def prompt_pad(self, num_prompt_tokens: int) -> int:
        """Tokens added to the first hop so prompt + first hop is a multiple of ``token_hop_len``."""
        hop = self.token_hop_len
        return -(-num_prompt_tokens // hop) * hop - num_prompt_tokens


@dataclass(frozen=True)
class StreamChunk:
    """One due chunk: run the flow on ``tokens[:end]`` and keep the mel from token ``offset`` on.

    Attributes:
        index: 0-based chunk number.
        offset: first new token (mel frames from ``offset · token_mel_ratio`` are new).
        end: tokens the flow sees (``offset + hop + look-ahead``, or all tokens when final).
        hop: new tokens covered (``end − offset − look-ahead``; all remaining when final).
        final: the last chunk (``finalize=True``, full attention).
    """

    index: int
    offset: int
    end: int
    hop: int
    final: bool


@dataclass
class StreamState:
    """Per-request streaming bookkeeping (see the module docstring).

    Args:
        schedule: the constants.
        num_prompt_tokens: P, the flow prompt's token count (0 for SFT speakers).
    """

    schedule: StreamSchedule
    num_prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    """Tokens for the flow so far (after silence thinning)."""
    offset: int = 0
    """Tokens whose mel has been produced."""
    hop: int = 0
    """Current hop (per request; grows after every chunk)."""
    chunks: int = 0
    """Chunks issued."""
    finished: bool = False

    def __post_init__(self) -> None:
        if self.hop == 0:
            self.hop = self.schedule.token_hop_len

    def _this_hop(self) -> int:
        # The prompt padding applies only to the first chunk.
        return self.hop + (self.schedule.prompt_pad(self.num_prompt_tokens) if self.offset == 0 else 0)

    def next_chunk(self) -> StreamChunk | None:
        """The next non-final chunk if enough tokens have arrived, else None; advances the state."""
        if self.finished:
            return None
        hop = self._this_hop()
        look = self.schedule.pre_lookahead_len
        if len(self.tokens) - self.offset < hop + look:
            return None
        chunk = StreamChunk(self.chunks, self.offset, self.offset + hop + look, hop, False)
        self.offset += hop
        self.hop = min(self.schedule.token_max_hop_len, self.hop * self.schedule.stream_scale_factor)
        self.chunks += 1
        return chunk

    def final_chunk(self) -> StreamChunk:
        """The closing chunk over every token (call once, after the LLM ended and no chunk is due)."""
        if self.finished:
            raise ValueError("this stream already issued its final chunk")
        self.finished = True
        chunk = StreamChunk(self.chunks, self.offset, len(self.tokens), len(self.tokens) - self.offset, True)
        self.offset = len(self.tokens)
        self.chunks += 1
        return chunk


@dataclass
class SilenceThinner:
    """Drops silent tokens beyond ``max_run`` consecutive ones (per request).

    Args:
        silent_tokens: ids counted as silence (the model's ``LLMConfig.silent_tokens``).
        max_run: consecutive silent tokens passed through before dropping (upstream: 5); 0 disables
            thinning entirely (every token passes).
    """

    silent_tokens: frozenset[int] = LLMConfig.silent_tokens
    max_run: int = 5
    run: int = 0
    dropped: int = 0

    def accept(self, token: int) -> bool:
        """Whether ``token`` goes to the flow."""
        if self.max_run <= 0:
            return True
        if token in self.silent_tokens:
            self.run += 1
            if self.run > self.max_run:
                self.dropped += 1
                return False
            return True
        self.run = 0
        return True

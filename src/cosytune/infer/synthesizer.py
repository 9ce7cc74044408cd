"""``Synthesizer``: text → 24 kHz speech with a CosyVoice 3 model dir, in every upstream mode, one segment.

Public API
    * ``Synthesizer.from_dir(model_dir, *, device, dtype="auto", llm_ckpt=None, flow_ckpt=None, fast_decode=None,
      fast_flow=None, fast_vocoder=None, compile_decode=False, warmup=None, stream_cache=False)`` loads the
      three networks strictly (optionally swapping ``llm.pt``/``flow.pt`` for other weight files, e.g. an
      epoch or averaged checkpoint, or the base ``flow.pt`` for "tuned LLM + base flow"), the tokenizer,
      the text normaliser and ``spk2info.pt``. ``Synthesizer(llm, flow, hift, tokenizer=...)`` assembles
      one from networks you built yourself (the golden tests do).
    * ``synthesize(text, *, mode, spk_id, prompt_text, prompt_wav, speaker, options) -> SynthesisResult``.
    * ``stream(...)`` (same arguments) yields :class:`AudioChunk` s as the LLM produces tokens, following
      upstream's chunk schedule (:mod:`cosytune.infer.streaming`). All state of a request lives in local
      variables of the generator: nothing is stored on the Synthesizer, no threads. (The only caches are
      the vocoder's fixed noise, grown lazily with a stable prefix, the lazily built text normaliser, the
      pool of idle LLM decoders and captured graphs below, and the prompt-wav features by content hash;
      none carries anything from one request to the next.)
    * Fast by default on a GPU (issue 14): ``from_dir(device="cuda")`` resolves ``dtype="auto"`` to bfloat16
      where the GPU supports it (float32 stays available: the parity mode), decodes the LLM with pooled
      CUDA-graph decoders that sample RAS from an in-graph softmax/sort (one transfer per token, same
      tokens), replays the flow solve per 64-frame bucket and the streamed vocoder chunks from CUDA graphs,
      and captures the common shapes once at load (:meth:`Synthesizer.warmup`). On the CPU all of it
      resolves to float32 and eager code. ``compile_decode`` (torch.compile of the decoder step) and
      ``stream_cache`` (streamed chunks solve only their own flow frames) are opt-in.
    * Fast LLM decoding (``fast_decode``; default on for CUDA, off on CPU): each request checks a batch-1
      :class:`~cosytune.infer.fast.GraphedDecoder` (preallocated KV cache, decode step replayed as a CUDA
      graph) out of :attr:`Synthesizer.decoder_pool`, a thread-safe :class:`DecoderPool`, and gives it back
      when its token generator finishes or is closed. Concurrent requests (threads, or interleaved
      streams in one thread) never share a decoder. Same seed → same tokens as the reference
      ``CosyVoice3LM.decode``. ``result.info["llm_decoder"]`` says which ran: ``graph`` (CUDA graph),
      ``static`` (the same static step run eagerly, CPU) or ``reference``.
    * Threads: any number may call :meth:`synthesize`/:meth:`stream` on one Synthesizer. Work that
      launches kernels holds :attr:`gate` shared and every CUDA graph capture holds it exclusively
      (:class:`~cosytune.infer.fast.DeviceGate`), so a capture made while other requests run cannot fail;
      the graphed flow sampler and the vocoder are used by one thread at a time (their own locks, always
      taken before the gate).
    * ``prepare(...) -> PreparedRequest`` (text front end, mode resolution, prompt features),
      ``generate_tokens``, ``tokens_to_mel``, ``mel_to_wav``: the stages, public so tests and tools can
      drive them one by one.
    * ``flow_inputs``, ``resolve_seed``, ``result_info``: the pieces :mod:`cosytune.infer.batch` shares with
      :meth:`Synthesizer.synthesize` (flow prompt of a request, the seed of a run, the result's ``info``).

One request (spec §2.5, §5.7, §6)
    1. Text: the spoken text is normalised without splitting (``TextNormalizer.normalize(split=False)``
       returns exactly one segment; never one per character) and tokenised.
    2. Mode → what conditions the LLM and the flow:

       ============== ====================================== ============================================
       mode           LLM input                              flow prompt
       ============== ====================================== ============================================
       sft            ``[sos] instruct + text [task]``       none; ``spk2info[spk]["embedding"]``
       zero_shot      ``[sos] prompt_text + text [task] P``  prompt tokens P + prompt mel + embedding
       cross_lingual  ``[sos] instruct + text [task]``       as zero_shot
       instruct2      ``[sos] prompt_text + text [task]``    as zero_shot
       ============== ====================================== ============================================

       ``instruct`` is ``--prompt_text`` when given, else ``options.instruct`` (the training instruct,
       ``You are a helpful assistant.<|endofprompt|>``). ``<|endofprompt|>`` must appear in the LLM text;
       a prompt text without it is an error that says how to fix it (upstream asserts).
       ``prompt_strategy="guide_prefix"``: the prompt text minus ``<|endofprompt|>`` is *spoken* first,
       joined to the text by ``guide_sep``; the LLM is then conditioned on ``options.instruct`` only
       (its prompt speech is dropped too, since its transcript is no longer in the LLM text).
    3. LLM decoding with RAS sampling from a ``torch.Generator`` seeded with ``options.seed`` (a random seed
       is drawn and reported when None, so every run can be repeated), through a pooled fast decoder or
       the reference decoder (same draws, same tokens). Silent tokens beyond 5 in a row
       are not given to the flow (upstream's CosyVoice 3 runtime).
    4. Flow (token → mel, fixed CFM noise) and HiFT (mel → wav, fixed source noise). Non-streaming: one
       flow call with full attention; ``speed ≠ 1`` time-stretches the mel linearly to ``int(T / speed)``
       frames before the vocoder (upstream; non-streaming only).

Modes are inferred when not given: ``--prompt_wav`` with ``--prompt_text`` → zero_shot, without →
cross_lingual; ``--spk_id`` of a zero-shot ``spk2info`` entry → zero_shot, of an SFT entry → sft.

Shapes: tokens (1, N) int64; mel (1, 80, 2N) float32; audio (samples,) float32 at 24 kHz in ±0.99.

Upstream reference (facts only): ``cosyvoice/cli/cosyvoice.py`` (``inference_*``),
``cosyvoice/cli/frontend.py``, ``cosyvoice/cli/model.py`` (``tts``, ``token2wav``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cosytune.errors import DataError, UsageError
from cosytune.infer.frontend import PromptFrontend, Speaker, speaker_from_spk2info
from cosytune.infer.streaming import SilenceThinner, StreamSchedule, StreamState
from cosytune.models.sampling import SamplingConfig
from cosytune.text.special import DEFAULT_INSTRUCT, ENDOFPROMPT


class UnknownSpeakerError(UsageError, DataError):
    """A ``--spk_id`` the model dir does not have: a usage error (exit code 2), listing the ids it has."""


#: Frame bucket of the graphed flow sampler (``fast_flow``): 64 mel frames = 1.28 s.
FLOW_BUCKET = 64
#: Flow shapes kept captured (LRU): non-streaming and streaming solves of every bucket up to ~40 s.
FLOW_MAX_GRAPHS = 64
#: Prompt + speech seconds whose flow buckets :meth:`Synthesizer.warmup` captures.
FLOW_WARMUP_SECONDS = 20.0
#: Streamed-chunk vocoder shapes kept captured (LRU).
VOCODER_MAX_GRAPHS = 32

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INSTRUCT",
    "ENDOFPROMPT",
    "MODES",
    "AudioChunk",
    "DecoderPool",
    "PreparedRequest",
    "SynthesisOptions",
    "SynthesisResult",
    "Synthesizer",
]

Mode = Literal["sft", "zero_shot", "instruct2", "cross_lingual"]
MODES: tuple[str, ...] = ("sft", "zero_shot", "instruct2", "cross_lingual")
PromptStrategy = Literal["default", "guide_prefix"]
PROMPT_STRATEGIES: tuple[str, ...] = ("default", "guide_prefix")
SAMPLE_RATE = 24000


@dataclass(frozen=True)
class SynthesisOptions:
    """Per-request settings (all optional; defaults reproduce upstream except where noted)."""

    speed: float = 1.0
    """Speaking-rate (time-stretch) factor, > 1 is faster; non-streaming only, as upstream."""
    seed: int | None = None
    """Seed of the LLM sampler: the same seed and inputs give the same audio on the same device; None
    draws one (reported in the result and in run.json)."""
    sampling: SamplingConfig | None = None
    """top_p/top_k/win_size/tau_r/temperature; None uses the model's yaml values."""
    text_frontend: bool = True
    """Normalise numbers, dates and symbols (wetext + inflect); false feeds the text to the tokenizer unchanged."""
    prompt_strategy: PromptStrategy = "default"
    """``default``: the prompt text conditions the LLM and is not spoken; ``guide_prefix``: the prompt text
    without <|endofprompt|> is spoken first, joined to the text by ``guide_sep``."""
    guide_sep: str = " "
    """Joins the spoken guide and the text under ``guide_prefix``."""
    instruct: str = DEFAULT_INSTRUCT
    """LLM prefix where no prompt text is given (sft, cross_lingual) and under ``guide_prefix``."""
    min_len_mode: Literal["all_stops", "upstream"] = "all_stops"
    """How min_len blocks stop ids (see ``cosytune.models.llm``); ``upstream`` = HEAD's bit-exact quirk."""
    max_silent_run: int = 5
    """Consecutive silent tokens kept for the flow (upstream 5); 0 keeps every token."""

    def check(self) -> None:
        """Raise UsageError on invalid values (all problems at once)."""
        problems = []
        if not (self.speed > 0 and np.isfinite(self.speed)):
            problems.append(f"speed must be a positive number, got {self.speed}")
        if self.prompt_strategy not in PROMPT_STRATEGIES:
            problems.append(f"prompt_strategy must be one of {', '.join(PROMPT_STRATEGIES)}, "
                            f"got {self.prompt_strategy!r}")
        if self.seed is not None and not 0 <= int(self.seed) < 2**63:
            problems.append(f"seed must be in [0, 2**63), got {self.seed}")
        if ENDOFPROMPT not in self.instruct:
            problems.append(f"instruct must contain {ENDOFPROMPT}, got {self.instruct!r}")
        if self.max_silent_run < 0:
            problems.append(f"max_silent_run must be >= 0, got {self.max_silent_run}")
        if problems:
            raise UsageError("invalid synthesis options: " + "; ".join(problems))


@dataclass
class PreparedRequest:
    """Everything a request feeds the networks (the output of :meth:`Synthesizer.prepare`)."""

    mode: str
    """Resolved mode."""
    text_ids: list[int]
    """Ids of the spoken text (what min_len/max_len count)."""
    llm_prompt_ids: list[int]
    """Ids before the spoken text in the LLM input (instruct or prompt text)."""
    llm_prompt_speech: list[int]
    """Prompt speech tokens in the LLM input (zero_shot only)."""
    speaker: Speaker
    """Flow conditioning (embedding; prompt tokens and mel unless sft)."""
    flow_prompt: bool
    """Whether the flow gets the speaker's prompt tokens/mel."""
    spoken_text: str
    """The normalised spoken text (not written to run.json)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Non-private facts for run.json (mode, lengths, speaker source, frontend branch)."""


@dataclass
class AudioChunk:
    """One piece of a streamed request."""

    audio: np.ndarray
    """(n,) float32 new samples (n may be 0)."""
    index: int
    """0-based chunk number."""
    final: bool
    """True for the last chunk of the request."""
    tokens: int
    """Speech tokens turned into audio so far."""
    elapsed_s: float
    """Seconds since the request started."""
    sample_rate: int = SAMPLE_RATE
    result: SynthesisResult | None = None
    """On the final chunk: the whole request's result (audio joined, timings, info)."""


@dataclass
class SynthesisResult:
    """A finished request."""

    audio: np.ndarray
    """(samples,) float32 at ``sample_rate``."""
    sample_rate: int
    tokens: list[int]
    """Speech tokens the LLM produced (before silence thinning)."""
    seed: int
    timings: dict[str, float]
    """``llm_s``, ``flow_s``, ``hift_s``, ``total_s``, ``audio_s``, ``rtf`` (+ ``first_chunk_s``)."""
    info: dict[str, Any]
    """Mode, lengths, sampling, speaker source... (no raw text)."""

    @property
    def duration_s(self) -> float:
        """Audio length in seconds."""
        return self.audio.shape[0] / self.sample_rate


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available in this torch build/machine; use --device cpu")
    return dev


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """The dtype of the LLM and flow: a torch dtype or its name as given, and for ``"auto"``/None bfloat16
    on a CUDA device that supports it (compute capability 8.0+), else float32 (every CPU).

    Raises:
        UsageError: an unknown name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = "auto" if dtype is None else str(dtype).replace("torch.", "")
    if name == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UsageError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return getattr(torch, name)


#: Dtype names accepted besides ``auto``.
DTYPES = ("float32", "bfloat16", "float16")

#: Linear capacity granularity of a :class:`DecoderPool` built with ``bucket=`` (tests, tools).
CAPACITY_BUCKET = 256

#: Default decoder capacities: powers of two from this many positions (few distinct graphs, so they can
#: all be captured at load; a step attends over at most twice the positions it needs, which costs
#: microseconds at batch 1).
MIN_POW2_CAPACITY = 512

#: Rows of a continuous-batching step (:class:`~cosytune.infer.batching.DecodeBatcher`) by default.
DECODE_ROWS = 16

#: Capacities :meth:`Synthesizer.warmup` prepares by default (each capped at the model's positions):
#: 512 holds a short prompt + ~400 tokens (16 s), 4096 a long prompt + 150 text tokens at 20x.
WARMUP_CAPACITIES = (512, 1024, 2048, 4096)

#: Why a request yields no audio when the LLM stops before its first speech token.
NO_SPEECH = ("the LLM produced no speech tokens for this text (it stopped at once); try another --seed, or check "
             "that the model dir and --llm_ckpt belong together")


def bucket_capacity(positions: int, limit: int, bucket: int | None = CAPACITY_BUCKET) -> int | None:
    """``positions`` rounded up to a multiple of ``bucket`` (None: to a power of two of at least
    ``MIN_POW2_CAPACITY``), capped at ``limit``; None past ``limit``.

    Decoders are built per capacity, so bucketing lets requests of similar length share one (and its
    captured graph).
    """
    if positions > limit:
        return None
    if bucket is None:
        cap = MIN_POW2_CAPACITY
        while cap < positions:
            cap *= 2
        return min(limit, cap)
    return min(limit, -(-int(positions) // bucket) * bucket)


#: Idle decoders kept per capacity bucket (the rest are dropped when returned, bounding memory). Enough
#: for a burst of concurrent requests to find their captured decoders again in the next burst.
MAX_IDLE_PER_BUCKET = 16


class DecoderPool:
    """Thread-safe pool of batch-1 :class:`~cosytune.infer.fast.GraphedDecoder` s, keyed by cache capacity.

    A request :meth:`acquire` s a decoder for the positions it needs (prompt + ``max_len``), rounded up to
    a power of two of at least ``MIN_POW2_CAPACITY`` (or to a multiple of ``bucket`` when one is given)
    and capped at the backbone's ``max_position_embeddings``, and :meth:`release` s it when done. A
    checked-out decoder belongs to one request only, so concurrent requests share no mutable state; an
    idle one is reused by the next request of the same bucket (its cache is reset by ``prefill``, and its
    captured CUDA graphs stay valid). Decoders are built lazily (graphs captured at first use, under the
    device gate's exclusive hold so that other requests' launches cannot break the capture) or ahead of
    time by :meth:`warm_up`; at most ``max_idle_per_bucket`` idle decoders are kept per bucket, so memory
    is bounded by the peak concurrency plus that many per bucket.

    Args:
        llm: the ``CosyVoice3LM`` (eval mode, on its device and dtype).
        use_graph: capture CUDA graphs (ignored on CPU, where the static step runs eagerly).
        compile_mode: ``torch.compile`` mode of the decoders' step (None: eager kernels in the graph).
        attention: the decoders' cache attention (see :class:`~cosytune.infer.fast.GraphedDecoder`).
        bucket: linear capacity granularity in positions; None (default): powers of two.
        max_idle_per_bucket: idle decoders kept per capacity.
        gate: the device's :class:`~cosytune.infer.fast.DeviceGate` (one is made when None).
    """

    def __init__(self, llm: Any, *, use_graph: bool = True, compile_mode: str | None = None,
                 bucket: int | None = None, max_idle_per_bucket: int = MAX_IDLE_PER_BUCKET,
                 gate: Any = None, attention: str | None = None) -> None:
        from cosytune.infer.fast import DeviceGate

        if (bucket is not None and bucket <= 0) or max_idle_per_bucket < 0:
            raise ValueError(f"bucket must be > 0 and max_idle_per_bucket >= 0, got {bucket}, {max_idle_per_bucket}")
        self.llm = llm
        self.use_graph = use_graph
        self.compile_mode = compile_mode
        self.attention = attention
        self.bucket = None if bucket is None else int(bucket)
        self.max_idle_per_bucket = int(max_idle_per_bucket)
        self.limit = int(llm.config.qwen2.max_position_embeddings)
        self.gate = gate if gate is not None else DeviceGate()
        self._lock = threading.Lock()
        self._idle: dict[int, list[Any]] = {}
        self._counts = {"created": 0, "reused": 0, "released": 0, "discarded": 0, "in_use": 0, "peak_in_use": 0,
                        "fallbacks": 0}
        # Pack the shared weights once, here, rather than in each decoder: decoders may be built by
        # concurrent requests, and packing rewrites the parameters' storage.
        llm.llm.model.model.pack_projections()

    def capacity_for(self, positions: int) -> int | None:
        """The bucketed capacity for ``positions`` cache positions, or None when it exceeds the limit."""
        return bucket_capacity(positions, self.limit, self.bucket)

    def _build(self, capacity: int) -> Any:
        from cosytune.infer.fast import GraphedDecoder

        return GraphedDecoder(self.llm, 1, capacity, use_graph=self.use_graph, pack=False,
                              compile_mode=self.compile_mode, gate=self.gate, sample_head=True,
                              lazy_prefill_graphs=False, attention=self.attention)

    def acquire(self, positions: int) -> Any | None:
        """Check out a decoder holding at least ``positions`` positions (None: too long, use the reference)."""
        capacity = self.capacity_for(positions)
        with self._lock:
            if capacity is None:
                self._counts["fallbacks"] += 1
                return None
            idle = self._idle.get(capacity)
            decoder = idle.pop() if idle else None
            self._counts["reused" if decoder is not None else "created"] += 1
            self._counts["in_use"] += 1
            self._counts["peak_in_use"] = max(self._counts["peak_in_use"], self._counts["in_use"])
        if decoder is None:  # built outside the lock: allocation must not block other requests' releases
            try:
                decoder = self._build(capacity)
            except BaseException:
                with self._lock:
                    self._counts["in_use"] -= 1
                raise
        return decoder

    def release(self, decoder: Any) -> None:
        """Give a decoder back (kept idle for reuse, or dropped when its bucket is full)."""
        capacity = int(decoder.cache.capacity)
        with self._lock:
            self._counts["in_use"] -= 1
            self._counts["released"] += 1
            idle = self._idle.setdefault(capacity, [])
            if len(idle) < self.max_idle_per_bucket:
                idle.append(decoder)
            else:
                self._counts["discarded"] += 1

    def warm_up(self, capacities: Sequence[int] = WARMUP_CAPACITIES, *, per_bucket: int = 1) -> int:
        """Build ``per_bucket`` idle decoders per capacity and capture their graphs now (step, and the
        prefill widths a prompt of that bucket can have: powers of two up to half the capacity, at most
        1024). Returns the graphs captured (0 on CPU). Costs tens of milliseconds per graph at full size.
        """
        from cosytune.infer.fast import warm_prefill_widths

        caps = sorted({c for c in (self.capacity_for(int(c)) for c in capacities) if c is not None})
        captured = 0
        for cap in caps:
            widths = warm_prefill_widths(cap)
            with self._lock:
                have = len(self._idle.get(cap, []))
            for _ in range(max(0, min(per_bucket, self.max_idle_per_bucket) - have)):
                decoder = self._build(cap)
                captured += decoder.warm_up(widths)
                with self._lock:
                    self._idle.setdefault(cap, []).append(decoder)
        return captured

    def stats(self) -> dict[str, Any]:
        """Counters (``created``, ``reused``, ``released``, ``discarded``, ``in_use``, ``peak_in_use``,
        ``fallbacks``) and ``idle``: {capacity: idle decoders}."""
        with self._lock:
            return {**self._counts, "idle": {c: len(v) for c, v in sorted(self._idle.items()) if v}}

    def clear(self) -> None:
        """Drop every idle decoder (frees their caches and graphs; checked-out ones are unaffected)."""
        with self._lock:
            self._idle.clear()


def _gated(items: Iterator[Any], gate: Any) -> Iterator[Any]:
    """``items`` advanced under ``gate.shared()`` one item at a time (never held across a yield, so a
    consumer that stops reading cannot hold a capture up)."""
    while True:
        with gate.shared():
            try:
                item = next(items)
            except StopIteration:
                return
        yield item


class Synthesizer:
    """CosyVoice 3 inference over loaded networks (see the module docstring).

    Args:
        llm: ``CosyVoice3LM`` in eval mode.
        flow: the flow network (``cosytune.models.flow``), eval mode.
        hift: ``HiFTGenerator``, eval mode (runs in float32).
        tokenizer: anything with ``encode(str) -> list[int]`` (``CosyVoice3Tokenizer``).
        normalizer: a ``TextNormalizer`` (built on first need when None).
        spk2info: the speaker table (``spk2info.pt`` contents).
        prompt_frontend: turns prompt wavs into speakers (None: prompt wavs are refused).
        sample_rate: output rate (the yaml's ``sample_rate``).
        schedule: streaming constants (the flow's ``pre_lookahead_len``/``token_mel_ratio``).
        model_files: name → {path, sha256} of the files loaded, for run.json.
        fast_decode: decode the LLM with pooled :class:`~cosytune.infer.fast.GraphedDecoder` s (same tokens
            as the reference). None (default) = on when the LLM is on CUDA, off on CPU (there the static
            step attends over the whole preallocated cache and gains nothing); True on CPU runs the static
            step eagerly (tests use it); False always uses ``CosyVoice3LM.decode``.
        fast_flow: replay the flow's 10-step CFG solve as a CUDA graph per 64-frame bucket
            (:class:`~cosytune.infer.fast.GraphedFlowSampler`, on a copy of the DiT whose small position
            convolutions run as one GEMM; same mel up to float rounding). None (default) = on for CUDA;
            ignored on CPU. A bucket not captured at load (:meth:`warmup`) is captured at first use.
        compile_decode: ``torch.compile`` the fast decoders' step before capturing it (fused norm / RoPE /
            residual kernels, fused cache attention: ~1.7 vs ~3.1 ms per token on an H100). Each decoder
            compiles once, which takes tens of seconds (paid by :meth:`warmup` at load when it runs), so it
            is off by default. Ignored on CPU.
        fast_vocoder: replay the vocoder of streamed chunks from CUDA graphs per chunk shape
            (:class:`~cosytune.infer.fast.GraphedVocoder`; the same kernels, so the same samples). None
            (default) = on for CUDA; ignored on CPU. Whole utterances and final chunks run eagerly (their
            lengths rarely repeat).
        speaker_cache: prompt wavs whose features are kept (by content hash), so a voice used again skips
            the prompt front end (CAM++ and the speech tokenizer); 0 turns the cache off.
        batch_decode: decode concurrent requests together (continuous batching: one
            :class:`~cosytune.infer.batching.DecodeBatcher` step per token for every request in flight, each
            row with its own sampler and generator; requests join and leave between steps). None (default)
            = on when ``fast_decode`` is on and the LLM is on CUDA; True on CPU runs it eagerly (tests).
            A request alone gets the tokens of a pooled decoder bit for bit; next to others its logits can
            differ in the last bits on a GPU (other GEMM shapes), so exact repeatability under load needs
            False. Requests with injected draws, a temperature other than 1 or a prompt beyond the
            largest capacity bucket use the pooled decoders.
        decode_rows: rows a batch step holds (requests decoded together per capacity bucket; more wait).
        decode_attention: the fast decoders' cache attention, a
            :data:`~cosytune.models.qwen2.CACHED_ATTENTION` kind; None (default): see
            :class:`~cosytune.infer.fast.GraphedDecoder`. On an H100 the default (SDPA, which picks cuDNN's
            kernel) was the fastest for graphed uncompiled steps: 2.5 ms per step at batch 1 against 2.7
            ("matmul") and 2.9 ("efficient").
        stream_cache: streamed non-final chunks compute only their own frames, keeping every earlier
            chunk's DiT keys/values per Euler step (:meth:`CausalMaskedDiffWithDiT.inference_chunk`; the
            same mel up to float rounding) instead of re-solving the whole prefix each chunk. Costs
            memory: about 1.8 MB per mel frame (90 MB per second of speech) at full size in bfloat16, held
            for the stream's life. Off by default: its chunk solves run eagerly, and on an H100 (full
            size, bf16) that is slower than replaying the graphed prefix solve at the lengths users stream
            (first chunk 754 vs 209 ms; streaming RTF 0.176 vs 0.132 at 14 s of speech). The final chunk
            always re-solves everything with full attention, as upstream.
    """

    def __init__(self, llm: Any, flow: Any, hift: Any, *, tokenizer: Any, normalizer: Any = None,
                 spk2info: Mapping[str, Mapping[str, Any]] | None = None,
                 prompt_frontend: PromptFrontend | None = None, sample_rate: int = SAMPLE_RATE,
                 schedule: StreamSchedule | None = None, model_files: dict[str, Any] | None = None,
                 fast_decode: bool | None = None, fast_flow: bool | None = None, compile_decode: bool = False,
                 fast_vocoder: bool | None = None, speaker_cache: int = 32, stream_cache: bool = False,
                 batch_decode: bool | None = None, decode_rows: int = DECODE_ROWS,
                 decode_attention: str | None = None) -> None:
        from cosytune.infer.fast import DeviceGate

        self.llm = llm
        self.flow = flow
        self.hift = hift
        self.tokenizer = tokenizer
        self._normalizer = normalizer
        self.spk2info = dict(spk2info or {})
        self.prompt_frontend = prompt_frontend
        self.sample_rate = sample_rate
        self.schedule = schedule or StreamSchedule()
        self.model_files = dict(model_files or {})
        self.device = next(llm.parameters()).device
        #: Parameter dtype of the LLM (float32 is the parity mode).
        self.dtype = next(llm.parameters()).dtype
        cuda = self.device.type == "cuda"
        self.endofprompt_id = int(getattr(llm.config, "endofprompt_id", 151646))
        #: Launches hold ``gate.shared()``, CUDA graph captures ``gate.exclusive()`` (concurrent requests
        #: cannot break a capture): see :class:`~cosytune.infer.fast.DeviceGate`.
        self.gate = DeviceGate()
        self.fast_decode = cuda if fast_decode is None else bool(fast_decode)
        #: torch.compile mode of the fast decoders' step (None: not compiled).
        self.decode_compile_mode = "default" if compile_decode and cuda else None
        #: Idle fast decoders (None when ``fast_decode`` is off); see :class:`DecoderPool`.
        self.decoder_pool: DecoderPool | None = (DecoderPool(llm, compile_mode=self.decode_compile_mode,
                                                             gate=self.gate, attention=decode_attention)
                                                 if self.fast_decode else None)
        #: The continuous-batching decoder (None when ``batch_decode`` is off); see :mod:`cosytune.infer.batching`.
        self.batcher: Any = None
        if self.fast_decode and (cuda if batch_decode is None else bool(batch_decode)):
            from cosytune.infer.batching import DecodeBatcher

            self.batcher = DecodeBatcher(llm, self.decoder_pool.capacity_for, max_rows=decode_rows,
                                         compile_mode=self.decode_compile_mode, gate=self.gate,
                                         attention=decode_attention)
        self.fast_flow = (cuda if fast_flow is None else bool(fast_flow)) and cuda
        self._flow_sampler: Any = None
        self._flow_lock = threading.Lock()  # one graphed solve at a time (its buffers are shared)
        if self.fast_flow:
            from cosytune.infer.fast import GraphedFlowSampler, fast_estimator

            self._flow_sampler = GraphedFlowSampler(flow.decoder, bucket=FLOW_BUCKET, gate=self.gate,
                                                    max_graphs=FLOW_MAX_GRAPHS,
                                                    estimator=fast_estimator(flow.decoder.estimator))
        self.fast_vocoder = (cuda if fast_vocoder is None else bool(fast_vocoder)) and cuda
        self._vocoder: Any = None
        # One vocoder call at a time: HiFT swaps module state per call (the functional float64 f0 predictor,
        # cached weight-norm parametrizations) and the graphed vocoder shares its buffers. Cheap next to
        # the LLM and the flow.
        self._vocoder_lock = threading.Lock()
        if self.fast_vocoder:
            from cosytune.infer.fast import GraphedVocoder

            self._vocoder = GraphedVocoder(hift, gate=self.gate, max_graphs=VOCODER_MAX_GRAPHS)
        self.stream_cache = bool(stream_cache)
        self.speaker_cache_size = max(0, int(speaker_cache))
        self._speakers: dict[str, Speaker] = {}  # content hash -> speaker, insertion order = recency
        self._speaker_lock = threading.Lock()
        #: What :meth:`warmup` did (graphs captured, seconds), empty until it runs.
        self.warmup_info: dict[str, Any] = {}

    def warmup(self, *, capacities: Sequence[int] = WARMUP_CAPACITIES, decoders_per_bucket: int = 1,
               flow_seconds: float = FLOW_WARMUP_SECONDS) -> dict[str, Any]:
        """Capture the CUDA graphs of common request shapes now, so no user request pays for a capture.

        * LLM: ``decoders_per_bucket`` idle decoders per capacity in ``capacities`` (step graph and the
          prefill graphs of the prompt widths that bucket can hold; with ``compile_decode`` each
          decoder's step is also compiled here).
        * Flow (``fast_flow``): the non-streaming and the streaming solve of every 64-frame bucket up to
          ``flow_seconds`` of prompt + speech.
        * The text normaliser (wetext's grammars load on first use, about a second).

        Measured on an H100 with the full-size model (bf16): 24 s for 25 decoder and 30 flow graphs; with
        ``compile_decode`` each of the four decoders also compiles (over two minutes in all). A no-op on
        CPU. Returns (and keeps in :attr:`warmup_info`) the counts and the seconds spent.
        """
        t0 = time.perf_counter()
        info: dict[str, Any] = {"decoder_graphs": 0, "flow_graphs": 0}
        if self.device.type != "cuda":
            self.warmup_info = {**info, "seconds": 0.0}
            return self.warmup_info
        if self.batcher is not None:  # the pooled decoders then serve only the rare requests it cannot take
            info["decoder_graphs"] = self.batcher.warm_up(capacities)
        elif self.decoder_pool is not None:
            info["decoder_graphs"] = self.decoder_pool.warm_up(capacities, per_bucket=decoders_per_bucket)
        if self._flow_sampler is not None:
            info["flow_graphs"] = self._warm_flow(flow_seconds)
        self.normalizer.normalize("Warm up 1, 2, 3.", split=False)
        info["seconds"] = time.perf_counter() - t0
        self.warmup_info = info
        logger.info("warm-up: %d decoder graphs, %d flow graphs in %.1f s", info["decoder_graphs"],
                    info["flow_graphs"], info["seconds"])
        return info

    @torch.inference_mode()
    def _warm_flow(self, seconds: float) -> int:
        flow = self.flow
        dtype = next(flow.parameters()).dtype
        dev = self.device
        n_mels = flow.config.output_size
        frames = min(int(seconds * 50), 14000)
        before = self._flow_sampler.captures
        spks = torch.zeros(1, n_mels, device=dev, dtype=dtype)
        for t in range(FLOW_BUCKET, frames + 1, FLOW_BUCKET):
            mu = torch.zeros(1, n_mels, t, device=dev, dtype=dtype)
            mask = torch.ones(1, 1, t, device=dev, dtype=dtype)
            for streaming in (False, True):
                with self._flow_lock, self.gate.shared():
                    self._flow_sampler(mu, mask, spks, mu, streaming=streaming)
        return self._flow_sampler.captures - before

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, *, device: str | torch.device | None = "cpu",
                 dtype: torch.dtype | str | None = "auto", llm_ckpt: str | os.PathLike | None = None,
                 flow_ckpt: str | os.PathLike | None = None, hash_files: bool = True,
                 upstream_noise: bool = False, fast_decode: bool | None = None,
                 fast_flow: bool | None = None, compile_decode: bool = False,
                 fast_vocoder: bool | None = None, warmup: bool | None = None,
                 speaker_cache: int = 32, stream_cache: bool = False,
                 batch_decode: bool | None = None, decode_attention: str | None = None) -> Synthesizer:
        """Load a model dir (upstream layout) strictly.

        Args:
            model_dir: the directory (``cosyvoice3.yaml``, ``llm.pt``, ``flow.pt``, ``hift.pt``, ONNX models,
                ``CosyVoice-BlankEN/``, optional ``spk2info.pt``).
            device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
            dtype: dtype of the LLM and flow (float32, bfloat16, float16, or ``"auto"``/None: bfloat16 on
                a GPU that supports it, else float32; see :func:`resolve_dtype`); HiFT stays float32.
                float32 is the parity mode (what the golden fixtures and upstream's CPU runs compare with).
            llm_ckpt: a weight file to load instead of ``llm.pt`` (epoch/step checkpoints and averaged
                files are accepted; ``epoch``/``step`` entries are ignored).
            flow_ckpt: a weight file to load instead of ``flow.pt``.
            hash_files: record the SHA-256 of every model file used (for run.json).
            upstream_noise: give the vocoder the fixed source noise upstream draws when it builds the
                model (bit-exact upstream parity; ~260 MB of CPU memory, 300 s cap per call). Default: the
                vocoder's own seeded noise (same distribution, different values).
            fast_decode: pooled fast LLM decoders; None = on for CUDA, off for CPU (see the class).
            fast_flow: graph-replayed flow solves; None = on for CUDA (see the class).
            compile_decode: compiled fast-decoder steps (see the class).
            fast_vocoder: graph-replayed vocoder for streamed chunks; None = on for CUDA (see the class).
            warmup: run :meth:`warmup` before returning (captures the common graphs once, at load: a few
                seconds on an H100, about a minute more with ``compile_decode``); None = on for CUDA.
            speaker_cache: prompt wavs whose features are kept (see the class).
            stream_cache: streamed chunks compute only their own flow frames (see the class).
            batch_decode: continuous batching of concurrent requests' LLM steps; None = on for CUDA (see
                the class).
            decode_attention: the fast decoders' cache attention (see the class).

        Raises:
            ModelDirError: missing or malformed files (all listed).
            CheckpointError: weights that do not match the networks (keys named).
        """
        from cosytune.fileio import sha256_file
        from cosytune.modeldir.model_dir import ModelDir

        dev = _resolve_device(device)
        dtype = resolve_dtype(dtype, dev)
        md = ModelDir.open(model_dir)
        hp = md.hparams
        weights = {"llm": Path(llm_ckpt) if llm_ckpt else md.weight_path("llm"),
                   "flow": Path(flow_ckpt) if flow_ckpt else md.weight_path("flow"),
                   "hift": md.weight_path("hift")}
        llm = md.load("llm", dev, dtype, weights=weights["llm"] if llm_ckpt else None)
        flow = md.load("flow", dev, dtype, weights=weights["flow"] if flow_ckpt else None)
        hift = md.load("hift", dev, None)
        if upstream_noise:
            f = hp.flow
            hift.use_upstream_noise(flow_vocab_size=f.vocab_size, flow_output_size=f.output_size,
                                    flow_spk_embed_dim=f.spk_embed_dim)
        tokenizer = md.load_tokenizer()
        spk2info = md.load_spk2info()
        frontend = PromptFrontend(md.campplus_path, md.speech_tokenizer_path,
                                  device="cuda" if dev.type == "cuda" else "cpu",
                                  token_mel_ratio=hp.flow.token_mel_ratio)
        schedule = StreamSchedule(token_hop_len=hp.chunk_size, pre_lookahead_len=hp.flow.pre_lookahead_len,
                                  token_mel_ratio=hp.flow.token_mel_ratio)
        files: dict[str, Any] = {}
        named = {"cosyvoice3.yaml": md.yaml_path, "llm": weights["llm"], "flow": weights["flow"],
                 "hift": weights["hift"]}
        if md.spk2info_path.is_file():
            named["spk2info.pt"] = md.spk2info_path
        for name, path in named.items():
            files[name] = {"path": str(Path(path).resolve()),
                           "sha256": sha256_file(path) if hash_files else None}
        files["llm"]["swapped"] = llm_ckpt is not None
        files["flow"]["swapped"] = flow_ckpt is not None
        logger.info("loaded %s on %s (%s)%s%s", md.path, dev, str(dtype).replace("torch.", ""),
                    f", llm from {llm_ckpt}" if llm_ckpt else "", f", flow from {flow_ckpt}" if flow_ckpt else "")
        synth = cls(llm, flow, hift, tokenizer=tokenizer, spk2info=spk2info, prompt_frontend=frontend,
                    sample_rate=hp.sample_rate, schedule=schedule, model_files=files, fast_decode=fast_decode,
                    fast_flow=fast_flow, compile_decode=compile_decode, fast_vocoder=fast_vocoder,
                    speaker_cache=speaker_cache, stream_cache=stream_cache, batch_decode=batch_decode,
                    decode_attention=decode_attention)
        if warmup if warmup is not None else dev.type == "cuda":
            synth.warmup()
        return synth

    @property
    def normalizer(self) -> Any:
        """The text normaliser (wetext is imported on first use)."""
        if self._normalizer is None:
            from cosytune.text.normalize import TextNormalizer

            self._normalizer = TextNormalizer(token_counter=lambda s: len(self.tokenizer.encode(s)))
        return self._normalizer

    # ---------------------------------------------------------------------------------- speakers
    def speaker_by_id(self, spk_id: str) -> Speaker:
        """The ``spk2info.pt`` speaker ``spk_id``.

        Raises:
            UnknownSpeakerError: unknown id (the available ids are listed); a usage error (exit 2).
        """
        if spk_id not in self.spk2info:
            if self.spk2info:
                shown = ", ".join(sorted(map(str, self.spk2info))[:50])
                more = f" (and {len(self.spk2info) - 50} more)" if len(self.spk2info) > 50 else ""
                raise UnknownSpeakerError(f"unknown speaker id {spk_id!r}; spk2info.pt has: {shown}{more}")
            raise UnknownSpeakerError(f"unknown speaker id {spk_id!r}: this model dir has no speakers (spk2info.pt is absent "
                            "or empty). Add one with 'cosytune spk2info', or use --prompt_wav/--prompt_text")
        return speaker_from_spk2info(spk_id, self.spk2info[spk_id])

    def speaker_from_wav(self, prompt_wav: str | os.PathLike) -> Speaker:
        """Prompt features of a wav (tokens, mel, embedding).

        Raises:
            DataError: unreadable or unusable wav; UsageError: no ONNX front end available.
        """
        if self.prompt_frontend is None:
            raise UsageError("this Synthesizer has no prompt front end (campplus.onnx, speech_tokenizer_v3.onnx); "
                             "build it with Synthesizer.from_dir to use prompt wavs")
        key = None
        if self.speaker_cache_size:
            import hashlib

            try:
                key = hashlib.sha256(Path(prompt_wav).read_bytes()).hexdigest()
            except OSError:
                key = None  # the front end reports the unreadable file in its own words
        if key is not None:
            with self._speaker_lock:
                cached = self._speakers.pop(key, None)
                if cached is not None:
                    self._speakers[key] = cached
                    return cached
        with self.gate.shared():
            speaker = self.prompt_frontend.speaker_from_wav(prompt_wav)
        if key is not None:
            with self._speaker_lock:
                self._speakers[key] = speaker
                while len(self._speakers) > self.speaker_cache_size:
                    self._speakers.pop(next(iter(self._speakers)))
        return speaker

    # ---------------------------------------------------------------------------------- preparation
    def _prompt_ids(self, prompt_text: str, what: str, *, transcript_hint: bool = False) -> list[int]:
        if ENDOFPROMPT not in prompt_text:
            example = (f"'{DEFAULT_INSTRUCT}<transcript of the prompt wav>'" if transcript_hint
                       else f"'{DEFAULT_INSTRUCT}' or an instruction such as "
                            f"'Please speak as fast as possible.{ENDOFPROMPT}'")
            raise DataError(f"{what} {prompt_text[:60]!r} lacks {ENDOFPROMPT}: CosyVoice 3 needs it between the "
                            f"instruction and what follows. Write e.g. {example}")
        return list(self.tokenizer.encode(prompt_text))

    def resolve_mode(self, mode: str | None, *, spk_id: str | None, prompt_text: str | None,
                     prompt_wav: str | os.PathLike | None, speaker: Speaker | None = None) -> str:
        """The mode a request runs in (given, or inferred from what was passed).

        Raises:
            UsageError: an unknown mode, or inputs that do not fit it.
        """
        if mode is not None and mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        given = [n for n, v in (("--spk_id", spk_id), ("--prompt_wav", prompt_wav), ("speaker", speaker))
                 if v is not None]
        if len(given) > 1:
            raise UsageError(f"give only one of {' / '.join(given)}: a stored speaker or a prompt wav")
        if not given:
            raise UsageError("no voice given: pass --spk_id (a speaker of spk2info.pt) or --prompt_wav "
                             "(with --prompt_text for zero-shot)")
        if mode is None:
            if prompt_wav is not None:
                return "zero_shot" if prompt_text is not None else "cross_lingual"
            spk = speaker if speaker is not None else self.speaker_by_id(spk_id)  # type: ignore[arg-type]
            return "zero_shot" if spk.has_prompt_speech else "sft"
        if mode == "instruct2" and prompt_text is None:
            raise UsageError("--mode instruct2 needs --prompt_text: the instruction, ending with "
                             f"{ENDOFPROMPT} (e.g. 'Please speak slowly.{ENDOFPROMPT}')")
        if mode == "zero_shot" and prompt_wav is not None and prompt_text is None:
            raise UsageError("--mode zero_shot needs --prompt_text: the prompt wav's transcript after the "
                             f"instruction, e.g. '{DEFAULT_INSTRUCT}<transcript>'; without it use "
                             "--mode cross_lingual")
        return mode

    def prepare(self, text: str, *, mode: str | None = None, spk_id: str | None = None,
                prompt_text: str | None = None, prompt_wav: str | os.PathLike | None = None,
                speaker: Speaker | None = None, options: SynthesisOptions | None = None) -> PreparedRequest:
        """Text front end, mode resolution and prompt features of one request.

        Args:
            text: the text to speak (one segment; it is never split).
            mode: ``sft``, ``zero_shot``, ``instruct2``, ``cross_lingual`` or None (inferred).
            spk_id: a speaker of ``spk2info.pt``.
            prompt_text: instruction / prompt transcript, with ``<|endofprompt|>``.
            prompt_wav: a prompt clip (zero_shot, instruct2, cross_lingual).
            speaker: an already prepared :class:`Speaker` (instead of ``spk_id``/``prompt_wav``).
            options: :class:`SynthesisOptions`.

        Raises:
            DataError: empty or punctuation-only text, missing ``<|endofprompt|>``, unknown speaker,
                unreadable prompt wav. UsageError: inconsistent arguments.
        """
        options = options or SynthesisOptions()
        options.check()
        if not isinstance(text, str):
            raise UsageError(f"text must be a str, got {type(text).__name__}")
        mode = self.resolve_mode(mode, spk_id=spk_id, prompt_text=prompt_text, prompt_wav=prompt_wav,
                                 speaker=speaker)
        if speaker is None:
            speaker = self.speaker_from_wav(prompt_wav) if prompt_wav is not None else self.speaker_by_id(spk_id)  # type: ignore[arg-type]
        if mode != "sft" and not speaker.has_prompt_speech:
            raise UsageError(f"mode {mode} needs prompt speech, but speaker {speaker.source!r} is an SFT entry "
                             "(embedding only); use --mode sft, or pass --prompt_wav")

        # Spoken text (never split: one request, one segment).
        spoken = text
        guide = options.prompt_strategy == "guide_prefix"
        if guide:
            if prompt_text is None:
                raise UsageError("--prompt_strategy guide_prefix speaks the prompt text first; pass --prompt_text")
            guide_text = prompt_text.replace(ENDOFPROMPT, "").strip()
            spoken = f"{guide_text}{options.guide_sep}{text}" if guide_text else text
        segments = self.normalizer.normalize(spoken, split=False, enabled=options.text_frontend)
        if len(segments) != 1:  # the normaliser guarantees one segment; never synthesise per character
            raise AssertionError(f"text front end returned {len(segments)} segments for split=False")
        spoken_norm = segments[0]
        self._check_speakable(spoken_norm)
        text_ids = list(self.tokenizer.encode(spoken_norm))

        # What precedes the spoken text in the LLM input.
        stored_prompt = speaker.prompt_text_ids
        if guide:
            llm_prompt_ids = self._prompt_ids(options.instruct, "instruct")
            llm_speech: list[int] = []
        elif mode == "zero_shot":
            if prompt_text is not None:
                if stored_prompt is not None:
                    logger.warning("--prompt_text replaces the prompt text stored with speaker %s", speaker.source)
                llm_prompt_ids = self._prompt_ids(prompt_text, "--prompt_text", transcript_hint=True)
            elif stored_prompt is not None:
                llm_prompt_ids = list(stored_prompt)
            else:
                raise UsageError("zero_shot needs the prompt wav's transcript: pass --prompt_text "
                                 f"'{DEFAULT_INSTRUCT}<transcript>'")
            llm_speech = speaker.speech_token.reshape(-1).tolist()
        else:
            if prompt_text is not None:
                llm_prompt_ids = self._prompt_ids(prompt_text, "--prompt_text")
            elif ENDOFPROMPT in spoken_norm:
                llm_prompt_ids = []  # upstream style: the instruct is already part of the text
            else:
                llm_prompt_ids = self._prompt_ids(options.instruct, "instruct")
            llm_speech = []
        if self.endofprompt_id not in llm_prompt_ids + text_ids:
            raise DataError(f"{ENDOFPROMPT} is in neither the prompt text nor the text; CosyVoice 3 needs it. "
                            f"Pass --prompt_text '{DEFAULT_INSTRUCT}' (plus the transcript in zero-shot mode)")
        self._check_length(text, llm_prompt_ids, text_ids, llm_speech)
        info = {
            "mode": mode,
            "speaker": speaker.source,
            "prompt_strategy": options.prompt_strategy,
            "text_frontend": options.text_frontend,
            "text_chars": len(text),
            "text_tokens": len(text_ids),
            "llm_prompt_tokens": len(llm_prompt_ids),
            "llm_prompt_speech_tokens": len(llm_speech),
            "flow_prompt_tokens": speaker.num_prompt_tokens if mode != "sft" else 0,
        }
        return PreparedRequest(mode, text_ids, llm_prompt_ids, llm_speech, speaker, mode != "sft", spoken_norm, info)

    def _check_length(self, text: str, prompt_ids: list[int], text_ids: list[int], speech: list[int]) -> None:
        """One segment must fit the LLM's positions: prompt + text + up to ``max_token_text_ratio`` speech tokens
        per text token. Longer texts get a message with the limit (and the way to say more), not a traceback."""
        cfg = self.llm.config
        limit = cfg.qwen2.max_position_embeddings
        need = 2 + len(prompt_ids) + len(text_ids) + len(speech) + int(len(text_ids) * cfg.max_token_text_ratio)
        if need <= limit:
            return
        room = (limit - 2 - len(prompt_ids) - len(speech)) / (1 + cfg.max_token_text_ratio)
        chars = int(room * len(text) / max(len(text_ids), 1))
        raise DataError(
            f"the text is too long for one segment: {len(text)} characters ({len(text_ids)} text tokens) may need "
            f"{need} LLM positions, and the model has {limit}. One segment can hold about {int(room)} text tokens "
            f"(~{chars} characters of this text). Split it into several segments, one per line, and synthesise "
            "them with 'cosytune infer-batch' (it can --join them into one wav)")

    @staticmethod
    def _check_speakable(spoken: str) -> None:
        import re

        from cosytune.text.normalize import is_only_punctuation

        # Upstream-style text carries its instruction before <|endofprompt|>; only what follows is spoken.
        spoken = spoken.rsplit(ENDOFPROMPT, 1)[-1]
        rest = re.sub(r"<\|[^|]*\|>", "", spoken).strip()
        if not rest or is_only_punctuation(rest):
            raise DataError("the text has nothing to speak (empty, or only punctuation/special tokens); expected "
                            "at least one word after any instruction")

    # ---------------------------------------------------------------------------------- stages
    def generate_tokens(self, req: PreparedRequest, options: SynthesisOptions, seed: int,
                        draw_q: Any = None, *, info: dict[str, Any] | None = None) -> Iterator[int]:
        """Speech tokens of the LLM for ``req`` (the stop id is not yielded).

        With ``fast_decode`` a decoder is checked out of :attr:`decoder_pool` when the generator starts and
        returned when it finishes or is closed (``try``/``finally``), so an abandoned stream frees it too. A
        prompt whose prompt + ``max_len`` exceeds ``max_position_embeddings`` uses the reference decoder.

        Args:
            req: from :meth:`prepare`.
            options: sampling, min_len_mode.
            seed: seeds a fresh ``torch.Generator`` on the LLM's device for this request.
            draw_q: inject Exp(1) draws (tests; see ``cosytune.models.sampling``).
            info: when given, ``info["llm_decoder"]`` is set to ``graph``, ``static`` or ``reference``.
        """
        with self.gate.shared():
            prompt = self.llm.build_prompt(req.text_ids, req.llm_prompt_ids, req.llm_prompt_speech)
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        batcher = self.batcher
        sampling = options.sampling or self.llm.config.sampling
        if batcher is not None and draw_q is None and sampling.temperature == 1.0 and batcher.accepts(prompt):
            if info is not None:
                info["llm_decoder"] = "batched"
            steps = batcher.decode(prompt, sampling=sampling, generator=generator,
                                   min_len_mode=options.min_len_mode)
            try:
                # Not gated: the loop thread launches the work; a consumer waiting under a shared hold
                # would block the loop's captures.
                for step in steps:
                    if step.stop:
                        return
                    yield step.token_id
            finally:
                steps.close()
            return
        pool = self.decoder_pool
        decoder = pool.acquire(int(prompt.lm_input.shape[1]) + int(prompt.max_len)) if pool is not None else None
        steps = None
        try:
            if decoder is None:
                kind, source = "reference", self.llm
            else:
                kind, source = ("graph" if self.device.type == "cuda" else "static"), decoder
            if info is not None:
                info["llm_decoder"] = kind
            steps = source.decode(prompt, sampling=options.sampling, generator=generator, draw_q=draw_q,
                                  min_len_mode=options.min_len_mode)
            for step in _gated(steps, self.gate):
                if step.stop:
                    return
                yield step.token_id
        finally:
            if steps is not None:
                steps.close()
            if decoder is not None:
                pool.release(decoder)

    def flow_inputs(self, req: PreparedRequest) -> tuple[Tensor, Tensor, Tensor]:
        """The flow prompt of a request on this device: ``(prompt_token (1, P), prompt_feat (1, 2P, 80),
        embedding (1, 192))``; P = 0 when the mode has no flow prompt (sft)."""
        spk = req.speaker
        dev = self.device
        with self.gate.shared():
            if req.flow_prompt:
                return (spk.speech_token.to(dev, torch.int64), spk.speech_feat.to(dev), spk.embedding.to(dev))
            return (torch.zeros(1, 0, dtype=torch.int64, device=dev), torch.zeros(1, 0, spk.speech_feat.shape[-1],
                    device=dev), spk.embedding.to(dev))

    def tokens_to_mel(self, tokens: list[int] | Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                      *, streaming: bool, finalize: bool) -> Tensor:
        """Flow inference on prompt + ``tokens``; returns the mel of ``tokens`` only.

        Args:
            tokens: speech tokens (list or (1, N)); when not finalizing the last ``pre_lookahead_len`` are
                look-ahead context only and get no mel.
            prompt_token: (1, P) flow prompt tokens (P may be 0).
            prompt_feat: (1, 2P, 80) prompt mel.
            embedding: (1, 192) speaker embedding.
            streaming: chunk-masked attention (non-final streaming chunks).
            finalize: whether the tokens end the utterance.

        Returns:
            (1, 80, frames) float32.
        """
        dev = self.device
        tok = tokens if isinstance(tokens, Tensor) else torch.tensor([list(tokens)], dtype=torch.int64)
        tok = tok.to(dev, torch.int64).reshape(1, -1)
        dtype = next(self.flow.parameters()).dtype
        # The flow lock (graphed sampler only) is taken before the gate: a thread never waits for it
        # while holding the gate, so a capture (which waits for every gate holder) cannot deadlock.
        lock = self._flow_lock if self._flow_sampler is not None else contextlib.nullcontext()
        with torch.inference_mode(), lock, self.gate.shared():
            args = (tok, prompt_token.to(dev, torch.int64), prompt_feat.to(dev, dtype), embedding.to(dev, dtype))
            if self._flow_sampler is not None:
                # The graphed sampler returns its own buffer: copy it out inside the lock.
                mel = self.flow.inference(*args, streaming=streaming, finalize=finalize,
                                          sampler=self._flow_sampler).clone()
            else:
                mel = self.flow.inference(*args, streaming=streaming, finalize=finalize)
            mel = mel[0] if isinstance(mel, tuple) else mel
            return mel.float()

    def tokens_to_mel_chunk(self, tokens: list[int], prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                            cache: Any) -> Tensor:
        """A non-final streamed chunk through the flow's cache (``stream_cache``): the mel of the frames after
        those ``cache`` holds; ``tokens`` are every token so far plus the look-ahead ones. (1, 80, frames)."""
        dev = self.device
        dtype = next(self.flow.parameters()).dtype
        tok = torch.tensor([list(tokens)], dtype=torch.int64)
        with torch.inference_mode(), self.gate.shared():
            mel = self.flow.inference_chunk(tok.to(dev), prompt_token.to(dev, torch.int64), prompt_feat.to(dev, dtype),
                                            embedding.to(dev, dtype), cache)
            return mel.float()

    def mel_to_wav(self, mel: Tensor, *, speed: float = 1.0) -> Tensor:
        """Vocode a whole utterance (``finalize=True``), time-stretching the mel first when ``speed ≠ 1``.

        Returns:
            (samples,) float32 on the CPU.
        """
        with self._vocoder_lock, self.gate.shared():  # lock before gate: see tokens_to_mel
            mel = mel.float()
            if speed != 1.0:
                frames = int(mel.shape[2] / speed)
                if frames < 1:
                    raise DataError(f"speed {speed} leaves no mel frames of {mel.shape[2]}; use a smaller --speed")
                mel = F.interpolate(mel, size=frames, mode="linear")
            return self.hift.inference(mel, finalize=True).wav[0].detach().cpu()

    def vocode_stream(self, state: Any, mel_chunk: Tensor, finalize: bool) -> Tensor:
        """``hift.stream_step`` (same samples), with non-final chunks replayed from the graphed vocoder
        when ``fast_vocoder`` is on. Returns (1, n) new samples on the CPU."""
        if self._vocoder is None or finalize:
            with self._vocoder_lock, self.gate.shared():
                return self.hift.stream_step(state, mel_chunk, finalize=finalize).detach().cpu()
        if state.finished:
            raise ValueError("this HiFT stream was already finalized; start a new HiFTStreamState")
        with self._vocoder_lock, self.gate.shared():  # lock before gate: see tokens_to_mel
            state.mel = mel_chunk if state.mel is None else torch.cat([state.mel, mel_chunk], dim=2)
            if state.mel.shape[2] <= self.hift.config.chunk_trim_frames:
                return torch.zeros(state.mel.shape[0], 0)
            wav = self._vocoder(state.mel, finalize=False).wav
            new = wav[:, state.emitted_samples:].detach().cpu()
        state.emitted_samples += new.shape[1]
        return new

    # ---------------------------------------------------------------------------------- requests
    @staticmethod
    def resolve_seed(options: SynthesisOptions) -> int:
        """The seed a run uses: ``options.seed``, or a fresh random one (reported in the result)."""
        return int(options.seed) if options.seed is not None else secrets.randbits(63)

    def result_info(self, req: PreparedRequest, options: SynthesisOptions, tokens: list[int], flow_tokens: int,
                    thinner: SilenceThinner, stream: bool) -> dict[str, Any]:
        """The ``info`` dict of a :class:`SynthesisResult`: the request's info plus sampler and token counts."""
        sampling = options.sampling or self.llm.config.sampling
        info = dict(req.info)
        info.update({
            "stream": stream,
            "speed": options.speed,
            "sampling": {k: getattr(sampling, k) for k in ("top_p", "top_k", "win_size", "tau_r", "temperature")},
            "min_len_mode": options.min_len_mode,
            "speech_tokens": len(tokens),
            "flow_tokens": flow_tokens,
            "silent_tokens_dropped": thinner.dropped,
            "guide_sep": options.guide_sep if options.prompt_strategy == "guide_prefix" else None,
        })
        return info

    def synthesize(self, text: str, *, mode: str | None = None, spk_id: str | None = None,
                   prompt_text: str | None = None, prompt_wav: str | os.PathLike | None = None,
                   speaker: Speaker | None = None, options: SynthesisOptions | None = None,
                   on_token: Callable[[int], None] | None = None) -> SynthesisResult:
        """Synthesise one segment (non-streaming). Arguments as :meth:`prepare`; ``on_token(n)`` is called
        after each of the LLM's speech tokens (n so far), e.g. for a progress display on long texts.

        Returns:
            :class:`SynthesisResult` (audio, tokens, seed, timings, info).

        Raises:
            DataError / UsageError: see :meth:`prepare`; DataError when the LLM produces no speech.
        """
        options = options or SynthesisOptions()
        t0 = time.perf_counter()
        req = self.prepare(text, mode=mode, spk_id=spk_id, prompt_text=prompt_text, prompt_wav=prompt_wav,
                           speaker=speaker, options=options)
        seed = self.resolve_seed(options)
        t1 = time.perf_counter()
        decoder_info: dict[str, Any] = {}
        tokens: list[int] = []
        for token in self.generate_tokens(req, options, seed, info=decoder_info):
            tokens.append(token)
            if on_token is not None:
                on_token(len(tokens))
        thinner = SilenceThinner(self.llm.config.silent_tokens, options.max_silent_run)
        flow_tokens = [t for t in tokens if thinner.accept(t)]
        if not flow_tokens:
            raise DataError(NO_SPEECH)
        t2 = time.perf_counter()
        mel = self.tokens_to_mel(flow_tokens, *self.flow_inputs(req), streaming=False, finalize=True)
        t3 = time.perf_counter()
        wav = self.mel_to_wav(mel, speed=options.speed)
        t4 = time.perf_counter()
        audio = wav.numpy().astype(np.float32, copy=False)
        audio_s = audio.shape[0] / self.sample_rate
        timings = {"prepare_s": t1 - t0, "llm_s": t2 - t1, "flow_s": t3 - t2, "hift_s": t4 - t3, "total_s": t4 - t0,
                   "audio_s": audio_s, "rtf": (t4 - t0) / audio_s if audio_s else float("inf")}
        info = self.result_info(req, options, tokens, len(flow_tokens), thinner, stream=False)
        info.update(decoder_info)
        return SynthesisResult(audio, self.sample_rate, tokens, seed, timings, info)

    def stream(self, text: str, *, mode: str | None = None, spk_id: str | None = None,
               prompt_text: str | None = None, prompt_wav: str | os.PathLike | None = None,
               speaker: Speaker | None = None, options: SynthesisOptions | None = None) -> Iterator[AudioChunk]:
        """Synthesise one segment in chunks, yielding audio as soon as each chunk is ready.

        Arguments as :meth:`prepare`; ``options.speed`` must be 1 (upstream's rule: a time-stretch needs the
        whole mel). The concatenated chunks have the same length as :meth:`synthesize`'s audio for the same
        tokens; the last chunk carries the whole :class:`SynthesisResult` in ``.result``.

        Raises:
            UsageError: ``speed ≠ 1``; otherwise as :meth:`synthesize`.
        """
        options = options or SynthesisOptions()
        if options.speed != 1.0:
            raise UsageError(f"--speed {options.speed} cannot be used with --stream: the time-stretch needs the "
                             "whole mel (upstream has the same rule). Drop --stream or --speed")
        from cosytune.models.hift import HiFTStreamState

        t0 = time.perf_counter()
        req = self.prepare(text, mode=mode, spk_id=spk_id, prompt_text=prompt_text, prompt_wav=prompt_wav,
                           speaker=speaker, options=options)
        seed = self.resolve_seed(options)
        prepare_s = time.perf_counter() - t0
        prompt_token, prompt_feat, embedding = self.flow_inputs(req)
        state = StreamState(self.schedule, int(prompt_token.shape[1]))
        thinner = SilenceThinner(self.llm.config.silent_tokens, options.max_silent_run)
        vocoder = HiFTStreamState()
        ratio = self.schedule.token_mel_ratio
        tokens: list[int] = []
        pieces: list[np.ndarray] = []
        times = {"llm_s": 0.0, "flow_s": 0.0, "hift_s": 0.0}
        first_chunk_s: float | None = None

        flow_cache = None
        if self.stream_cache:
            from cosytune.models.flow import FlowStreamCache

            flow_cache = FlowStreamCache(self.flow.config.n_timesteps)

        def render(chunk) -> AudioChunk:
            nonlocal first_chunk_s
            ta = time.perf_counter()
            if flow_cache is not None and not chunk.final:
                mel = self.tokens_to_mel_chunk(state.tokens[: chunk.end], prompt_token, prompt_feat, embedding,
                                               flow_cache)
            else:
                mel = self.tokens_to_mel(state.tokens[: chunk.end], prompt_token, prompt_feat, embedding,
                                         streaming=not chunk.final, finalize=chunk.final)[:, :, chunk.offset * ratio:]
            tb = time.perf_counter()
            new = self.vocode_stream(vocoder, mel.float(), finalize=chunk.final)[0].numpy()
            tc = time.perf_counter()
            times["flow_s"] += tb - ta
            times["hift_s"] += tc - tb
            new = new.astype(np.float32, copy=False)
            pieces.append(new)
            elapsed = tc - t0
            if first_chunk_s is None:
                first_chunk_s = elapsed
            return AudioChunk(new, chunk.index, chunk.final, chunk.offset + chunk.hop, elapsed, self.sample_rate)

        tl = time.perf_counter()
        decoder_info: dict[str, Any] = {}
        for token in self.generate_tokens(req, options, seed, info=decoder_info):
            tokens.append(token)
            if not thinner.accept(token):
                continue
            state.tokens.append(token)
            chunk = state.next_chunk()
            if chunk is not None:
                times["llm_s"] += time.perf_counter() - tl
                yield render(chunk)
                tl = time.perf_counter()
        times["llm_s"] += time.perf_counter() - tl
        # After the LLM ends, the remaining due chunks come first (upstream's loop), then the final one.
        while (chunk := state.next_chunk()) is not None:
            yield render(chunk)
        if not state.tokens:
            raise DataError(NO_SPEECH)
        last = render(state.final_chunk())
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        total = time.perf_counter() - t0
        audio_s = audio.shape[0] / self.sample_rate
        timings = {"prepare_s": prepare_s, **times, "total_s": total, "audio_s": audio_s,
                   "rtf": total / audio_s if audio_s else float("inf"), "first_chunk_s": first_chunk_s or total,
                   "chunks": state.chunks}
        info = self.result_info(req, options, tokens, len(state.tokens), thinner, stream=True)
        info.update(decoder_info)
        last.result = SynthesisResult(audio, self.sample_rate, tokens, seed, timings, info)
        yield last

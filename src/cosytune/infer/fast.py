"""GPU inference speed paths: a CUDA-graph LLM decode step, a batched CFG flow sampler, compile helpers.

Role
    Optional fast paths for synthesis. Each one computes what the reference path computes
    (``CosyVoice3LM.step_logp``, ``CausalConditionalCFM.sample``, ``HiFTGenerator.inference``); they
    only remove launch overhead (CUDA graphs, ``torch.compile``), batch rows, or lower precision on
    request. Everything also runs on CPU (graphs and compile switch off there), so callers need no
    device-specific branches.

Public API (for ``cosytune.infer`` and ``benchmarks/bench_infer.py``)
    * :class:`GraphedDecoder`: owns a preallocated :class:`~cosytune.models.qwen2.KVCache` for
      (batch B, capacity S) and a static-shape single-token step; on CUDA the step is captured once
      (or ahead of time by ``warm_up``) and replayed. ``prefill`` -> ``step`` / ``step_argmax`` /
      ``decode`` (RAS from the in-graph softmax/sort with ``sample_head``: :func:`sample_decode`).
    * :class:`DeviceGate`: launches shared, captures exclusive (see "Threads").
    * :func:`batched_cfg_sample`: Euler + classifier-free guidance for B utterances at once; the
      estimator sees one (2B, ...) batch per step (rows 0..B-1 conditional, B..2B-1 unconditional).
    * :func:`compile_flow_estimator`, :func:`compile_hift`: wrap in ``torch.compile`` (no-ops on CPU
      unless forced).

Layouts / shape legend
    B rows (utterances), S cache positions, V_sp speech vocab (+ specials), T mel frames, 80 mel bins.
    token ids (B,) int64; log-probs (B, V_sp) float32; mel (B, 80, T).

Sampling. A decoder built with ``sample_head`` also runs, inside its graph, the min-length masking,
the softmax and its stable sort; :func:`sample_decode` then reads the top-k head and the Exp(1) draws
in one transfer per token and picks exactly as ``ras_sample`` does (the id has to reach the host
anyway: stop detection and the streaming hand-off to the flow). Only a repetition redraw, which needs
the pick first as upstream, costs a second transfer. :meth:`GraphedDecoder.step_argmax` keeps a greedy
loop entirely on the device (no sync) for benchmarks with a fixed token count.

Threads. :class:`DeviceGate` is a readers-writer lock per device: request work that launches kernels
holds it shared, every capture (:func:`capture_graph`) exclusively, so concurrent requests can neither
break a capture nor see half-built graphs. The graph holders here take the gate they are given.

Upstream reference: ``cosyvoice/llm/llm.py`` (``inference``/``forward_one_step``),
``cosyvoice/flow/flow_matching.py`` (``solve_euler``), ``cosyvoice/hifigan/generator.py``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cosytune.models.flow import NOISE_FRAMES
from cosytune.models.llm import CosyVoice3LM, DecodeStep, InferencePrompt, MinLenMode, right_pad_prompts
from cosytune.models.qwen2 import CACHED_ATTENTION, KVCache
from cosytune.models.sampling import SamplingConfig

logger = logging.getLogger(__name__)

#: Compiled decoders with at most this many rows attend through fused reductions (see GraphedDecoder).
REDUCE_ATTENTION_MAX_ROWS = 4

__all__ = ["DeviceGate", "GraphedDecoder", "GraphedFlowSampler", "GraphedVocoder", "autocast_ctx", "batched_cfg_sample", "compile_flow_estimator", "compile_hift", "fast_estimator", "sample_decode"]


#: Step shapes (rows x capacity) a process may compile: every decoder of a pool or a batcher compiles the same
#: step function at its own shape, and dynamo's default limit (8 per function) would silently run the rest eagerly.
COMPILED_SHAPES = 128


def allow_recompiles(n: int) -> None:
    """Let dynamo compile one function for at least ``n`` distinct shapes (a process-wide setting)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6; set whichever exists
        if getattr(dynamo_config, name, n) < n:
            setattr(dynamo_config, name, n)


def autocast_ctx(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a null context when dtype is None/float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class DeviceGate:
    """A readers-writer lock over one device's work: many launchers at once, or one CUDA graph capture alone.

    CUDA graph capture breaks (``cudaErrorStreamCaptureUnsupported`` / ``...Invalidated``) when another
    thread synchronises the device, or touches the capturing stream's memory pool, while the capture is
    under way. So every piece of request work that launches kernels holds :meth:`shared` (cheap; any number
    of threads together), and every capture holds :meth:`exclusive`, which waits until no launcher is inside
    and keeps new ones out until it is done (writers go first, so a capture is not starved).

    A thread that holds :meth:`shared` and needs to capture (a lazily built graph) may call
    :meth:`exclusive`: its own shared holds are given up while it waits and taken back afterwards, so the
    upgrade cannot deadlock against itself (another upgrading thread simply waits its turn).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._local = threading.local()
        #: Exclusive sections entered so far (captures); for tests and stats.
        self.exclusive_count = 0

    def _held(self) -> int:
        return getattr(self._local, "shared", 0)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Launch work (any number of threads together); re-entrant."""
        held = self._held()
        if held == 0 and not getattr(self._local, "exclusive", False):
            with self._cond:
                while self._writer or self._waiting_writers:
                    self._cond.wait()
                self._readers += 1
        self._local.shared = held + 1
        try:
            yield
        finally:
            self._local.shared -= 1
            if self._local.shared == 0 and not getattr(self._local, "exclusive", False):
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Capture alone: no other thread launches work meanwhile (re-entrant; upgrades a shared hold)."""
        if getattr(self._local, "exclusive", False):
            yield
            return
        held = self._held()
        with self._cond:
            if held:
                self._readers -= 1
                self._cond.notify_all()
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
            self.exclusive_count += 1
        self._local.exclusive = True
        try:
            yield
        finally:
            self._local.exclusive = False
            with self._cond:
                self._writer = False
                if held:
                    self._readers += 1
                self._cond.notify_all()


def capture_graph(device: torch.device, run: Callable[[], None], *, warmups: int,
                  after_each: Callable[[], Any] | None = None, gate: DeviceGate | None = None) -> torch.cuda.CUDAGraph:
    """Capture ``run`` as a CUDA graph after ``warmups`` eager runs on a side stream.

    The warm-up runs do what must not happen during capture (compilation, cuBLAS workspaces, kernel
    choice); ``after_each`` runs after each of them and after the capture (e.g. to undo state they
    advanced). With a ``gate``, all of it happens under :meth:`DeviceGate.exclusive`, so no other thread
    that launches through the same gate can invalidate the capture; without one the capture errors are
    only thread-local (safe only when no other thread uses the device meanwhile).
    """
    with gate.exclusive() if gate is not None else contextlib.nullcontext():
        torch.cuda.synchronize(device)
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                run()
                if after_each is not None:
                    after_each()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            run()
        if after_each is not None:
            after_each()
        torch.cuda.synchronize(device)
    return graph


class _CapturedGraphs:
    """Captured graphs with their static buffers, by shape key; the least recently used go first.

    Each entry is a dict built (and captured) by the caller on a miss; at most ``max_graphs`` are kept
    (each holds its own activation pool). ``captures`` counts the builds.
    """

    def __init__(self, max_graphs: int) -> None:
        self.max_graphs = max(1, int(max_graphs))
        self.entries: dict[tuple, dict[str, Any]] = {}  # insertion order = recency
        self.captures = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: tuple, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The entry for ``key``, built with ``build()`` on a miss; marks it most recently used."""
        entry = self.entries.pop(key, None)
        if entry is None:
            entry = build()
            self.captures += 1
            while len(self.entries) >= self.max_graphs:
                self.entries.pop(next(iter(self.entries)))
        self.entries[key] = entry
        return entry


class GraphedDecoder:
    """Static-shape LLM decoding for B rows with a preallocated cache; CUDA-graph replay on GPU.

    The graph is captured lazily at the first :meth:`step` (once per instance, i.e. per (B, S)), or
    ahead of time by :meth:`warm_up`; later prefills write into the same cache tensors, so the captured
    graph stays valid across utterances. Row lengths live on the device (``cache.lengths``) and advance
    inside the graph.

    Args:
        model: the speech LM (eval mode, on its device and dtype).
        batch_size: rows B.
        capacity: cache positions S per row (longest prompt + tokens to generate).
        use_graph: capture a CUDA graph (ignored on CPU, where the same static step runs eagerly).
        autocast_dtype: run the step under autocast in this dtype (e.g. bfloat16); None = model dtype.
        compile_mode: ``torch.compile`` the step body in this mode (e.g. ``"default"``) before capturing
            it. Inductor fuses the per-layer norm / RoPE / mask / residual element-wise ops, so the graph
            replays about a third of the kernels; with at most ``REDUCE_ATTENTION_MAX_ROWS`` rows the
            cache attention then runs as fused reductions (``attention="reduce"``). Skipped on CPU
            unless ``force_compile``.
        force_compile: compile on CPU too (tests).
        pack: pack the model's q/k/v and gate/up weights (``Qwen2Model.pack_projections``: same
            parameters, one GEMM each) so a step launches fewer kernels.
        prefill_bucket: with graphs, prompts are right-padded to a power of two of at least this many
            positions (capped at the capacity) and the prefill is replayed from a graph captured once per
            padded length (padding is never visible: each row's length is its own, and later steps
            overwrite the padded positions). Powers of two keep the captures per decoder few (ahead of
            time in :meth:`warm_up`).
        gate: the device's :class:`DeviceGate`; captures take it exclusively.
        sample_head: also compute, inside the step, the min-length masked log-probs, their softmax and
            its stable descending sort (batch 1): :meth:`decode` then samples RAS with one small
            device→host transfer per token (see :func:`sample_decode`).
        lazy_prefill_graphs: capture the prefill graph of a new padded width at its first use; False runs
            widths that :meth:`warm_up` did not capture eagerly (a decoder built during a burst of
            concurrent requests then needs one capture, its step, instead of one per prompt width).
        cache: decode into this cache (B rows, S positions; e.g. the first rows of a larger cache, as
            :class:`~cosytune.infer.batching.DecodeBatcher` does) instead of allocating one.
        stop_mask: with ``sample_head``, a (B, V) bool buffer to use as :attr:`stop_mask` (shared views).
        suppress: with ``sample_head``, a (B, 1) bool buffer to use as :attr:`suppress`.
        attention: the cache attention of the step, a :data:`~cosytune.models.qwen2.CACHED_ATTENTION`
            kind; None: "reduce" when compiled with few rows, else "sdpa".
    """

    def __init__(self, model: CosyVoice3LM, batch_size: int, capacity: int, *, use_graph: bool = True,
                 autocast_dtype: torch.dtype | None = None, compile_mode: str | None = None,
                 force_compile: bool = False, pack: bool = True, prefill_bucket: int = 32,
                 gate: DeviceGate | None = None, sample_head: bool = False,
                 lazy_prefill_graphs: bool = True, cache: KVCache | None = None,
                 stop_mask: Tensor | None = None, suppress: Tensor | None = None,
                 attention: str | None = None) -> None:
        self.model = model
        self.lazy_prefill_graphs = bool(lazy_prefill_graphs)
        dev = model.speech_embedding.weight.device
        self.device = dev
        self.gate = gate
        cache_dtype = autocast_dtype or model.speech_embedding.weight.dtype
        if cache is not None and (cache.batch_size, cache.capacity) != (batch_size, capacity):
            raise ValueError(f"a cache of {cache.batch_size} rows x {cache.capacity} positions was given for a "
                             f"decoder of {batch_size} x {capacity}")
        self.cache = cache if cache is not None else KVCache.allocate(model.config.qwen2, batch_size, capacity,
                                                                      device=dev, dtype=cache_dtype)
        self.autocast_dtype = autocast_dtype
        self.use_graph = bool(use_graph and dev.type == "cuda")
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=dev)  # static input
        vocab = model.config.speech_vocab_size
        self.logp = torch.zeros(batch_size, vocab, dtype=torch.float32, device=dev)
        self.argmax = torch.zeros(batch_size, dtype=torch.long, device=dev)  # static greedy output
        self.sample_head = bool(sample_head)
        if self.sample_head:
            # Static sampler inputs/outputs, per row: which ids min_len blocks, whether it blocks them now.
            self.stop_mask = stop_mask if stop_mask is not None else \
                torch.zeros(batch_size, vocab, dtype=torch.bool, device=dev)
            self.suppress = suppress if suppress is not None else \
                torch.zeros(batch_size, 1, dtype=torch.bool, device=dev)
            self.masked = torch.zeros(batch_size, vocab, dtype=torch.float32, device=dev)
            self.sorted_p = torch.zeros(batch_size, vocab, dtype=torch.float32, device=dev)
            self.sorted_ids = torch.zeros(batch_size, vocab, dtype=torch.long, device=dev)
        self._graph: Any = None
        self._warming = False
        self.prefill_bucket = max(1, int(prefill_bucket))
        self._prefill_graphs: dict[int, dict[str, Any]] = {}
        if pack:
            model.llm.model.model.pack_projections()
        self.compiled = bool(compile_mode) and (dev.type == "cuda" or force_compile)
        # dynamic=False: every buffer the body touches has a fixed shape for this decoder's lifetime.
        # Compiled and with few rows, the cache attention as explicit reductions fuses into two small
        # kernels (a library attention kernel costs several microseconds per layer at one query: 1.30 ->
        # 1.19 ms/token at batch 1 on an H200); eager, or with many rows, the SDPA kernel is the better one.
        if attention is None:
            attention = "reduce" if self.compiled and batch_size <= REDUCE_ATTENTION_MAX_ROWS else "sdpa"
        elif attention not in CACHED_ATTENTION:
            raise ValueError(f"attention must be one of {sorted(CACHED_ATTENTION)}, got {attention!r}")
        self.attention = attention
        if self.compiled:
            allow_recompiles(COMPILED_SHAPES)
        self._body = torch.compile(self._step_body, mode=compile_mode, dynamic=False) if self.compiled \
            else self._step_body

    @property
    def batch_size(self) -> int:
        """Rows B."""
        return self.cache.batch_size

    @property
    def captured(self) -> bool:
        """Whether the step graph has been captured."""
        return self._graph is not None

    def _step_body(self) -> None:
        logp, _ = self.model.step_logp(self.tokens, self.cache, self.attention)
        self.logp.copy_(logp)
        self.argmax.copy_(logp.argmax(dim=-1))

    def _head(self) -> None:
        """Min-length masking, softmax and the stable descending sort of ``logp`` (the RAS inputs)."""
        masked = self.logp.masked_fill(self.stop_mask & self.suppress, -float("inf"))
        self.masked.copy_(masked)
        p, ids = masked.softmax(dim=-1).sort(dim=-1, descending=True, stable=True)
        self.sorted_p.copy_(p)
        self.sorted_ids.copy_(ids)

    def _eager_step(self) -> None:
        with torch.inference_mode(), autocast_ctx(self.device, self.autocast_dtype):
            self._body()
        if self.sample_head:
            with torch.inference_mode():
                self._head()

    def _capture(self) -> None:
        # The warm-up steps advance the row lengths: restore them after each.
        saved = self.cache.lengths.clone()
        self._graph = capture_graph(self.device, self._eager_step, warmups=2,
                                    after_each=lambda: self.cache.lengths.copy_(saved), gate=self.gate)

    def prefill_width(self, longest: int) -> int:
        """The padded prompt width a prompt of ``longest`` positions is prefilled at."""
        if not self.use_graph:
            return longest
        width = self.prefill_bucket
        while width < longest:
            width *= 2
        return min(width, self.cache.capacity)

    @torch.inference_mode()
    def warm_up(self, widths: Sequence[int] = ()) -> int:
        """Capture the step graph and the prefill graphs of ``widths`` now (CUDA; a no-op on CPU).

        Returns the number of graphs captured. Costs two eager runs and one capture per graph (tens of
        milliseconds each at full size; seconds when the step is compiled, at its first capture).
        """
        if not self.use_graph:
            return 0
        n = 0
        dim = self.model.config.hidden_size
        dtype = self.model.speech_embedding.weight.dtype
        self._warming = True
        try:
            for w in sorted({self.prefill_width(int(w)) for w in widths if 0 < int(w) < self.cache.capacity}):
                if w not in self._prefill_graphs:
                    self.prefill([torch.zeros(1, w, dim, device=self.device, dtype=dtype)])
                    n += 1
        finally:
            self._warming = False
        if self._graph is None:
            self.cache.reset()
            self._capture()
            n += 1
        self.cache.reset()
        return n

    @torch.inference_mode()
    def prefill(self, lm_inputs: Sequence[Tensor]) -> Tensor:
        """Reset the cache and run the prompts; returns the (B, V_sp) log-probs after each prompt.

        Args:
            lm_inputs: B tensors (1, L_i, D) or (L_i, D), e.g. ``InferencePrompt.lm_input``.
        """
        b = self.batch_size
        if len(lm_inputs) != b:
            raise ValueError(f"this decoder was built for {b} rows, got {len(lm_inputs)} prompts")
        longest = max((x[0] if x.dim() == 3 else x).shape[0] for x in lm_inputs)
        if longest >= self.cache.capacity:
            raise ValueError(f"prompt of {longest} positions leaves no room in a cache of {self.cache.capacity}")
        width = self.prefill_width(longest)
        x, input_lens = right_pad_prompts(lm_inputs, width)
        if not self.use_graph:
            self._prefill_body(x, input_lens)
            return self.logp
        entry = self._prefill_graphs.get(width)
        if entry is None and not (self.lazy_prefill_graphs or self._warming):
            self._prefill_body(x, input_lens)
            return self.logp
        if entry is None:
            entry = {"x": x.clone(), "lens": input_lens.clone()}
            entry["graph"] = capture_graph(self.device, lambda: self._prefill_body(entry["x"], entry["lens"]),
                                           warmups=1, gate=self.gate)
            self._prefill_graphs[width] = entry
        entry["x"].copy_(x)
        entry["lens"].copy_(input_lens)
        entry["graph"].replay()
        return self.logp

    def _prefill_body(self, x: Tensor, input_lens: Tensor) -> None:
        """Reset the cache and run (B, W, D) right-padded prompts; no host sync (graph-capturable)."""
        b = x.shape[0]
        self.cache.reset()
        qwen = self.model.llm.model.model
        with autocast_ctx(self.device, self.autocast_dtype):
            # _forward_cached, not prefill(): prefill's room check reads the lengths on the host. The
            # room was checked above (the cache is empty and W <= capacity).
            hidden = qwen._forward_cached(x, self.cache, input_lens)
            logp = self.model._logp(hidden[torch.arange(b, device=self.device), input_lens - 1])
        self.logp.copy_(logp)

    def step(self, token_ids: Tensor | int) -> Tensor:
        """Feed one id per row and return the static (B, V_sp) log-prob buffer (overwritten next step).

        ``token_ids``: (B,) ids, or one Python int for every row (a fill: no host-to-device copy).
        The caller keeps every row's length below the capacity (not checked: that would sync).
        """
        if isinstance(token_ids, int):
            self.tokens.fill_(token_ids)
        else:
            self.tokens.copy_(token_ids)
        if not self.use_graph:
            self._eager_step()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        return self.logp

    def step_argmax(self) -> Tensor:
        """Feed the previous greedy ids (device-side, no host sync) and return the new greedy ids (B,)."""
        self.step(self.argmax)
        return self.argmax

    @torch.inference_mode()
    def decode(self, prompt: InferencePrompt, *, sampling: SamplingConfig | None = None,
               generator: torch.Generator | None = None, draw_q: Any = None,
               min_len_mode: MinLenMode = "all_stops") -> Iterator[DecodeStep]:
        """Batch-1 decoding with the same rules and draws as :meth:`CosyVoice3LM.decode`.

        Needs ``batch_size == 1`` and ``capacity >= L + max_len``. ``draw_q`` injects the sampler's
        Exp(1) draws (tests), as in :meth:`CosyVoice3LM.decode`. A decoder built with ``sample_head``
        samples through :func:`sample_decode` (one transfer per token) when it can: a seeded
        ``generator``, no ``draw_q`` and temperature 1; otherwise the model's own loop drives the steps.
        """
        if self.batch_size != 1:
            raise ValueError("decode() is for a batch-1 decoder; use prefill/step for batches")
        if prompt.max_len <= 0:
            return
        if prompt.lm_input.shape[1] + prompt.max_len > self.cache.capacity:
            raise ValueError(f"prompt ({prompt.lm_input.shape[1]}) + max_len ({prompt.max_len}) exceeds the "
                             f"cache capacity {self.cache.capacity}; build the decoder with a larger capacity")
        sampling = sampling or self.model.config.sampling
        if self.sample_head and draw_q is None and generator is not None and sampling.temperature == 1.0:
            yield from sample_decode(self, prompt, sampling, generator, min_len_mode)
            return
        if self.sample_head:
            self.suppress.fill_(False)  # the model's loop masks on its own
        yield from self.model.decode(prompt, sampling=sampling, generator=generator, draw_q=draw_q,
                                     min_len_mode=min_len_mode, rows=self)


def warm_prefill_widths(capacity: int, first: int = 32, largest: int = 1024) -> list[int]:
    """The padded prompt widths a decoder of ``capacity`` positions captures ahead of time: powers of two
    from ``first`` (the default ``prefill_bucket``) up to half the capacity, at most ``largest``."""
    widths, w = [], first
    while w <= min(capacity // 2, largest):
        widths.append(w)
        w *= 2
    return widths


def stop_row(cfg: Any, min_len_mode: MinLenMode, device: torch.device) -> Tensor:
    """(V,) bool: the ids the min-length rule blocks (the first stop id, or every stop id)."""
    row = torch.zeros(cfg.speech_vocab_size, dtype=torch.bool)
    if min_len_mode == "upstream":
        row[cfg.speech_token_size] = True
    elif min_len_mode == "all_stops":
        row[cfg.speech_token_size:] = True
    else:
        raise ValueError(f"min_len_mode must be 'all_stops' or 'upstream', got {min_len_mode!r}")
    return row.to(device)


def nucleus_pick(head_p: np.ndarray, head_ids: np.ndarray, q: np.ndarray | None, sampling: SamplingConfig,
                 history: Sequence[int], draw_now: Any) -> tuple[tuple[int, ...], int, int, bool]:
    """The nucleus pick of RAS from host copies of a row's sorted head: ``(candidates, position, pick,
    whether the repetition rule asks for a redraw)``.

    ``head_p``/``head_ids``: the top-k probabilities and ids (k = min(top_k, V)); ``q``: Exp(1) draws made
    ahead for them (CUDA), or None: ``draw_now(count)`` returns exactly the nucleus count's draws (CPU, as
    the reference). The pick is ``argmax(p / q)`` as :func:`~cosytune.models.sampling.ras_sample`.
    """
    from cosytune.models.sampling import _nucleus_count

    count = _nucleus_count(head_p, sampling.top_p)
    qs = q[:count] if q is not None else draw_now(count)
    pos = int(np.argmax(head_p[:count] / qs))
    ids = tuple(int(i) for i in head_ids[:count])
    pick = ids[pos]
    # same float product as ras_sample
    redraw = sum(1 for t in history[-sampling.win_size:] if t == pick) >= sampling.win_size * sampling.tau_r
    return ids, pos, pick, redraw


def pick_token(dec: GraphedDecoder, row: int, head_p: np.ndarray, head_ids: np.ndarray, q: np.ndarray | None,
               sampling: SamplingConfig, history: Sequence[int], draw: Any) -> Any:
    """One RAS decision for ``row`` of a ``sample_head`` decoder (:func:`nucleus_pick`, then a repetition
    redraws from the row's masked log-probs). Returns the :class:`~cosytune.models.sampling.SampleResult`."""
    from cosytune.models.sampling import SampleResult, _redraw

    ids, pos, pick, redraw = nucleus_pick(head_p, head_ids, q, sampling, history,
                                          lambda count: draw(dec.sorted_p[row, :count]).cpu().numpy())
    token = _redraw(dec.masked[row], pick, draw) if redraw else pick
    return SampleResult(token, ids, pos, pick, redraw)


def sample_decode(dec: GraphedDecoder, prompt: InferencePrompt, sampling: SamplingConfig,
                  generator: torch.Generator, min_len_mode: MinLenMode) -> Iterator[DecodeStep]:
    """RAS decoding on a ``sample_head`` decoder: the same tokens as :meth:`CosyVoice3LM.decode`.

    The step (graph) leaves the min-length masked log-probs, their softmax and its stable sort on the
    device; per token the host reads the top-k head (probabilities and ids) and the Exp(1) draws in
    *one* transfer, picks the candidate exactly as :func:`~cosytune.models.sampling.ras_sample` does
    (the same float32 running sum, the same ``argmax(p / q)``), and feeds the id back with a fill. Only
    a repetition redraw (it needs the pick first, as upstream) costs a second transfer.

    Draws: on the CPU the head is read first and exactly ``count`` draws are made, as the reference does.
    On CUDA the ``top_k`` draws are made before the count is known, in the same transfer: the Philox
    kernel gives element i the same value and advances the generator by the same offset for any size up
    to a block, so the first ``count`` equal the reference's draws (checked by a GPU test).
    """
    from cosytune.models.sampling import exponential_draws

    cfg = dec.model.config
    dec.stop_mask.copy_(stop_row(cfg, min_len_mode, dec.device))
    k = min(sampling.top_k, cfg.speech_vocab_size)
    ahead = dec.device.type == "cuda" and generator.device.type == "cuda"
    draw = exponential_draws(generator)
    dec.suppress.fill_(prompt.min_len > 0)
    with dec.gate.shared() if dec.gate is not None else contextlib.nullcontext():
        dec.prefill([prompt.lm_input])
        dec._head()  # the prefill graph leaves only logp
    history: list[int] = []
    for step in range(prompt.max_len):
        gate = dec.gate.shared() if dec.gate is not None else contextlib.nullcontext()
        with gate:
            head_p, head_ids = dec.sorted_p[0, :k], dec.sorted_ids[0, :k]
            parts = [head_p, head_ids.to(head_p.dtype)]
            if ahead:
                parts.append(torch.empty(k, dtype=head_p.dtype, device=dec.device).exponential_(1.0, generator=generator))
            host = torch.stack(parts).cpu().numpy()
            raw = dec.logp[0].clone()
            result = pick_token(dec, 0, host[0], host[1], host[2] if ahead else None, sampling, history, draw)
        token = result.token_id
        stop = cfg.is_stop(token)
        yield DecodeStep(step, raw, result, token, stop)
        if stop or step + 1 == prompt.max_len:
            return
        history.append(token)
        with dec.gate.shared() if dec.gate is not None else contextlib.nullcontext():
            if step + 1 == prompt.min_len:
                dec.suppress.fill_(False)
            dec.step(token)


@torch.inference_mode()
def batched_cfg_sample(estimator: torch.nn.Module, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor,
                       noise: Tensor, t_span: Tensor, cfg_rate: float, *, streaming: bool = False,
                       autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Euler integration with CFG for B utterances, one (2B, ...) estimator call per step.

    Same arithmetic as ``CausalConditionalCFM.sample`` (which takes one utterance): rows 0..B-1 carry
    (mu, spks, cond), rows B..2B-1 the same x with those zeroed; ``x += dt·((1+w)·v_c - w·v_u)``.

    Args:
        estimator: the DiT (``flow.decoder.estimator``), possibly compiled.
        mu: (B, 80, T); mask: (B, 1, T) (1 on valid frames); spks: (B, 80); cond: (B, 80, T).
        noise: (B, 80, T) starting point (``decoder.fixed_noise(T)·temperature`` for parity).
        t_span: (n+1,) time grid (``decoder.time_grid``).
        cfg_rate: guidance weight w.
        streaming: chunked DiT attention.
        autocast_dtype: run the estimator under autocast (e.g. bfloat16); the Euler update stays float32.

    Returns:
        (B, 80, T) float32 mel.
    """
    b = mu.shape[0]
    dtype = spks.dtype
    x = noise.to(dtype)
    zeros = torch.zeros_like
    mask_in = torch.cat((mask, mask)).to(dtype)
    mu_in = torch.cat((mu, zeros(mu))).to(dtype)
    spks_in = torch.cat((spks, zeros(spks))).to(dtype)
    cond_in = torch.cat((cond, zeros(cond))).to(dtype)
    t, dt = t_span[0], t_span[1] - t_span[0]
    n = len(t_span) - 1
    for step in range(1, n + 1):
        x_in = torch.cat((x, x))
        t_in = t.reshape(1).expand(2 * b).to(dtype)
        with autocast_ctx(x.device, autocast_dtype):
            v = estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in, streaming)
        v = v.to(dtype)
        x = x + dt * ((1.0 + cfg_rate) * v[:b] - cfg_rate * v[b:])
        t = t + dt
        if step < n:
            dt = t_span[step + 1] - t
    return x.float()


class GraphedFlowSampler:
    """The whole Euler + CFG loop of :func:`batched_cfg_sample` replayed as one CUDA graph per shape.

    A 10-step CFG solve launches the DiT's few thousand kernels; at the frame counts of a streaming
    chunk or a single utterance those launches, not the arithmetic, set the time. This sampler copies
    the inputs into static buffers, replays a graph captured once for that (rows, frames, streaming)
    shape, and returns the static output. Graphs are kept for the ``max_graphs`` most recent shapes
    (each holds its own activation pool). On CPU, or with ``use_graph=False``, it simply calls
    :func:`batched_cfg_sample`.

    Call it like ``CausalConditionalCFM.sample`` (the ``sampler=`` hook of
    ``CausalMaskedDiffWithDiT.inference`` does): ``sampler(mu, mask, spks, cond, n_timesteps=,
    cfg_rate=, temperature=, streaming=)`` -> (B, 80, T) float32. The result is a buffer owned by the
    sampler: it is overwritten by the next call of the same shape, so clone it to keep it.

    With ``bucket`` > 1 the frame axis is right-padded (mask 0) up to a multiple of ``bucket``, so
    utterances of different lengths share a few captured graphs. Padding does not change the valid
    frames: the DiT masks padded keys and its position convolutions are causal (the result equals the
    unpadded solve up to float rounding, as the batch tests check).

    Not thread-safe: one sampler per worker/request stream, or a lock (the models themselves are shared).

    Args:
        decoder: the flow's ``CausalConditionalCFM`` (``flow.decoder``), its estimator possibly compiled.
        autocast_dtype: run the estimator under autocast (e.g. bfloat16).
        use_graph: capture CUDA graphs (ignored on CPU).
        max_graphs: shapes to keep captured.
        bucket: pad the frame count up to a multiple of this (1 = exact shapes).
        estimator: the DiT to run instead of ``decoder.estimator`` (e.g. :func:`fast_estimator`'s copy).
        gate: the device's :class:`DeviceGate`; captures take it exclusively.
    """

    def __init__(self, decoder: torch.nn.Module, *, autocast_dtype: torch.dtype | None = None,
                 use_graph: bool = True, max_graphs: int = 8, bucket: int = 1,
                 estimator: torch.nn.Module | None = None, gate: DeviceGate | None = None) -> None:
        self.decoder = decoder
        self.gate = gate
        self._estimator = estimator
        self.autocast_dtype = autocast_dtype
        dev = next(decoder.parameters()).device
        self.device = dev
        self.use_graph = bool(use_graph and dev.type == "cuda")
        self.bucket = max(1, int(bucket))
        self._graphs = _CapturedGraphs(max_graphs)

    @property
    def captures(self) -> int:
        """Graphs captured so far (a shape evicted and seen again is captured again)."""
        return self._graphs.captures

    @property
    def estimator(self) -> torch.nn.Module:
        """The DiT this sampler runs."""
        return self._estimator if self._estimator is not None else self.decoder.estimator

    def _run(self, bufs: dict[str, Any]) -> None:
        bufs["out"].copy_(batched_cfg_sample(self.estimator, bufs["mu"], bufs["mask"], bufs["spks"],
                                             bufs["cond"], bufs["noise"], bufs["t_span"], bufs["cfg_rate"],
                                             streaming=bufs["streaming"], autocast_dtype=self.autocast_dtype))

    def _build(self, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, noise: Tensor, t_span: Tensor,
               cfg_rate: float, streaming: bool) -> dict[str, Any]:
        entry = {"mu": mu.clone(), "mask": mask.clone(), "spks": spks.clone(), "cond": cond.clone(),
                 "noise": noise.clone(), "t_span": t_span.clone(), "cfg_rate": cfg_rate,
                 "streaming": streaming, "out": torch.empty(mu.shape, device=mu.device, dtype=torch.float32)}
        entry["graph"] = capture_graph(self.device, lambda: self._run(entry), warmups=2, gate=self.gate)
        return entry

    @torch.inference_mode()
    def __call__(self, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, *, n_timesteps: int | None = None,
                 cfg_rate: float | None = None, temperature: float = 1.0, streaming: bool = False) -> Tensor:
        dec = self.decoder
        n = n_timesteps or dec.config.n_timesteps
        w = float(dec.config.inference_cfg_rate if cfg_rate is None else cfg_rate)
        b, _, frames = mu.shape
        padded = -(-frames // self.bucket) * self.bucket
        if padded != frames and padded <= NOISE_FRAMES:  # past the fixed noise: exact shape instead
            pad = (0, padded - frames)
            mu, mask, cond = F.pad(mu, pad), F.pad(mask, pad), F.pad(cond, pad)
            return self(mu, mask, spks, cond, n_timesteps=n, cfg_rate=w, temperature=temperature,
                        streaming=streaming)[:, :, :frames]
        noise = (dec.fixed_noise(frames, mu.device, mu.dtype) * temperature).expand(b, -1, -1)
        t_span = dec.time_grid(n, mu.dtype, mu.device)
        if not self.use_graph:
            return batched_cfg_sample(self.estimator, mu, mask, spks, cond, noise, t_span, w, streaming=streaming,
                                      autocast_dtype=self.autocast_dtype)
        key = (b, frames, mu.dtype, bool(streaming), n, w, float(temperature))
        entry = self._graphs.get(key, lambda: self._build(mu, mask, spks, cond, noise, t_span, w, streaming))
        for name, value in (("mu", mu), ("mask", mask), ("spks", spks), ("cond", cond)):
            entry[name].copy_(value)
        entry["graph"].replay()
        return entry["out"]


class GraphedVocoder:
    """``HiFTGenerator.inference`` replayed from a CUDA graph per (rows, frames, finalize) shape.

    A vocoder call on a streaming chunk or a short utterance is a few hundred small kernels (the
    float64 f0 predictor, the sine source, the STFT, the up-sampling stacks, the iSTFT) whose launches
    cost more than their arithmetic. The first call of a shape runs twice eagerly (warm-up), then is
    captured; later calls copy the mel into a static buffer and replay. Same values as the eager call
    (same kernels). Shapes are kept for the ``max_graphs`` most recent, like
    :class:`GraphedFlowSampler`. On CPU, or with ``use_graph=False``, it calls ``hift.inference``.

    The returned :class:`~cosytune.models.hift.HiFTOutput` holds buffers owned by the vocoder,
    overwritten by the next call of the same shape: clone what you keep. Not thread-safe.

    Args:
        hift: the ``HiFTGenerator`` (eval mode, float32), its ``decode`` possibly compiled.
        use_graph: capture CUDA graphs (ignored on CPU).
        max_graphs: shapes to keep captured.
        gate: the device's :class:`DeviceGate`; captures take it exclusively.
    """

    def __init__(self, hift: torch.nn.Module, *, use_graph: bool = True, max_graphs: int = 8,
                 gate: DeviceGate | None = None) -> None:
        self.hift = hift
        self.gate = gate
        dev = next(hift.parameters()).device
        self.device = dev
        self.use_graph = bool(use_graph and dev.type == "cuda")
        self._graphs = _CapturedGraphs(max_graphs)

    @property
    def captures(self) -> int:
        """Graphs captured so far (a shape evicted and seen again is captured again)."""
        return self._graphs.captures

    @torch.inference_mode()
    def __call__(self, mel: Tensor, finalize: bool = True) -> Any:
        hift = self.hift
        if not self.use_graph:
            return hift.inference(mel, finalize=finalize)
        mel = mel.float()
        # Install enough fixed noise before any capture (drawing it cannot happen inside one). The graph
        # reads the noise tensor in place: a replaced noise (set_fixed_noise, or grown for a longer
        # call) is a new key, and each entry keeps its own noise alive.
        hift.fixed_noise(mel.shape[2] * hift.config.upsample_scale)
        key = (tuple(mel.shape), bool(finalize), id(hift._noise))

        def build() -> dict[str, Any]:
            entry = {"mel": mel.clone(), "out": None, "noise": hift._noise}

            def run() -> None:
                entry["out"] = hift.inference(entry["mel"], finalize=finalize)

            # The eager warm-ups also raise the plain call's errors (e.g. a too-short chunk).
            entry["graph"] = capture_graph(self.device, run, warmups=2, gate=self.gate)
            return entry

        entry = self._graphs.get(key, build)
        entry["mel"].copy_(mel)
        entry["graph"].replay()
        return entry["out"]


def fast_estimator(estimator: torch.nn.Module, *, param_dtype: torch.dtype | None = None, gemm_conv: bool = True,
                   compile_mode: str | None = None, force_compile: bool = False) -> torch.nn.Module:
    """A copy of the flow's DiT prepared for fast sampling under autocast; the original is untouched.

    * ``param_dtype`` (e.g. bfloat16): the copy's parameters are stored in that dtype (buffers, such as
      the rotary frequencies, keep theirs). Under autocast to the same dtype every matmul and
      convolution already casts its weights to it, so the results are the same, without re-running
      those casts (one per weight, per Euler step) inside the solve.
    * ``gemm_conv``: the grouped position convolutions of small calls (few rows × frames) run as one
      batched GEMM each (:func:`cosytune.models.dit.grouped_conv1d_gemm`) instead of cuDNN's one kernel
      per group; large batches keep the library convolution (``impl="auto"``).
    * ``compile_mode``: ``torch.compile`` the copy (CUDA only unless ``force_compile``).

    Run it only under autocast to ``param_dtype`` (as :class:`GraphedFlowSampler` with
    ``autocast_dtype`` does): without autocast a bf16-parameter DiT would compute in bf16 throughout.
    """
    import copy

    est = copy.deepcopy(estimator)
    if param_dtype is not None:
        for prm in est.parameters():
            prm.data = prm.data.to(param_dtype)
    if gemm_conv:
        est.input_embed.conv_pos_embed.impl = "auto"
    if compile_mode:
        est = _compile(est, compile_mode, next(est.parameters()).device, force_compile)
    return est


def _compile(fn: Any, mode: str, device: torch.device, force: bool) -> Any:
    if device.type != "cuda" and not force:
        logger.info("torch.compile skipped on %s (pass force=True to compile anyway)", device.type)
        return fn
    return torch.compile(fn, mode=mode, dynamic=False)


def compile_flow_estimator(flow: torch.nn.Module, mode: str = "max-autotune-no-cudagraphs", *,
                           force: bool = False) -> torch.nn.Module:
    """Replace ``flow.decoder.estimator`` by its ``torch.compile`` wrapper (in place); returns ``flow``.

    Each new (rows, frames) shape recompiles (``dynamic=False``), so callers should bucket frame
    counts. The parameters are shared, so state_dict keys gain an ``_orig_mod`` level only on the
    wrapper attribute; do not save a compiled flow (save the original module instead).
    """
    est = flow.decoder.estimator
    dev = next(est.parameters()).device
    flow.decoder.estimator = _compile(est, mode, dev, force)
    return flow


def compile_hift(hift: torch.nn.Module, mode: str = "max-autotune-no-cudagraphs", *,
                 force: bool = False) -> torch.nn.Module:
    """Compile the vocoder's mel+source -> waveform path (``hift.decode``, instance attribute); returns ``hift``.

    The f0 predictor and the sine source stay eager (they are cheap and hold the fixed-noise logic).
    """
    dev = next(hift.parameters()).device
    hift.decode = _compile(hift.decode, mode, dev, force)
    return hift

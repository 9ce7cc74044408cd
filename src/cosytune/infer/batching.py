"""Continuous batching of LLM decoding: concurrent requests share one decode step per token.

Role
    Without it each concurrent request decodes on its own batch-1 decoder (:class:`DecoderPool`), so 16
    streams launch 16 small steps per token that queue up on the device one after another. A
    :class:`DecodeBatcher` runs one loop thread that owns a preallocated KV cache of ``max_rows`` rows per
    capacity bucket; a request joins between two steps (its prompt is prefilled alone, at the same
    shapes as a pooled decoder, and its keys/values are copied into a free row), every active row then
    advances in one (B, ·) step (B the smallest captured row bucket that covers the rows in use), and a
    row leaves as soon as it stops, is closed by its consumer, or reaches ``max_len``. Each row keeps its
    own sampler state (history, min-length rule, seeded generator), and per step the host reads every
    row's top-k head and Exp(1) draws in one transfer.

Equivalence
    A row samples exactly as :func:`~cosytune.infer.fast.sample_decode` (same prefill, same head, same
    draws from its own generator, same pick and redraw rules). Alone in the batch it runs the same
    shapes as a pooled batch-1 decoder, so it gets the same tokens bit for bit. Next to other rows the
    step's matrix products have more rows; on CPU in float32 the tokens were equal in every test, but a
    GPU may choose other GEMM kernels for other row counts, so in bfloat16 a row's logits can differ in
    the last bits from its solo run, which can change a later draw (as in any continuous-batching
    server). ``batch_decode=False`` on the Synthesizer keeps per-request decoders (exact repeatability
    under any load).

Threads
    Requests call :meth:`DecodeBatcher.decode` from any thread and read their steps from a queue; the
    loop thread does all device work for the rows under the device gate's shared hold (captures take
    it exclusively). A consumer that stops reading (a closed generator) frees its row at the next step.
    On CUDA the loop launches on its own high-priority stream: the flow and vocoder work of the request
    threads (on theirs) runs beside the decode steps instead of in front of them, and a step's
    device-to-host read waits for that step only. A request records an event after building its prompt;
    the loop's stream waits for it before the prefill.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cosytune.infer.fast import DeviceGate, GraphedDecoder, nucleus_pick, stop_row, warm_prefill_widths
from cosytune.models.llm import CosyVoice3LM, DecodeStep, InferencePrompt, MinLenMode
from cosytune.models.qwen2 import KVCache
from cosytune.models.sampling import SampleResult, SamplingConfig, exponential_draws, redraw_index

logger = logging.getLogger(__name__)

#: Rows a batch step can hold by default (the server's default --workers is lower; 16 streams is the
#: load the speed targets name).
MAX_ROWS = 16

#: Seconds the loop thread waits with no rows before it ends (a new request starts it again).
IDLE_EXIT_S = 30.0

#: The interpreter's thread switch interval a CUDA batcher sets (seconds; CPython's default is 0.005). The loop
#: thread gives up the GIL at every device call and must get it back from request threads that run Python
#: meanwhile (chunk rendering, the server): at 5 ms a step could wait that long for it. Measured on an H100
#: (bench_api, full size, session 7): 16 streams 16.1 -> 18.0x real time, alone 3.47 -> 3.36 ms/token.
SWITCH_INTERVAL_S = 0.0005

_END = object()


def row_buckets(max_rows: int) -> list[int]:
    """Captured batch sizes: powers of two below ``max_rows``, and ``max_rows`` itself."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return [*out, max_rows]


@dataclass(eq=False)
class _Row:
    """One request's decoding state (touched by the loop thread only, except ``closed``)."""

    prompt: InferencePrompt
    sampling: SamplingConfig
    generator: torch.Generator
    stop_mask: Tensor
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    history: list[int] = field(default_factory=list)
    step: int = 0
    token: int = 0
    closed: bool = False
    slot: int = -1
    #: CUDA: recorded on the requesting thread's stream after it built the prompt; the loop's stream waits
    #: for it before the prefill reads the prompt.
    ready: Any = None
    #: CUDA: this row's slice of its group's draw buffer (its Exp(1) draws are made there each step).
    draws: Any = None

    @property
    def k(self) -> int:
        return min(self.sampling.top_k, self.stop_mask.shape[0])


class _Group:
    """The rows of one cache capacity: a (max_rows, capacity) cache, its step decoders per row bucket,
    and a batch-1 decoder that prefills joining prompts at the shapes of a pooled decoder."""

    def __init__(self, llm: CosyVoice3LM, capacity: int, max_rows: int, *, use_graph: bool,
                 compile_mode: str | None, gate: DeviceGate, attention: str | None = None) -> None:
        dev = llm.speech_embedding.weight.device
        dtype = llm.speech_embedding.weight.dtype
        vocab = llm.config.speech_vocab_size
        self.llm, self.capacity = llm, capacity
        self.use_graph, self.compile_mode, self.gate, self.attention = use_graph, compile_mode, gate, attention
        self.cache = KVCache.allocate(llm.config.qwen2, max_rows, capacity, device=dev, dtype=dtype)
        self.stop_mask = torch.zeros(max_rows, vocab, dtype=torch.bool, device=dev)
        self.suppress = torch.zeros(max_rows, 1, dtype=torch.bool, device=dev)
        self.live = torch.zeros(max_rows, dtype=torch.long, device=dev)
        # Each active row's Exp(1) draws of a step, made in place (one call per row; read with the heads).
        self.draws = torch.ones(max_rows, vocab, dtype=torch.float32, device=dev)
        self.rows: list[_Row | None] = [None] * max_rows
        self.prefiller = GraphedDecoder(llm, 1, capacity, use_graph=use_graph, pack=False, gate=gate,
                                        compile_mode=compile_mode, sample_head=True, lazy_prefill_graphs=False,
                                        attention=attention)
        self.steppers: dict[int, GraphedDecoder] = {}
        #: Per row bucket: the (live, draws) views of its rows.
        self.views: dict[int, tuple[Tensor, Tensor]] = {}
        self.buckets = row_buckets(max_rows)

    def stepper(self, b: int) -> GraphedDecoder:
        dec = self.steppers.get(b)
        if dec is None:
            c = self.cache
            view = KVCache(keys=c.keys[:, :b], values=c.values[:, :b], lengths=c.lengths[:b])
            dec = GraphedDecoder(self.llm, b, self.capacity, use_graph=self.use_graph, pack=False, gate=self.gate,
                                 compile_mode=self.compile_mode, sample_head=True, cache=view, attention=self.attention,
                                 stop_mask=self.stop_mask[:b], suppress=self.suppress[:b])
            # Views made once: every tensor call of a step costs a GIL round trip.
            self.views[b] = (self.live[:b], self.draws[:b])
            self.steppers[b] = dec
        return dec

    def active(self) -> list[_Row]:
        return [r for r in self.rows if r is not None]

    def free_slot(self) -> int | None:
        return next((i for i, r in enumerate(self.rows) if r is None), None)


class DecodeBatcher:
    """Continuous batching of the LLM's RAS decoding (see the module docstring).

    Args:
        llm: the ``CosyVoice3LM`` (eval mode, on its device and dtype; its projections are packed here).
        capacity_for: maps positions (prompt + max_len) to a bucketed capacity, or None when too long
            (the Synthesizer's :func:`bucket_capacity` rule, so groups match the pooled decoders).
        max_rows: rows per step (requests decoded together per capacity bucket); more wait to join.
        use_graph: replay steps and prefills from CUDA graphs (ignored on CPU).
        compile_mode: ``torch.compile`` mode of the steps (None: eager kernels in the graphs).
        attention: the steps' cache attention (see :class:`~cosytune.infer.fast.GraphedDecoder`).
        gate: the device's :class:`~cosytune.infer.fast.DeviceGate`.
        switch_interval: lower the interpreter's thread switch interval (``sys.setswitchinterval``, a
            process-wide setting; never raised) to this many seconds; None: :data:`SWITCH_INTERVAL_S` on CUDA,
            unchanged on CPU.
    """

    def __init__(self, llm: CosyVoice3LM, capacity_for: Any, *, max_rows: int = MAX_ROWS, use_graph: bool = True,
                 compile_mode: str | None = None, gate: DeviceGate | None = None,
                 attention: str | None = None, switch_interval: float | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.llm = llm
        self.capacity_for = capacity_for
        self.max_rows = int(max_rows)
        self.device = llm.speech_embedding.weight.device
        self.use_graph = bool(use_graph and self.device.type == "cuda")
        self.compile_mode = compile_mode
        self.attention = attention
        if switch_interval is None and self.device.type == "cuda":
            switch_interval = SWITCH_INTERVAL_S
        if switch_interval is not None and sys.getswitchinterval() > switch_interval:
            sys.setswitchinterval(switch_interval)
        self.gate = gate if gate is not None else DeviceGate()
        llm.llm.model.model.pack_projections()
        self._groups: dict[int, _Group] = {}
        self._pending: deque[tuple[int, _Row]] = deque()
        self._cond = threading.Condition()
        self._work = threading.Lock()  # the loop's device work vs warm_up's captures
        self._thread: threading.Thread | None = None
        self._closed = False
        # The loop's own high-priority stream (CUDA): its steps neither wait behind nor are ordered after the
        # flow solves and vocoder calls that request threads launch on theirs, so decoding goes on while
        # earlier chunks are rendered, and each step's sync waits for the step alone.
        self._stream = torch.cuda.Stream(device=self.device, priority=-1) if self.device.type == "cuda" else None
        self._stats = {"requests": 0, "steps": 0, "row_steps": 0, "peak_rows": 0, "in_use": 0}
        # Where the loop's step time goes (seconds, summed over steps; see stats()).
        self._times = {"gate_s": 0.0, "launch_s": 0.0, "read_s": 0.0, "pick_s": 0.0}

    # ------------------------------------------------------------------------------------ public
    def accepts(self, prompt: InferencePrompt) -> bool:
        """Whether ``prompt`` fits a capacity bucket (else decode it another way)."""
        return self._capacity(prompt) is not None

    def _capacity(self, prompt: InferencePrompt) -> int | None:
        return self.capacity_for(int(prompt.lm_input.shape[1]) + int(prompt.max_len))

    def decode(self, prompt: InferencePrompt, *, sampling: SamplingConfig, generator: torch.Generator,
               min_len_mode: MinLenMode = "all_stops") -> Iterator[DecodeStep]:
        """Decode ``prompt`` in the shared batch; yields the steps as :func:`sample_decode` does.

        Closing the generator early (a client that walked away) frees the row at the next step.
        """
        capacity = self._capacity(prompt)
        if capacity is None:
            raise ValueError(f"prompt + max_len ({prompt.lm_input.shape[1]} + {prompt.max_len}) exceeds every "
                             "capacity bucket; check accepts() first")
        if prompt.max_len <= 0:
            return
        row = _Row(prompt, sampling, generator, stop_row(self.llm.config, min_len_mode, self.device))
        if self._stream is not None:
            row.ready = torch.cuda.Event()
            row.ready.record()  # after the prompt and the stop mask were made on this thread's stream
        with self._cond:
            if self._closed:
                raise RuntimeError("this DecodeBatcher is closed")
            self._pending.append((capacity, row))
            self._stats["requests"] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="cosytune-decode-batcher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        try:
            while True:
                item = row.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            row.closed = True

    def stats(self) -> dict[str, float]:
        """Requests seen, batch steps run, row-steps (tokens) decoded, peak and current rows in use; and
        the seconds the steps spent, summed: waiting for the device gate (``gate_s``), feeding the rows and
        launching the step (``launch_s``), drawing and reading the heads back, which waits for the step to
        finish on the device (``read_s``), and picking and handing out the tokens (``pick_s``)."""
        with self._cond:
            return {**self._stats, **self._times}

    @torch.inference_mode()
    def warm_up(self, capacities: Sequence[int]) -> int:
        """Allocate the groups of ``capacities`` and capture every row bucket's step graph and the prefill
        graphs a prompt of each can need (as :meth:`DecoderPool.warm_up`). Returns graphs captured (0 on CPU)."""
        if not self.use_graph:
            return 0
        n = 0
        caps = sorted({c for c in (self.capacity_for(int(c)) for c in capacities) if c is not None})
        with self._work:  # the loop thread must not step a group while its graphs are captured
            for cap in caps:
                with self._cond:
                    group = self._group(cap)
                n += group.prefiller.warm_up(warm_prefill_widths(cap))
                for b in group.buckets:
                    dec = group.stepper(b)
                    if not dec.captured:
                        saved = group.cache.lengths.clone()
                        n += dec.warm_up()
                        group.cache.lengths.copy_(saved)
        return n

    def close(self) -> None:
        """Stop the loop thread (rows still decoding get an error)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------------------------ loop
    def _group(self, capacity: int) -> _Group:
        group = self._groups.get(capacity)
        if group is None:
            group = _Group(self.llm, capacity, self.max_rows, use_graph=self.use_graph,
                           compile_mode=self.compile_mode, gate=self.gate, attention=self.attention)
            self._groups[capacity] = group
        return group

    def _loop(self) -> None:
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            self._run_loop()

    def _run_loop(self) -> None:
        while True:
            with self._cond:
                idle_since = time.monotonic()
                while not self._closed and not self._pending and not any(g.active() for g in self._groups.values()):
                    if time.monotonic() - idle_since >= IDLE_EXIT_S:
                        # Nothing to do for a while: end the thread (the next request starts another), so a
                        # Synthesizer that is dropped (an unloaded server variant) is not kept alive by it.
                        self._thread = None
                        return
                    self._cond.wait(timeout=IDLE_EXIT_S)
                if self._closed:
                    self._fail_all(RuntimeError("the decode batcher was closed"))
                    return
                joins = []
                waiting: deque[tuple[int, _Row]] = deque()
                while self._pending:
                    cap, row = self._pending.popleft()
                    group = self._group(cap)
                    slot = group.free_slot()
                    if slot is None or row.closed:
                        if not row.closed:
                            waiting.append((cap, row))
                        continue
                    row.slot = slot
                    group.rows[slot] = row  # reserved now; prefilled below
                    joins.append((group, row))
                    self._stats["in_use"] += 1
                self._pending = waiting
                groups = [g for g in self._groups.values() if g.active()]
                self._stats["peak_rows"] = max(self._stats["peak_rows"], self._stats["in_use"])
            try:
                with self._work, torch.inference_mode():
                    for group, row in joins:
                        self._admit(group, row)
                    for group in groups:
                        self._drop_closed(group)
                        if group.active():
                            self._step(group)
            except Exception as e:  # a device error: every row in flight fails with it, the loop goes on
                logger.exception("decode batcher step failed")
                with self._cond:
                    self._fail_all(e)

    def _ahead(self, row: _Row) -> bool:
        """Whether ``row``'s Exp(1) draws are made ahead on the device (CUDA, with a CUDA generator), as
        :func:`~cosytune.infer.fast.sample_decode` does; else the exact count is drawn after the head is read."""
        return self.device.type == "cuda" and row.generator.device.type == "cuda"

    def _fail_all(self, err: BaseException) -> None:
        for group in self._groups.values():
            for i, row in enumerate(group.rows):
                if row is not None:
                    row.out.put(err)
                    group.rows[i] = None
            group.live.zero_()
        self._stats["in_use"] = 0
        for _, row in self._pending:
            row.out.put(err)
        self._pending.clear()

    def _finish(self, group: _Group, row: _Row) -> None:
        group.live[row.slot] = 0
        row.out.put(_END)
        with self._cond:
            group.rows[row.slot] = None
            self._stats["in_use"] -= 1

    def _drop_closed(self, group: _Group) -> None:
        for row in group.active():
            if row.closed:
                self._finish(group, row)

    def _admit(self, group: _Group, row: _Row) -> None:
        """Prefill ``row`` alone, sample its first token, copy its keys/values into its slot."""
        dec = group.prefiller
        prompt = row.prompt
        width = int(prompt.lm_input.shape[1])
        with self.gate.shared():
            if row.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(row.ready)
            dec.stop_mask.copy_(row.stop_mask)
            dec.suppress.fill_(prompt.min_len > 0)
            dec.prefill([prompt.lm_input])
            dec._head()
            host, snap = self._read_heads(dec, [(0, row)], 1)
            s = group.cache
            s.keys[:, row.slot, :, :width].copy_(dec.cache.keys[:, 0, :, :width])
            s.values[:, row.slot, :, :width].copy_(dec.cache.values[:, 0, :, :width])
            s.lengths[row.slot] = width
            group.stop_mask[row.slot].copy_(row.stop_mask)
            group.live[row.slot] = 1
            if self._ahead(row):
                row.draws = group.draws[row.slot, :row.k]
            self._emit_all(group, dec, [(0, row)], host, snap)

    def _step(self, group: _Group) -> None:
        """One batch step for every active row of ``group``.

        Few tensor calls, and none per row but each row's draws: a tensor call can give up the GIL, and the
        loop thread must then win it back from the request threads, so under load each call can cost a wait
        (on an H100 with 16 streams a step took ~25 ms against ~5 ms alone; not yet profiled).
        """
        rows = group.active()
        b = next(x for x in group.buckets if x > max(r.slot for r in rows))
        dec = group.stepper(b)
        tokens = np.zeros(b, dtype=np.int64)
        suppress = np.zeros((b, 1), dtype=np.bool_)
        for r in rows:
            tokens[r.slot] = r.token
            suppress[r.slot] = r.step < r.prompt.min_len
        t0 = time.perf_counter()
        with self.gate.shared():
            t1 = time.perf_counter()
            dec.suppress.copy_(torch.from_numpy(suppress))
            dec.step(torch.from_numpy(tokens))
            live, draws = group.views[b]
            dec.cache.lengths.mul_(live)  # rows not in use stay empty
            t2 = time.perf_counter()
            host, snap = self._read_heads(dec, [(r.slot, r) for r in rows], b, draws)
            t3 = time.perf_counter()
            self._emit_all(group, dec, [(r.slot, r) for r in rows], host, snap)
        t4 = time.perf_counter()
        with self._cond:
            self._stats["steps"] += 1
            self._stats["row_steps"] += len(rows)
            for key, dt in (("gate_s", t1 - t0), ("launch_s", t2 - t1), ("read_s", t3 - t2), ("pick_s", t4 - t3)):
                self._times[key] += dt

    def _read_heads(self, dec: GraphedDecoder, rows: list[tuple[int, _Row]], b: int,
                    draws: Tensor | None = None) -> tuple[Any, Tensor]:
        """The sorted heads of ``dec``'s rows (and, on CUDA, each row's Exp(1) draws from its own generator,
        made ahead as :func:`sample_decode` does) in one transfer; and a copy of the log-probs.

        ``draws``: a step's (b, V) view of the group's draw buffer, where each row draws into its own slice
        (``_Row.draws``); None (a prefill) draws into a fresh buffer."""
        k = max(r.k for _, r in rows)
        parts = [dec.sorted_p[:, :k], dec.sorted_ids[:, :k].to(dec.sorted_p.dtype)]
        if self.device.type == "cuda":
            step = draws is not None
            if not step:
                draws = torch.ones(b, k, dtype=dec.sorted_p.dtype, device=self.device)
            for at, r in rows:
                if self._ahead(r):
                    (r.draws if step else draws[at, :r.k]).exponential_(1.0, generator=r.generator)
            parts.append(draws[:, :k])
        # The copy of the log-probs is made before the transfer's sync, so it is complete when a consumer on
        # another stream reads it.
        snap = dec.logp.clone()
        return torch.stack(parts).cpu().numpy(), snap

    def _emit_all(self, group: _Group, dec: GraphedDecoder, rows: list[tuple[int, _Row]], host: Any,
                  snap: Tensor) -> None:
        """Pick each row's token from its row ``at`` of the heads, hand the step to its consumer, advance or
        finish the row. Repetition redraws run on the device for every row that needs one and are read in
        one transfer (the same operations as a single decoder's redraw, so the same ids)."""
        picks = []
        redraws: list[Tensor] = []
        for at, row in rows:
            ahead = self._ahead(row)
            draw = exponential_draws(row.generator)
            ids, pos, pick, redraw = nucleus_pick(
                host[0, at, :row.k], host[1, at, :row.k], host[2, at, :row.k] if ahead else None, row.sampling,
                row.history, lambda count, at=at, draw=draw: draw(dec.sorted_p[at, :count]).cpu().numpy())
            if redraw:
                redraws.append(redraw_index(dec.masked[at], pick, draw))
            picks.append((at, row, ids, pos, pick, redraw))
        drawn = iter(torch.stack(redraws).tolist() if redraws else [])
        raw = snap.unbind(0)  # every row's log-probs in one call
        for at, row, ids, pos, pick, redraw in picks:
            token = next(drawn) if redraw else pick
            result = SampleResult(token, ids, pos, pick, redraw)
            stop = self.llm.config.is_stop(token)
            step = row.step
            row.out.put(DecodeStep(step, raw[at], result, token, stop))
            if stop or step + 1 == row.prompt.max_len or row.closed:
                self._finish(group, row)
                continue
            row.history.append(token)
            row.token = token
            row.step = step + 1

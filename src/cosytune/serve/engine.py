"""The synthesis side of ``cosytune serve``: one loaded model, lazily loaded variants, a bounded queue.

Threads, not processes: requests run on a fixed pool of ``workers`` threads through the public
``Synthesizer`` API (``synthesize`` and ``stream``), which keeps every request's state in the request.

* Admission: at most ``workers`` requests run and ``max_queue`` wait; one more is refused at once with
  :class:`QueueFullError` (HTTP 429 + Retry-After), before any work.
* Cancellation: a :class:`Job` carries a cancel flag and a deadline. A non-streaming request checks them
  after every speech token (``synthesize(on_token=...)``), a stream between chunks; when the client goes
  away (or the deadline passes) the synthesis stops there and its generator is closed, which hands its
  LLM decoder back to the pool. The worker slot is freed only when the work really stopped, so the
  queue never under-counts GPU work.
* Variants: ``(llm, flow)`` name pairs other than the default are loaded with ``Synthesizer.from_dir``
  (``llm_ckpt``/``flow_ckpt`` = the listed file) on first use and kept in an LRU cache bounded by count
  and by bytes of weights (``cache_bytes``; by default half the memory that was free when the server
  started, GPU memory on CUDA). The default model is never evicted.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosytune.errors import CosytuneError, UsageError
from cosytune.serve.variants import Variant, lookup, scan_variants

logger = logging.getLogger(__name__)


class QueueFullError(CosytuneError):
    """Every worker is busy and the queue is full (HTTP 429 with Retry-After)."""


class RequestTimeoutError(CosytuneError):
    """The request ran past ``request_timeout_s`` and was stopped (HTTP 504)."""


class CancelledError_(CosytuneError):
    """The client went away; the work was stopped."""


@dataclass(frozen=True)
class EngineConfig:
    """How the engine loads the model and bounds its work."""

    model_dir: Path
    run_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto (bfloat16 on a GPU that supports it, else float32)."""
    workers: int | None = None
    """Requests synthesised at once (threads); None = the rows of a continuous-batching step on a GPU (16),
    else 1."""
    max_queue: int = 8
    """Requests allowed to wait for a worker; one more gets 429."""
    request_timeout_s: float = 300.0
    max_text_chars: int = 2000
    variant_cache: int = 2
    """Variants (besides the default model) kept loaded."""
    cache_bytes: int | None = None
    """Weight bytes of cached variants; None = half the free (GPU) memory at start."""
    fast_decode: bool | None = None
    fast_flow: bool | None = None
    """Graph-replayed flow solves; None = on for CUDA (as Synthesizer.from_dir)."""
    batch_decode: bool | None = None
    """Continuous batching of concurrent requests' LLM steps; None = on for CUDA (as Synthesizer.from_dir)."""
    warmup: bool = True


@dataclass
class Job:
    """One admitted request."""

    id: str
    stream: bool
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float = math.inf
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_chunk_s: float | None = None
    state: str = "queued"
    """queued → running → done | cancelled | timeout | error."""

    def check(self) -> None:
        """Raise when the work must stop."""
        if self.cancel.is_set():
            raise CancelledError_("the client went away")
        if time.monotonic() > self.deadline:
            raise RequestTimeoutError("the request ran past the server's --request_timeout and was stopped")


class Metrics:
    """Counters for ``/metrics`` (Prometheus text format); thread-safe."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.first_chunk = [0] * len(self.BUCKETS)
        self.first_chunk_sum = 0.0
        self.first_chunk_count = 0
        self.rtf_sum = 0.0
        self.rtf_count = 0
        self.audio_s = 0.0

    def count(self, endpoint: str, outcome: str) -> None:
        with self.lock:
            self.requests[(endpoint, outcome)] = self.requests.get((endpoint, outcome), 0) + 1

    def observe(self, first_chunk_s: float | None, rtf: float | None, audio_s: float) -> None:
        with self.lock:
            if first_chunk_s is not None:
                for i, b in enumerate(self.BUCKETS):
                    if first_chunk_s <= b:
                        self.first_chunk[i] += 1
                self.first_chunk_sum += first_chunk_s
                self.first_chunk_count += 1
            if rtf is not None and math.isfinite(rtf):
                self.rtf_sum += rtf
                self.rtf_count += 1
            self.audio_s += audio_s


def _free_bytes(device: str) -> int:
    try:
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.mem_get_info()[0])
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return 4 << 30


def _weight_bytes(synth: Any) -> int:
    total = 0
    for net in (synth.llm, synth.flow, synth.hift):
        total += sum(p.numel() * p.element_size() for p in net.parameters())
        total += sum(b.numel() * b.element_size() for b in net.buffers())
    return total


class Engine:
    """Loads the model once and runs requests on a bounded pool (see the module docstring)."""

    def __init__(self, cfg: EngineConfig) -> None:
        from cosytune.infer.synthesizer import Synthesizer

        if (cfg.workers is not None and cfg.workers < 1) or cfg.max_queue < 0:
            raise UsageError(f"--workers must be >= 1 and --max_queue >= 0, got {cfg.workers}, {cfg.max_queue}")
        self.cfg = cfg
        t0 = time.perf_counter()
        self.base = Synthesizer.from_dir(cfg.model_dir, device=cfg.device, dtype=cfg.dtype,
                                         fast_decode=cfg.fast_decode, fast_flow=cfg.fast_flow,
                                         batch_decode=cfg.batch_decode, warmup=None if cfg.warmup else False)
        self.load_s = time.perf_counter() - t0
        self.dtype = str(self.base.dtype).replace("torch.", "")
        self.device = str(self.base.device)
        self.sample_rate = int(self.base.sample_rate)
        batcher = getattr(self.base, "batcher", None)
        #: Requests synthesised at once (``cfg.workers``, or what the batcher decodes together).
        self.workers = int(cfg.workers or (batcher.max_rows if batcher is not None else 1))
        self.variants = scan_variants(cfg.model_dir, cfg.run_dir)
        self._variants_lock = threading.Lock()
        self._base_bytes = _weight_bytes(self.base)
        self.cache_bytes = cfg.cache_bytes if cfg.cache_bytes is not None else _free_bytes(self.device) // 2
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._load_locks: dict[tuple[str, str], threading.Lock] = {}
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cosytune-serve")
        self._admit_lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.metrics = Metrics()
        self.runs: OrderedDict[str, dict] = OrderedDict()
        """Facts (seed, timings, info) of the last finished requests, by request id."""
        self.cancelled = 0
        self.started_at = time.time()
        if cfg.warmup:
            self._warmup()

    # ------------------------------------------------------------------ model and variants
    def _warmup(self) -> None:
        """One short synthesis so the first request does not pay for lazy set-up (text normaliser...)."""
        from cosytune.infer.synthesizer import SynthesisOptions

        spk = next(iter(self.speakers()), None)
        if spk is None:
            return
        try:
            self.base.synthesize("Hello.", spk_id=spk, options=SynthesisOptions(seed=0))
        except CosytuneError as e:  # a model that says nothing for this text still serves
            logger.info("warm-up synthesis: %s", e)

    def speakers(self) -> list[str]:
        return sorted(map(str, getattr(self.base, "spk2info", {}) or {}))

    def refresh_variants(self) -> dict[str, dict[str, Variant]]:
        """Re-scan the model and run dirs (training may have written new checkpoints)."""
        found = scan_variants(self.cfg.model_dir, self.cfg.run_dir)
        with self._variants_lock:
            self.variants = found
        return found

    def resolve_variants(self, llm: str | None, flow: str | None) -> tuple[str, str]:
        """Check both names against the listing (re-scanning once for names not seen yet)."""
        names = []
        for kind, name in (("llm", llm), ("flow", flow)):
            try:
                v = lookup(self.variants, kind, name)
            except UsageError:
                v = lookup(self.refresh_variants(), kind, name)
            names.append("model" if v is None else v.name)
        return names[0], names[1]

    def synthesizer(self, llm: str, flow: str) -> Any:
        """The Synthesizer of a checked ``(llm, flow)`` pair, loading it on first use."""
        key = (llm, flow)
        if key == ("model", "model"):
            return self.base
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            lock = self._load_locks.setdefault(key, threading.Lock())
        with lock:
            with self._cache_lock:
                if key in self._cache:
                    return self._cache[key]
            from cosytune.infer.synthesizer import Synthesizer

            v_llm = lookup(self.variants, "llm", llm)
            v_flow = lookup(self.variants, "flow", flow)
            logger.info("loading variant llm=%s flow=%s", llm, flow)
            # a variant captures its graphs on first use of each shape, not all of them at load
            synth = Synthesizer.from_dir(self.cfg.model_dir, device=self.device, dtype=self.base.dtype,
                                         llm_ckpt=v_llm.path if v_llm else None,
                                         flow_ckpt=v_flow.path if v_flow else None,
                                         fast_decode=self.cfg.fast_decode, fast_flow=self.cfg.fast_flow,
                                         batch_decode=self.cfg.batch_decode, warmup=False)
            with self._cache_lock:
                self._cache[key] = synth
                self._evict()
            return synth

    def _evict(self) -> None:
        """Drop least recently used variants beyond the count and byte bounds (keeps the newest one)."""
        def total() -> int:
            return sum(_weight_bytes(s) for s in self._cache.values())
        while len(self._cache) > max(1, self.cfg.variant_cache) or (len(self._cache) > 1 and total() > self.cache_bytes):
            key, _ = self._cache.popitem(last=False)
            logger.info("unloaded variant llm=%s flow=%s (cache bound)", *key)
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def loaded_variants(self) -> list[dict]:
        with self._cache_lock:
            return [{"llm": k[0], "flow": k[1]} for k in [("model", "model"), *self._cache]]

    # ------------------------------------------------------------------ admission
    def admit(self, stream: bool) -> Job:
        """Register a request, or raise QueueFullError when ``workers + max_queue`` are taken."""
        with self._admit_lock:
            if len(self.jobs) >= self.workers + self.cfg.max_queue:
                raise QueueFullError(f"the server is busy: {self.workers} request(s) running and "
                                     f"{self.cfg.max_queue} waiting; retry after a few seconds")
            job = Job(secrets.token_hex(8), stream, deadline=time.monotonic() + self.cfg.request_timeout_s)
            self.jobs[job.id] = job
            return job

    def _finish(self, job: Job, state: str) -> None:
        job.state = state
        with self._admit_lock:
            self.jobs.pop(job.id, None)
            if state == "cancelled":
                self.cancelled += 1

    def queue_depth(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._admit_lock:
            running = sum(1 for j in self.jobs.values() if j.state == "running")
            return running, len(self.jobs) - running

    def _loaded(self) -> list[Any]:
        """The default model and every cached variant, as loaded now."""
        with self._cache_lock:
            return [self.base, *self._cache.values()]

    def decoders_in_use(self) -> int:
        synths = self._loaded()
        pooled = sum(s.decoder_pool.stats()["in_use"] for s in synths if getattr(s, "decoder_pool", None) is not None)
        return pooled + sum(s.batcher.stats()["in_use"] for s in synths if getattr(s, "batcher", None) is not None)

    def decode_batch_stats(self) -> dict[str, float]:
        """The continuous-batching decoders' counters summed over the loaded models (see
        :meth:`~cosytune.infer.batching.DecodeBatcher.stats`); zeros when none batches."""
        synths = self._loaded()
        total = dict.fromkeys(("steps", "row_steps", "gate_s", "launch_s", "read_s", "pick_s"), 0.0)
        for s in synths:
            if getattr(s, "batcher", None) is not None:
                st = s.batcher.stats()
                for k in total:
                    total[k] += st[k]
        return total

    def retry_after_s(self) -> int:
        """A Retry-After hint: the mean request time so far, at least 1 s."""
        m = self.metrics
        with m.lock:
            n = sum(v for (_, o), v in m.requests.items() if o == "ok")
        return max(1, math.ceil((m.rtf_sum / max(m.rtf_count, 1)) * 5)) if n else 2

    def remember(self, job_id: str, facts: dict) -> None:
        self.runs[job_id] = facts
        while len(self.runs) > 256:
            self.runs.popitem(last=False)

    # ------------------------------------------------------------------ work (runs on a worker thread)
    def submit(self, job: Job, fn: Callable[[Job], Any]) -> Future:
        """Run ``fn(job)`` on a worker; the job leaves the queue when ``fn`` returns or raises."""
        def run() -> Any:
            if job.cancel.is_set():
                self._finish(job, "cancelled")
                raise CancelledError_("the client went away before the request started")
            job.state = "running"
            job.started = time.monotonic()
            try:
                out = fn(job)
            except CancelledError_:
                self._finish(job, "cancelled")
                raise
            except RequestTimeoutError:
                self._finish(job, "timeout")
                raise
            except BaseException:
                self._finish(job, "error")
                raise
            self._finish(job, "cancelled" if job.cancel.is_set() else "done")
            return out

        return self._pool.submit(run)

    def shutdown(self) -> None:
        for job in list(self.jobs.values()):
            job.cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


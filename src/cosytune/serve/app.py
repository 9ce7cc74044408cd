"""The FastAPI application of ``cosytune serve``: the speech API, metrics, and the listening lab.

Endpoints
    ``POST /v1/audio/speech``  OpenAI-compatible (``model``, ``input``, ``voice`` = spk_id, ``response_format``,
                               ``speed``, ``stream``); ``model`` may also name an LLM variant (``epoch_5``)
                               or ``llm:flow`` (``epoch_5:base``).
    ``POST /v1/tts``           every control of ``cosytune infer`` (``serve.schemas.TTSBody``); ``stream`` sends
                               audio as each chunk is ready.
    ``GET /v1/speakers``, ``GET /v1/variants``, ``GET /v1/runs/{id}`` (seed, timings, info of a finished request),
    ``GET /health``, ``GET /metrics`` (Prometheus text).
    ``GET /lab`` (the page), ``/lab/static/*``, ``/lab/api/*`` (ratings, summary, dataset review).

Every response of a synthesis carries ``X-Request-Id`` and ``X-Cosytune-Seed`` (known before the first
chunk); a non-streaming one also ``X-Cosytune-Timings`` (JSON) and ``X-Cosytune-Audio-Seconds``; a stream's
timings are at ``GET /v1/runs/{id}`` once it ends. Errors are JSON: ``{"error": {"message", "type", "code"}}``.
The text of a request is never logged or stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cosytune.errors import CosytuneError, UsageError
from cosytune.serve import encode
from cosytune.serve.engine import (
    CancelledError_,
    Engine,
    QueueFullError,
    RequestTimeoutError,
)
from cosytune.serve.schemas import (
    OPENAI_MODELS,
    Plan,
    SpeechBody,
    TTSBody,
    build_options,
    check_text,
    decode_prompt_audio,
    prompt_suffix,
)

logger = logging.getLogger(__name__)

#: Sampling presets of the lab (name -> overrides of the model's sampling values).
PRESETS: dict[str, dict[str, float | int]] = {
    "default": {},
    "focused": {"top_p": 0.5, "top_k": 10},
    "lively": {"top_p": 0.95, "top_k": 50, "temperature": 1.2},
}
#: The page's files: a request names one of these, never a path.
STATIC = {"lab.js": "text/javascript", "lab.css": "text/css", "index.html": "text/html"}


@dataclass(frozen=True)
class AppConfig:
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 << 20
    lab_dir: Path | None = None
    data_dir: Path | None = None


def error(status: int, message: str, code: str, kind: str = "invalid_request_error",
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status,
                        headers=headers)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes (413), by Content-Length or as they arrive."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        msg = (f"request body too large; this server takes at most {self.limit} bytes "
               "(--max_body_bytes)")
        if length is not None and length.isdigit():
            if int(length) > self.limit:
                return await error(413, msg, "body_too_large")(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # No Content-Length (a chunked upload): read the body up to the limit first, then hand it on.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await error(413, msg, "body_too_large")(scope, receive, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKey:
    """ASGI middleware: ``Authorization: Bearer KEY`` on the API (``/v1``, ``/lab/api``, ``/metrics``)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(("/v1/", "/lab/api/", "/metrics")):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            token = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(token, self.key):
                return await error(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                                   "invalid_api_key", "authentication_error")(scope, receive, send)
        await self.app(scope, receive, send)


def _status_of(e: Exception) -> tuple[int, str]:
    if isinstance(e, QueueFullError):
        return 429, "queue_full"
    if isinstance(e, RequestTimeoutError):
        return 504, "timeout"
    if isinstance(e, CancelledError_):
        return 499, "cancelled"
    if isinstance(e, CosytuneError):
        return 400, type(e).__name__
    return 500, "internal_error"


def create_app(engine: Engine, cfg: AppConfig | None = None) -> FastAPI:
    """The application around a loaded :class:`Engine`."""
    cfg = cfg or AppConfig()
    # No /docs: Swagger UI loads its scripts from a CDN, and this server works offline (/openapi.json stays).
    app = FastAPI(title="cosytune serve", docs_url=None, redoc_url=None)
    app.state.engine = engine
    lab_dir = cfg.lab_dir
    dataset = None
    if cfg.data_dir is not None:
        from cosytune.serve.dataset import DatasetDir

        dataset = DatasetDir(cfg.data_dir)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {e.get('msg')}")
        return error(400, "invalid request: " + "; ".join(parts), "invalid_request")

    @app.exception_handler(CosytuneError)
    async def _cosy(request: Request, exc: CosytuneError) -> JSONResponse:
        status, code = _status_of(exc)
        headers = {"Retry-After": str(engine.retry_after_s())} if status == 429 else None
        return error(status, str(exc), code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error(500, f"internal error ({type(exc).__name__}: {exc}); the server log has the details",
                     "internal_error", "server_error")

    # ------------------------------------------------------------------ synthesis
    def _plan(text: str, *, mode: str | None, spk_id: str | None, prompt_text: str | None, options: Any,
              llm: str | None, flow: str | None, stream: bool, fmt: str, what: str = "text",
              prompt_audio: str | None = None) -> Plan:
        check_text(text, engine.cfg.max_text_chars, what)
        encode.check_format(fmt, stream=stream)
        if spk_id is not None and spk_id not in engine.speakers():
            known = ", ".join(engine.speakers()) or "(none: this model dir has no spk2info.pt)"
            raise UsageError(f"unknown voice {spk_id!r}; this server has: {known} (GET /v1/speakers)")
        if stream and options.speed != 1.0:
            raise UsageError(f"speed {options.speed} cannot be streamed (the time-stretch needs the whole take); "
                             "set stream=false or speed=1")
        clip = decode_prompt_audio(prompt_audio) if prompt_audio is not None else None
        if clip is not None and spk_id is not None:
            raise UsageError("give either spk_id or prompt_audio, not both")
        llm_name, flow_name = engine.resolve_variants(llm, flow)
        return Plan(text, mode, spk_id, prompt_text, options, llm_name, flow_name, stream, fmt, clip)

    def _headers(job_id: str, plan: Plan) -> dict[str, str]:
        return {"X-Request-Id": job_id, "X-Cosytune-Seed": str(plan.options.seed), "X-Cosytune-Llm": plan.llm,
                "X-Cosytune-Flow": plan.flow, "X-Cosytune-Sample-Rate": str(engine.sample_rate),
                "Cache-Control": "no-store"}

    def _facts(job_id: str, plan: Plan, result: Any) -> dict:
        facts = {"id": job_id, "seed": result.seed, "llm": plan.llm, "flow": plan.flow,
                 "timings": jsonable(result.timings), "info": jsonable(result.info),
                 "audio_s": result.duration_s, "speech_tokens": len(result.tokens)}
        engine.remember(job_id, facts)
        engine.metrics.observe(result.timings.get("first_chunk_s"), result.timings.get("rtf"), result.duration_s)
        return facts

    async def _run(request: Request, plan: Plan, endpoint: str) -> Response:
        job = engine.admit(plan.stream)
        if plan.stream:
            return await _run_stream(request, plan, job, endpoint)

        def work(j: Any) -> Any:
            synth = engine.synthesizer(plan.llm, plan.flow)
            with prompt_file(plan) as wav:
                return synth.synthesize(plan.text, on_token=lambda n: j.check(), **plan.kwargs(wav))

        fut = asyncio.wrap_future(engine.submit(job, work))
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    job.cancel.set()
            result = fut.result()
        except CosytuneError as e:
            engine.metrics.count(endpoint, _status_of(e)[1])
            raise
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        facts = _facts(job.id, plan, result)
        engine.metrics.count(endpoint, "ok")
        headers = _headers(job.id, plan)
        headers["X-Cosytune-Timings"] = json.dumps(facts["timings"], separators=(",", ":"))
        headers["X-Cosytune-Audio-Seconds"] = f"{result.duration_s:.3f}"
        headers["X-Cosytune-Speech-Tokens"] = str(len(result.tokens))
        body = encode.encode(result.audio, result.sample_rate, plan.fmt)
        return Response(body, media_type=encode.media_type(plan.fmt, engine.sample_rate), headers=headers)

    async def _run_stream(request: Request, plan: Plan, job: Any, endpoint: str) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def push(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work(j: Any) -> None:
            synth = engine.synthesizer(plan.llm, plan.flow)
            with prompt_file(plan) as wav:
                gen = synth.stream(plan.text, **plan.kwargs(wav))
                try:
                    for chunk in gen:
                        j.check()
                        if j.first_chunk_s is None:
                            j.first_chunk_s = time.monotonic() - j.created
                        push(("chunk", chunk))
                finally:
                    gen.close()  # hands the LLM decoder back at once when stopped early

        fut = engine.submit(job, work)
        fut.add_done_callback(lambda f: push(("end", f)))

        async def next_item() -> tuple[str, Any] | None:
            """The worker's next item, or None once the client has gone away."""
            while True:
                try:
                    return await asyncio.wait_for(queue.get(), 0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None

        try:
            got = await next_item()
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        if got is None:
            job.cancel.set()
            engine.metrics.count(endpoint, "disconnected")
            return Response(status_code=499)
        kind, first = got
        if kind == "end":
            exc = first.exception()
            if exc is None:
                exc = CosytuneError("the stream ended without audio")
            engine.metrics.count(endpoint, _status_of(exc)[1])
            raise exc
        headers = _headers(job.id, plan)
        headers["X-Cosytune-Stream"] = "chunks"

        async def body():
            finished = False
            try:
                if plan.fmt == "wav":
                    yield encode.wav_header(engine.sample_rate)
                item: Any = first
                while True:
                    if item.audio.shape[0]:
                        yield encode.pcm16(item.audio)
                    if item.final:
                        finished = True
                        _facts(job.id, plan, item.result)
                        engine.metrics.count(endpoint, "ok")
                        return
                    got = await next_item()
                    if got is None:
                        return
                    kind, item = got
                    if kind == "end":
                        finished = True  # the worker stopped by itself (an error or the deadline)
                        exc = item.exception()
                        engine.metrics.count(endpoint, _status_of(exc)[1] if exc else "truncated")
                        if exc is not None and not isinstance(exc, CosytuneError):
                            logger.error("request %s failed mid-stream: %s: %s", job.id, type(exc).__name__, exc)
                        return  # the status line is sent: a stopped stream just ends early
            finally:
                if not finished:
                    job.cancel.set()
                    engine.metrics.count(endpoint, "disconnected")

        return StreamingResponse(body(), media_type=encode.media_type(plan.fmt, engine.sample_rate), headers=headers)

    def _base_sampling() -> Any:
        return engine.base.llm.config.sampling

    @app.post("/v1/tts")
    async def tts(body: TTSBody, request: Request) -> Response:
        options = build_options(_base_sampling(), speed=body.speed, seed=body.seed, sampling=body.sampling,
                                text_frontend=body.text_frontend, prompt_strategy=body.prompt_strategy,
                                guide_sep=body.guide_sep, instruct=body.instruct)
        plan = _plan(body.text, mode=body.mode, spk_id=body.spk_id, prompt_text=body.prompt_text, options=options,
                     llm=body.llm_ckpt, flow=body.flow_ckpt, stream=body.stream, fmt=body.response_format,
                     prompt_audio=body.prompt_audio)
        return await _run(request, plan, "tts")

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechBody, request: Request) -> Response:
        if body.stream_format == "sse":
            raise UsageError("stream_format 'sse' is not supported; use stream_format 'audio' (or stream=true)")
        llm = flow = None
        if body.model not in OPENAI_MODELS:
            llm, _, flow = body.model.partition(":")
            flow = flow or None
        options = build_options(_base_sampling(), speed=body.speed, seed=body.seed, sampling=None)
        plan = _plan(body.input, mode=None, spk_id=body.voice, prompt_text=None, options=options, llm=llm,
                     flow=flow, stream=body.stream or body.stream_format == "audio", fmt=body.response_format,
                     what="input")
        return await _run(request, plan, "speech")

    # ------------------------------------------------------------------ facts
    @app.get("/v1/speakers")
    async def speakers() -> dict:
        return {"speakers": engine.speakers()}

    @app.get("/v1/variants")
    async def variants() -> dict:
        found = await asyncio.to_thread(engine.refresh_variants)
        out = {kind: [{"kind": kind, "name": "model", "source": "model_dir"}] for kind in ("llm", "flow")}
        for kind, table in found.items():
            out[kind] = [v.public() for v in table.values()] or out[kind]
        return {**out, "loaded": engine.loaded_variants()}

    @app.get("/v1/runs/{run_id}")
    async def run_facts(run_id: str) -> Response:
        facts = engine.runs.get(run_id)
        if facts is None:
            return error(404, f"no finished request {run_id!r} (the last 256 are kept)", "not_found")
        return JSONResponse(facts)

    @app.get("/health")
    async def health() -> dict:
        running, waiting = engine.queue_depth()
        return {"status": "ok", "device": engine.device, "dtype": engine.dtype, "sample_rate": engine.sample_rate,
                "speakers": len(engine.speakers()), "running": running, "waiting": waiting,
                "decoders_in_use": engine.decoders_in_use(), "cancelled": engine.cancelled,
                "uptime_s": round(time.time() - engine.started_at, 1)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ lab
    @app.get("/")
    async def root() -> Response:
        return Response(status_code=307, headers={"Location": "/lab"})

    @app.get("/lab")
    async def lab_page() -> Response:
        return _static("index.html")

    @app.get("/lab/static/{name}")
    async def lab_static(name: str) -> Response:
        return _static(name)

    def _static(name: str) -> Response:
        if name not in STATIC:
            return error(404, f"no page file {name!r}", "not_found")
        data = (files("cosytune.serve") / "static" / name).read_bytes()
        return Response(data, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.get("/lab/api/config")
    async def lab_config() -> dict:
        return {"speakers": engine.speakers(), "presets": PRESETS, "formats": encode.available_formats(),
                "dataset": dataset is not None, "ratings": lab_dir is not None, "sample_rate": engine.sample_rate,
                "max_text_chars": engine.cfg.max_text_chars}

    def _ratings_path() -> Path:
        if lab_dir is None:
            raise UsageError("this server has no lab dir to keep ratings in; start it with --run_dir")
        return lab_dir / "ratings.jsonl"

    @app.post("/lab/api/ratings")
    async def add_rating(request: Request) -> dict:
        from cosytune.serve.lab import append_rating

        body = await _json(request)
        rec = await asyncio.to_thread(append_rating, _ratings_path(), text=body.get("text"),
                                      choice=body.get("choice"), a=body.get("a"), b=body.get("b"))
        return {"ok": True, "record": rec}

    @app.get("/lab/api/ratings/summary")
    async def ratings_summary() -> dict:
        from cosytune.serve.lab import summarize

        return {"variants": await asyncio.to_thread(summarize, _ratings_path())}

    def _dataset() -> Any:
        if dataset is None:
            raise UsageError("this server has no dataset; start it with --data_dir <transcribe out dir>")
        return dataset

    @app.get("/lab/api/dataset")
    async def dataset_rows() -> dict:
        return {"rows": await asyncio.to_thread(_dataset().rows)}

    @app.get("/lab/api/dataset/audio/{utt}")
    async def dataset_audio(utt: str) -> Response:
        from fastapi.responses import FileResponse

        return FileResponse(await asyncio.to_thread(_dataset().wav_of, utt), media_type="audio/wav")

    @app.post("/lab/api/dataset/rows/{utt}")
    async def dataset_edit(utt: str, request: Request) -> dict:
        body = await _json(request)
        text, delete = body.get("text"), body.get("delete")
        if delete is not None and not isinstance(delete, bool):
            raise UsageError(f"'delete' must be true or false, got {delete!r}")
        return await asyncio.to_thread(_dataset().edit, utt, text=text, delete=delete)

    @app.post("/lab/api/dataset/apply")
    async def dataset_apply() -> dict:
        return {"summary": await asyncio.to_thread(_dataset().apply)}

    async def _json(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError as e:
            raise UsageError(f"expected a JSON object body ({e})") from e
        if not isinstance(body, dict):
            raise UsageError("expected a JSON object body")
        return body

    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["X-Request-Id", "X-Cosytune-Seed", "X-Cosytune-Timings"])
    if cfg.api_key:
        app.add_middleware(ApiKey, key=cfg.api_key)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    return app


@contextlib.contextmanager
def prompt_file(plan: Plan) -> Iterator[Path | None]:
    """The request's prompt clip as a private temporary file (deleted afterwards); None without one."""
    if plan.prompt_audio is None:
        yield None
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cosytune-serve-") as d:
        path = Path(d) / f"prompt{prompt_suffix(plan.prompt_audio)}"
        path.write_bytes(plan.prompt_audio)
        yield path


def jsonable(value: Any) -> Any:
    """Plain JSON (no NaN/Infinity: they become null)."""
    import math

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def prometheus_text(engine: Engine) -> str:
    """The ``/metrics`` page."""
    m = engine.metrics
    running, waiting = engine.queue_depth()
    lines = ["# HELP cosytune_requests_total Synthesis requests by endpoint and outcome.",
             "# TYPE cosytune_requests_total counter"]
    with m.lock:
        for (endpoint, outcome), n in sorted(m.requests.items()):
            lines.append(f'cosytune_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} {n}')
        lines += ["# HELP cosytune_queue_depth Requests waiting for a worker.", "# TYPE cosytune_queue_depth gauge",
                  f"cosytune_queue_depth {waiting}",
                  "# HELP cosytune_requests_running Requests being synthesised.",
                  "# TYPE cosytune_requests_running gauge", f"cosytune_requests_running {running}",
                  "# HELP cosytune_decoders_in_use LLM decoders checked out of the pools.",
                  "# TYPE cosytune_decoders_in_use gauge", f"cosytune_decoders_in_use {engine.decoders_in_use()}",
                  "# HELP cosytune_cancelled_total Requests stopped because the client went away.",
                  "# TYPE cosytune_cancelled_total counter", f"cosytune_cancelled_total {engine.cancelled}",
                  "# HELP cosytune_first_chunk_seconds Time to the first audio of streamed requests.",
                  "# TYPE cosytune_first_chunk_seconds histogram"]
        for b, n in zip(m.BUCKETS, m.first_chunk):
            le = "+Inf" if b == float("inf") else f"{b:g}"
            lines.append(f'cosytune_first_chunk_seconds_bucket{{le="{le}"}} {n}')
        lines += [f"cosytune_first_chunk_seconds_sum {m.first_chunk_sum:.6f}",
                  f"cosytune_first_chunk_seconds_count {m.first_chunk_count}",
                  "# HELP cosytune_rtf Real-time factor (synthesis seconds per audio second).",
                  "# TYPE cosytune_rtf summary", f"cosytune_rtf_sum {m.rtf_sum:.6f}", f"cosytune_rtf_count {m.rtf_count}",
                  "# HELP cosytune_audio_seconds_total Audio produced.", "# TYPE cosytune_audio_seconds_total counter",
                  f"cosytune_audio_seconds_total {m.audio_s:.3f}"]
    b = engine.decode_batch_stats()
    lines += ["# HELP cosytune_decode_steps_total Continuous-batching LLM steps run.",
              "# TYPE cosytune_decode_steps_total counter", f"cosytune_decode_steps_total {int(b['steps'])}",
              "# HELP cosytune_decode_tokens_total Speech tokens those steps decoded (rows per step = this / steps).",
              "# TYPE cosytune_decode_tokens_total counter", f"cosytune_decode_tokens_total {int(b['row_steps'])}",
              ("# HELP cosytune_decode_step_seconds_total Time of those steps by phase: device gate wait, launch, "
               "read-back (waits for the device), token pick."),
              "# TYPE cosytune_decode_step_seconds_total counter"]
    lines += [f'cosytune_decode_step_seconds_total{{phase="{k[:-2]}"}} {b[k]:.6f}'
              for k in ("gate_s", "launch_s", "read_s", "pick_s")]
    return "\n".join(lines) + "\n"

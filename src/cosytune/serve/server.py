"""Start ``cosytune serve``: check the flags, load the model, run uvicorn until interrupted."""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cosytune.errors import UsageError, require

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``cosytune serve`` takes (see ``cosytune serve --help``)."""

    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    run_dir: Path | None = None
    data_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    api_key: str | None = None
    insecure: bool = False
    cors_origins: tuple[str, ...] = ()
    workers: int | None = None
    max_queue: int = 8
    request_timeout_s: float = 300.0
    max_text_chars: int = 2000
    max_body_bytes: int = 4 << 20
    variant_cache: int = 2
    cache_mb: int | None = None
    fast_decode: bool | None = None
    fast_flow: bool | None = None
    batch_decode: bool | None = None
    warmup: bool = True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_settings(s: ServeSettings) -> None:
    """Refuse, before loading anything, settings that would expose the server or cannot work."""
    if not is_loopback(s.host) and not s.api_key and not s.insecure:
        raise UsageError(f"--host {s.host} makes the server reachable from other machines; give --api_key KEY "
                         "(clients send 'Authorization: Bearer KEY'), or --insecure if the network is trusted")
    if not 0 <= s.port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {s.port}")
    if not Path(s.model_dir).is_dir():
        raise UsageError(f"--model_dir {s.model_dir} is not a folder; expected a CosyVoice 3 model dir")
    if s.run_dir is not None and not Path(s.run_dir).is_dir():
        raise UsageError(f"--run_dir {s.run_dir} is not a folder; expected a training run dir (exp/llm) or work dir")
    for name, v in (("--workers", 1 if s.workers is None else s.workers), ("--max_text_chars", s.max_text_chars),
                    ("--max_body_bytes", s.max_body_bytes), ("--variant_cache", s.variant_cache)):
        if v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    if s.max_queue < 0 or s.request_timeout_s <= 0:
        raise UsageError("--max_queue must be >= 0 and --request_timeout > 0")


def lab_dir_of(s: ServeSettings) -> Path:
    """Where the lab keeps ratings: ``<run dir>/lab``, else ``<model dir>/lab``."""
    return Path(s.run_dir if s.run_dir is not None else s.model_dir) / "lab"


def build_app(s: ServeSettings):
    """Load the model and return the FastAPI app (the engine is ``app.state.engine``)."""
    from cosytune.serve.app import AppConfig, create_app
    from cosytune.serve.engine import Engine, EngineConfig

    check_settings(s)
    engine = Engine(EngineConfig(
        model_dir=Path(s.model_dir), run_dir=Path(s.run_dir) if s.run_dir else None, device=s.device, dtype=s.dtype,
        workers=s.workers, max_queue=s.max_queue, request_timeout_s=s.request_timeout_s,
        max_text_chars=s.max_text_chars, variant_cache=s.variant_cache,
        cache_bytes=None if s.cache_mb is None else s.cache_mb << 20, fast_decode=s.fast_decode,
        fast_flow=s.fast_flow, batch_decode=s.batch_decode, warmup=s.warmup))
    return create_app(engine, AppConfig(api_key=s.api_key, cors_origins=tuple(s.cors_origins),
                                        max_body_bytes=s.max_body_bytes, lab_dir=lab_dir_of(s),
                                        data_dir=Path(s.data_dir) if s.data_dir else None))


def run_server(s: ServeSettings) -> list[tuple[str, object]]:
    """Serve until Ctrl-C; returns the closing summary rows."""
    require("fastapi", "serve", "cosytune serve")
    uvicorn = require("uvicorn", "serve", "cosytune serve")
    check_settings(s)
    t0 = time.perf_counter()
    app = build_app(s)
    engine = app.state.engine
    url = f"http://{s.host if ':' not in s.host else f'[{s.host}]'}:{s.port}"
    logger.info("loaded %s on %s in %.1f s; %d speaker(s); serving %s (the listening lab: %s/lab)",
                s.model_dir, engine.device, time.perf_counter() - t0, len(engine.speakers()), url, url)
    config = uvicorn.Config(app, host=s.host, port=s.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: stopping is the normal way out
        pass
    finally:
        engine.shutdown()
    m = engine.metrics
    ok = sum(v for (_, o), v in m.requests.items() if o == "ok")
    failed = sum(v for (_, o), v in m.requests.items() if o != "ok")
    return [("served", url), ("requests", f"{ok} ok, {failed} refused/failed, {engine.cancelled} cancelled"),
            ("audio", f"{m.audio_s:.1f} s"), ("uptime", f"{time.time() - engine.started_at:.0f} s")]

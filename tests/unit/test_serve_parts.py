"""The pieces of ``cosytune serve`` that need no model: variant lookup, ratings and their summary, audio
encodings, the bind/key rules."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf

from cosytune.errors import UsageError
from cosytune.serve import encode
from cosytune.serve.lab import append_rating, summarize, wilson
from cosytune.serve.server import ServeSettings, check_settings, is_loopback
from cosytune.serve.variants import lookup, scan_variants

try:  # module level: FastAPI resolves the endpoint's annotations in this module's globals
    from fastapi import Request
except ImportError:  # pragma: no cover - fastapi is in the dev extra
    Request = None


def _ckpt(run, name, epoch):
    (run / f"{name}.pt").write_bytes(b"weights")
    (run / f"{name}.yaml").write_text(f"epoch: {epoch}\nstep: {epoch * 5}\nloss_dict: {{loss: 1.5}}\n")


def test_variants_are_found_by_name_and_never_joined_as_paths(tmp_path):
    base, model, work = tmp_path / "base", tmp_path / "model", tmp_path / "work"
    for d in (base, model):
        d.mkdir()
        (d / "llm.pt").write_bytes(b"x")
        (d / "flow.pt").write_bytes(b"x")
    (model / "cosytune_manifest.json").write_text(json.dumps({"base_model_dir": str(base)}))
    run = work / "exp" / "llm"
    run.mkdir(parents=True)
    _ckpt(run, "epoch_3_whole", 3)
    _ckpt(run, "epoch_4_step_20", 4)
    (run / "epoch_5_whole.pt").write_bytes(b"unfinished: no yaml")
    (run / "epoch_3_whole.state.pt").write_bytes(b"resume state")
    (run / "llm_avg.pt").write_bytes(b"avg")
    found = scan_variants(model, work)
    assert set(found["llm"]) == {"model", "base", "epoch_3", "epoch_4_step_20", "llm_avg"}
    assert set(found["flow"]) == {"model", "base"}
    assert found["llm"]["epoch_3"].epoch == 3 and found["llm"]["epoch_3"].cv_loss == 1.5
    assert "path" not in found["llm"]["epoch_3"].public()
    assert lookup(found, "llm", "model") is None and lookup(found, "llm", None) is None
    assert lookup(found, "flow", "base").path == (base / "flow.pt").resolve()
    for bad in ("../../x", "/etc/passwd", "epoch_3_whole.pt", "epoch_5", "..", "llm_avg/../base", "", "x" * 200):
        with pytest.raises(UsageError, match="unknown llm variant"):
            lookup(found, "llm", bad)
    # a run dir given directly: its kind comes from its name (or train_config.yaml)
    assert set(scan_variants(model, run)["llm"]) >= {"epoch_3", "llm_avg"}
    flow_run = tmp_path / "somewhere"
    flow_run.mkdir()
    (flow_run / "train_config.yaml").write_text("model: flow\n")
    _ckpt(flow_run, "epoch_1_whole", 1)
    assert "epoch_1" in scan_variants(model, flow_run)["flow"]


def test_ratings_are_appended_without_the_text_and_summarised(tmp_path):
    path = tmp_path / "lab" / "ratings.jsonl"
    a = {"llm": "epoch_5", "flow": "model", "preset": "default", "seed": 1, "settings": {"sampling": {}}}
    b = {"llm": "model", "flow": "model", "preset": "default", "seed": 1}
    for choice in ("a", "a", "same", "b"):
        rec = append_rating(path, text="Secret sentence.", choice=choice, a=a, b=b)
    assert rec["winner"] == "llm=model flow=model preset=default"
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and "Secret" not in path.read_text()
    table = {r["variant"]: r for r in summarize(path)}
    tuned = table["llm=epoch_5 flow=model preset=default"]
    assert (tuned["n"], tuned["wins"], tuned["ties"], tuned["losses"]) == (4, 2, 1, 1)
    assert tuned["win_rate"] == pytest.approx(2.5 / 4)
    lo, hi = tuned["ci95"]
    assert 0 < lo < tuned["win_rate"] < hi < 1
    assert table["llm=model flow=model preset=default"]["win_rate"] == pytest.approx(1.5 / 4)
    for bad in ({"choice": "c"}, {"a": "x"}, {"text": " "}, {"b": {**b, "seed": -1}}):
        with pytest.raises(UsageError):
            append_rating(path, **{"text": "t", "choice": "a", "a": a, "b": b, **bad})
    assert summarize(tmp_path / "none.jsonl") == []


def test_wilson_interval():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.490, abs=1e-3) and hi == pytest.approx(0.943, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_encodings_round_trip():
    t = np.arange(4800) / 24000
    audio = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    wav, sr = sf.read(io.BytesIO(encode.encode(audio, 24000, "wav")), dtype="int16")
    assert sr == 24000 and np.array_equal(wav, np.frombuffer(encode.pcm16(audio), "<i2"))
    flac, _ = sf.read(io.BytesIO(encode.encode(audio, 24000, "flac")), dtype="int16")
    assert np.array_equal(flac, wav)
    header = encode.wav_header(24000)
    assert header[:4] == b"RIFF" and len(header) == 44 and header[40:44] == b"\xff\xff\xff\xff"
    assert {"wav", "pcm", "flac"} <= set(encode.available_formats())
    with pytest.raises(UsageError, match="cannot be streamed"):
        encode.check_format("mp3", stream=True)
    with pytest.raises(UsageError, match="not supported"):
        encode.check_format("aac", stream=False)


def test_only_loopback_binds_without_a_key(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(UsageError, match="--api_key"):
        check_settings(ServeSettings(model_dir=tmp_path, host="0.0.0.0"))
    check_settings(ServeSettings(model_dir=tmp_path, host="0.0.0.0", api_key="k"))
    check_settings(ServeSettings(model_dir=tmp_path, host="0.0.0.0", insecure=True))
    with pytest.raises(UsageError, match="not a folder"):
        check_settings(ServeSettings(model_dir=tmp_path / "nope"))


def test_cli_refuses_an_open_host_without_a_key(tmp_path, capsys):
    from cosytune.cli.main import main

    assert main(["serve", "--model_dir", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "--api_key" in capsys.readouterr().err


def test_api_key_and_body_limit_middleware():
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from cosytune.serve.app import ApiKey, BodyLimit

    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    app.add_middleware(ApiKey, key="s3cret")
    app.add_middleware(BodyLimit, limit=100)
    c = TestClient(app)
    assert c.get("/health").status_code == 200  # open: load balancers probe it
    r = c.post("/v1/echo", content=b"x")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert c.post("/v1/echo", content=b"x", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert c.post("/v1/echo", content=b"x" * 100, headers=ok).json() == {"n": 100}
    big = c.post("/v1/echo", content=b"x" * 101, headers=ok)
    assert big.status_code == 413 and "at most 100 bytes" in big.json()["error"]["message"]

    def chunks(n):  # no Content-Length: a chunked upload
        yield from (b"x" * 10 for _ in range(n))

    assert c.post("/v1/echo", content=chunks(10), headers=ok).json() == {"n": 100}
    assert c.post("/v1/echo", content=chunks(11), headers=ok).status_code == 413


def test_a_job_stops_when_cancelled_or_past_its_deadline():
    import time

    from cosytune.serve.engine import CancelledError_, Job, RequestTimeoutError

    job = Job("a", stream=True, deadline=time.monotonic() + 60)
    job.check()  # nothing to stop yet
    job.cancel.set()
    with pytest.raises(CancelledError_):
        job.check()
    with pytest.raises(RequestTimeoutError, match="request_timeout"):
        Job("b", stream=False, deadline=time.monotonic() - 1).check()

"""``cosytune serve --api_key KEY`` on a live loopback server, and the byte bound of the variant cache
(``--cache_mb``) on the serve engine in-process, both with the tiny speaker model and its checkpoint variants.

The key guards the API (``/v1/...``, ``/lab/api/...``, ``/metrics``); ``/health`` stays open for probes, and
so do the lab page and its files (the page asks for the key when the API answers 401).
"""

from __future__ import annotations

import io

import pytest
import soundfile as sf
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow  # the tiny model with variants (~20 s), a server start (~30-60 s on 2 cores)

from serve_helpers import ServerProcess, variant_model

KEY = "k3y-for-tests"
TEXT = "Hello there, this is a short test."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return variant_model(tmp_path_factory.mktemp("serve_key_cache"))


@pytest.fixture(scope="module")
def keyed(dirs, tmp_path_factory):
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    server = ServerProcess(["--model_dir", str(dirs["model"]), "--device", "cpu", "--workers", "1", "--no_warmup",
                            "--api_key", KEY], log)
    yield server.url
    assert server.stop() == 0, server.output()
    assert KEY not in server.output()  # the key is never logged


def _refused(r: httpx.Response) -> None:
    assert r.status_code == 401, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert "API key" in err["message"] and "Authorization: Bearer" in err["message"]  # says what to send


def test_api_needs_the_key_and_health_and_the_lab_page_stay_open(keyed):
    def get(path: str, **headers: str) -> httpx.Response:
        return httpx.get(keyed + path, headers=headers, timeout=30)

    for path in ("/v1/speakers", "/v1/variants", "/lab/api/config", "/metrics"):
        _refused(get(path))
        _refused(get(path, Authorization="Bearer not-the-key"))
        _refused(get(path, Authorization=KEY))  # the key without the Bearer scheme
        _refused(get(path, Authorization=f"Basic {KEY}"))
        assert get(path, Authorization=f"Bearer {KEY}").status_code == 200, path
    assert get("/v1/speakers", Authorization=f"bearer {KEY}").json()["speakers"] == ["alice"]  # scheme: any case
    _refused(httpx.post(keyed + "/v1/tts", json={"text": TEXT, "spk_id": "alice"}, timeout=30))
    health = get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert get("/lab").status_code == 200 and get("/lab/static/lab.js").status_code == 200


def test_an_openai_client_with_the_key_gets_speech_and_a_wrong_key_gets_401(keyed):
    openai = pytest.importorskip("openai")
    wrong = openai.OpenAI(base_url=keyed + "/v1", api_key="wrong", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.audio.speech.create(model="tts-1", voice="alice", input=TEXT, response_format="wav")
    assert e.value.status_code == 401 and "API key" in str(e.value)
    client = openai.OpenAI(base_url=keyed + "/v1", api_key=KEY, max_retries=0, timeout=120)
    resp = client.audio.speech.create(model="tts-1", voice="alice", input=TEXT, response_format="wav",
                                      extra_body={"seed": 3})
    audio, sr = sf.read(io.BytesIO(resp.content), dtype="float32")
    assert sr == 24000 and audio.ndim == 1 and audio.shape[0] > 0


def test_variants_beyond_the_byte_bound_evict_the_least_recently_used(dirs):
    from cosytune.serve.engine import _weight_bytes
    from cosytune.serve.server import ServeSettings, build_app

    engine = build_app(ServeSettings(model_dir=dirs["model"], run_dir=dirs["run"], device="cpu", warmup=False,
                                     variant_cache=10, cache_mb=3)).state.engine
    try:
        assert engine.cache_bytes == 3 << 20  # --cache_mb reaches the engine in bytes
        one = _weight_bytes(engine.base)  # every variant of the tiny model holds as many weight bytes
        engine.cache_bytes = int(2.5 * one)  # room for two variants, not three

        def loaded() -> list[str]:
            held = engine.loaded_variants()
            assert held[0] == {"llm": "model", "flow": "model"}  # the default model is never evicted
            return [v["llm"] for v in held[1:]]

        e1 = engine.synthesizer("epoch_1", "model")
        e2 = engine.synthesizer("epoch_2", "model")
        assert loaded() == ["epoch_1", "epoch_2"]  # two fit
        assert not torch.equal(next(e1.llm.parameters()), next(e2.llm.parameters()))  # really other weights
        assert engine.synthesizer("epoch_1", "model") is e1  # a hit: epoch_1 is now the most recently used
        avg = engine.synthesizer("llm_avg", "model")
        assert loaded() == ["epoch_1", "llm_avg"]  # the third pushed out the least recently used, epoch_2
        assert engine.synthesizer("epoch_2", "model") is not e2  # gone: loaded again...
        assert loaded() == ["llm_avg", "epoch_2"]  # ...evicting epoch_1 this time
        assert engine.synthesizer("llm_avg", "model") is avg
        engine.cache_bytes = one - 1  # a bound below one variant still keeps the newest one
        engine.synthesizer("base", "base")
        assert engine.loaded_variants()[1:] == [{"llm": "base", "flow": "base"}]
    finally:
        engine.shutdown()


def test_metrics_count_the_continuous_batching_steps(dirs):
    """With continuous batching on (forced on CPU here; the GPU default), /metrics reports its steps, the
    tokens they decoded and the steps' time by phase, and they grow with a request."""
    from cosytune.serve.app import prometheus_text
    from cosytune.serve.server import ServeSettings, build_app

    engine = build_app(ServeSettings(model_dir=dirs["model"], run_dir=dirs["run"], device="cpu", warmup=False,
                                     fast_decode=True, batch_decode=True)).state.engine
    try:
        def value(text: str, name: str) -> float:
            return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])

        before = prometheus_text(engine)
        assert value(before, "cosytune_decode_steps_total") == 0
        engine.base.synthesize(TEXT, spk_id="alice")
        after = prometheus_text(engine)
        steps, tokens = value(after, "cosytune_decode_steps_total"), value(after, "cosytune_decode_tokens_total")
        assert steps > 0 and tokens >= steps
        for phase in ("gate", "launch", "read", "pick"):
            assert f'cosytune_decode_step_seconds_total{{phase="{phase}"}}' in after
        assert value(after, 'cosytune_decode_step_seconds_total{phase="launch"}') > 0
    finally:
        engine.shutdown()

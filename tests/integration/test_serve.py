"""``cosytune serve`` end to end: the real server (``python -m cosytune serve``) on a free loopback port with a
tiny real model, checkpoint variants and a transcribed dataset; an OpenAI client; raw HTTP streaming;
bad requests; a full queue; a client that walks away mid-stream; and the listening lab driven in headless
Chromium (Debian's package, through Selenium and chromium-driver; nothing is downloaded).

One server serves the whole module (starting it loads the model once, ~30-60 s on 2 CPU cores).
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow  # one server for the module: ~1 min to start on 2 cores, ~1 min of tests

from serve_helpers import (
    ServerProcess,
    browser_missing,
    start_browser,
    transcribed_dataset,
    variant_model,
)

MAX_TEXT = 400
PROMPT_TRANSCRIPT = "Agent login. Please enter your agent number followed by the pound key."
TEXT = "Hello there, this is a short test of the speech server."
LONG = ("This is a much longer passage that goes on for a while, with many words in it, so that the tiny model "
        "keeps streaming for several chunks before it stops. ") * 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    dirs = variant_model(root)
    data = transcribed_dataset(root / "dataset")
    server = ServerProcess(["--model_dir", str(dirs["model"]), "--run_dir", str(dirs["run"]), "--data_dir", str(data),
                            "--device", "cpu", "--fast_decode", "--workers", "1", "--max_queue", "2",
                            "--max_text_chars", str(MAX_TEXT), "--max_body_bytes", "400000"], root / "server.log")
    yield {"url": server.url, "data": data, "run": dirs["run"], "server": server}
    rc = server.stop()
    out = server.output()
    assert rc == 0, out
    assert "serve" in out and "requests" in out  # the closing summary
    for text in (TEXT, LONG):
        assert text[:30] not in out  # the text of a request is never logged


def post(url: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120, **kw)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def test_openai_client_gets_wav_flac_and_mp3(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    got = {}
    for fmt in ("wav", "flac", "mp3"):
        resp = client.audio.speech.create(model="tts-1", voice="alice", input=TEXT, response_format=fmt,
                                          extra_body={"seed": 5})
        audio, sr = sf.read(io.BytesIO(resp.content), dtype="float32")
        assert sr == 24000 and audio.ndim == 1 and audio.shape[0] > 2400, fmt
        got[fmt] = audio
    n = got["wav"].shape[0]
    assert got["flac"].shape[0] == n and np.abs(got["flac"] - got["wav"]).max() < 1e-4  # lossless, same seed
    assert abs(got["mp3"].shape[0] - n) < 0.05 * n + 2400  # mp3 adds codec padding
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alice", input=TEXT,
                                                            response_format="pcm", extra_body={"stream": True,
                                                                                               "seed": 5}) as r:
        pcm = b"".join(r.iter_bytes())
    assert len(pcm) // 2 == n


def test_stream_arrives_in_chunks_equal_to_the_one_shot_take(served):
    url = served["url"]
    body = {"text": LONG, "spk_id": "alice", "seed": 11, "response_format": "pcm"}
    whole = post(url, "/v1/tts", body)
    assert whole.status_code == 200, whole.text
    assert whole.headers["X-Cosytune-Seed"] == "11"
    timings = json.loads(whole.headers["X-Cosytune-Timings"])
    assert timings["rtf"] > 0 and timings["total_s"] > 0
    pieces, arrivals = [], []
    t0 = time.monotonic()
    with httpx.stream("POST", url + "/v1/tts", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["X-Cosytune-Stream"] == "chunks"
        rid = r.headers["X-Request-Id"]
        for piece in r.iter_raw():
            pieces.append(piece)
            arrivals.append(time.monotonic() - t0)
    assert len(pieces) >= 2, "the audio came in one piece"
    assert arrivals[0] < arrivals[-1]
    streamed = np.frombuffer(b"".join(pieces), "<i2").astype(np.int32)
    one_shot = np.frombuffer(whole.content, "<i2").astype(np.int32)
    # Same seed → same speech tokens → same length; the streamed flow sees the tokens chunk by chunk (upstream's
    # chunk-masked attention), so samples may differ by a rounding step or a few, never audibly.
    assert streamed.shape == one_shot.shape
    assert np.abs(streamed - one_shot).max() <= 33, np.abs(streamed - one_shot).max()  # ≤ 1e-3 of full scale
    facts = httpx.get(f"{url}/v1/runs/{rid}", timeout=10).json()
    assert facts["seed"] == 11 and facts["timings"]["first_chunk_s"] > 0 and facts["timings"]["chunks"] >= 2
    assert facts["speech_tokens"] == int(whole.headers["X-Cosytune-Speech-Tokens"])
    assert "text" not in json.dumps(facts["info"]).lower().replace("text_", "").replace("_text", "")


def test_wav_stream_has_an_open_ended_header(served):
    with httpx.stream("POST", served["url"] + "/v1/tts", timeout=120,
                      json={"text": TEXT, "spk_id": "alice", "seed": 2, "stream": True}) as r:
        data = r.read()
    assert r.status_code == 200 and data[:4] == b"RIFF" and data[8:12] == b"WAVE" and len(data) > 44 + 4800


@pytest.mark.parametrize("body, status, words", [
    ({"text": TEXT, "spk_id": "nobody"}, 400, "unknown voice 'nobody'"),
    ({"text": "   ", "spk_id": "alice"}, 400, "empty"),
    ({"text": "x" * (MAX_TEXT + 1), "spk_id": "alice"}, 400, f"at most {MAX_TEXT}"),
    ({"text": "y" * 500_000, "spk_id": "alice"}, 413, "too large"),
    ({"text": TEXT, "spk_id": "alice", "sampling": {"top_p": 2.0}}, 400, "top_p"),
    ({"text": TEXT, "spk_id": "alice", "sampling": {"temperature": -1}}, 400, "temperature"),
    ({"text": TEXT, "spk_id": "alice", "llm_ckpt": "../../x"}, 400, "unknown llm variant"),
    ({"text": TEXT, "spk_id": "alice", "flow_ckpt": "/etc/passwd"}, 400, "unknown flow variant"),
    ({"text": TEXT, "spk_id": "alice", "llm_ckpt": "epoch_1_whole.pt"}, 400, "variants are names"),
    ({"text": TEXT, "spk_id": "alice", "speed": 1.5, "stream": True}, 400, "cannot be streamed"),
    ({"text": TEXT, "spk_id": "alice", "response_format": "aac"}, 400, "not supported"),
    ({"text": TEXT, "spk_id": "alice", "seed": -3}, 400, "seed"),
    ({"text": TEXT, "spk_id": "alice", "colour": "blue"}, 400, "colour"),
    ({"text": "<|endofprompt|>", "spk_id": "alice"}, 400, "nothing to speak"),
    ({"text": TEXT, "prompt_audio": "not base64!"}, 400, "base64"),
    ({"text": TEXT, "prompt_audio": "aGVsbG8gd29ybGQ="}, 400, "not a wav"),
    ({"text": TEXT, "spk_id": "alice", "prompt_audio": "UklGRg=="}, 400, "not both"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(served, body, status, words):
    r = post(served["url"], "/v1/tts", body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    ok = post(served["url"], "/v1/audio/speech", {"input": "Still here.", "voice": "alice", "response_format": "wav"})
    assert ok.status_code == 200


def test_openai_endpoint_errors_and_not_json(served):
    url = served["url"]
    r = post(url, "/v1/audio/speech", {"input": TEXT, "voice": "alloy"})
    assert r.status_code == 400 and "alloy" in r.json()["error"]["message"]
    r = post(url, "/v1/audio/speech", {"voice": "alice"})
    assert r.status_code == 400 and "input" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/tts", content=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert httpx.get(url + "/lab/static/..%2F..%2Fapp.py", timeout=10).status_code == 404
    pre = httpx.options(url + "/v1/tts", headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers  # CORS is off unless --cors_origin is given
    assert httpx.get(url + "/lab/api/dataset/audio/..%2F..%2Fetc%2Fpasswd", timeout=10).status_code in (400, 404)


def test_zero_shot_with_a_prompt_clip_in_the_request(served, sample_speaker_dir):
    import base64

    clip = sample_speaker_dir / "audio" / "agent-user.mp3"
    body = {"text": TEXT, "prompt_audio": base64.b64encode(clip.read_bytes()).decode(), "seed": 8,
            "prompt_text": "You are a helpful assistant.<|endofprompt|>" + PROMPT_TRANSCRIPT}
    r = post(served["url"], "/v1/tts", body)
    assert r.status_code == 200, r.text
    facts = httpx.get(f"{served['url']}/v1/runs/{r.headers['X-Request-Id']}", timeout=10).json()
    assert facts["info"]["mode"] == "zero_shot" and facts["seed"] == 8
    with httpx.stream("POST", served["url"] + "/v1/tts", json={**body, "stream": True}, timeout=120) as s:
        assert s.status_code == 200 and len(s.read()) > 44


def test_variants_are_listed_by_name_and_loaded_lazily(served):
    url = served["url"]
    v = httpx.get(url + "/v1/variants", timeout=30).json()
    assert {x["name"] for x in v["llm"]} == {"model", "base", "epoch_1", "epoch_2", "llm_avg"}
    assert {x["name"] for x in v["flow"]} == {"model", "base"}
    assert "path" not in json.dumps(v) and str(served["run"]) not in json.dumps(v)
    body = {"text": TEXT, "spk_id": "alice", "seed": 4, "response_format": "pcm"}
    tuned = post(url, "/v1/tts", body)
    other = post(url, "/v1/tts", {**body, "llm_ckpt": "epoch_1", "flow_ckpt": "base"})
    assert other.status_code == 200, other.text
    assert other.headers["X-Cosytune-Llm"] == "epoch_1" and other.headers["X-Cosytune-Flow"] == "base"
    assert tuned.content != other.content  # another checkpoint really ran
    loaded = httpx.get(url + "/v1/variants", timeout=30).json()["loaded"]
    assert {"llm": "epoch_1", "flow": "base"} in loaded


def test_full_queue_gets_429_with_retry_after(served):
    url = served["url"]
    results: list[httpx.Response] = []
    barrier = threading.Barrier(6)

    def client() -> None:
        barrier.wait()
        results.append(post(url, "/v1/tts", {"text": LONG, "spk_id": "alice", "seed": 1}))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    codes = sorted(r.status_code for r in results)
    assert len(codes) == 6 and codes.count(200) >= 1 and codes.count(429) >= 1, codes
    assert set(codes) <= {200, 429}
    busy = next(r for r in results if r.status_code == 429)
    assert int(busy.headers["Retry-After"]) >= 1 and "busy" in busy.json()["error"]["message"]
    h = health(url)
    assert h["running"] == 0 and h["waiting"] == 0


def test_a_client_that_leaves_mid_stream_frees_its_decoder(served):
    url = served["url"]
    before = health(url)["cancelled"]
    with httpx.stream("POST", url + "/v1/tts", json={"text": LONG, "spk_id": "alice", "seed": 9, "stream": True,
                                                     "response_format": "pcm"}, timeout=120) as r:
        rid = r.headers["X-Request-Id"]
        next(r.iter_raw())  # the first chunk, then hang up
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        h = health(url)
        if h["cancelled"] > before and h["running"] == 0 and h["decoders_in_use"] == 0:
            break
        time.sleep(0.3)
    assert h["dtype"] == "float32"  # auto on a CPU
    assert h["cancelled"] > before and h["running"] == 0 and h["decoders_in_use"] == 0, h
    assert httpx.get(f"{url}/v1/runs/{rid}", timeout=10).status_code == 404  # it never ran to the end
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'outcome="disconnected"' in metrics and "cosytune_decoders_in_use 0" in metrics


def test_metrics_speak_prometheus(served):
    post(served["url"], "/v1/tts", {"text": TEXT, "spk_id": "alice", "stream": True, "response_format": "pcm"})
    text = httpx.get(served["url"] + "/metrics", timeout=10).text
    for name in ("cosytune_requests_total{", "cosytune_queue_depth ", "cosytune_first_chunk_seconds_bucket{",
                 "cosytune_first_chunk_seconds_count ", "cosytune_rtf_sum ", "cosytune_requests_running "):
        assert name in text, name
    count = next(line for line in text.splitlines() if line.startswith("cosytune_first_chunk_seconds_count"))
    assert int(count.split()[1]) >= 1


# ---------------------------------------------------------------------------------------------- browser
def _browser(tmp_path):
    if os.environ.get("COSYTUNE_SKIP_BROWSER") == "1":
        pytest.skip("COSYTUNE_SKIP_BROWSER=1")
    why = browser_missing()
    if why:
        pytest.fail(why)
    return start_browser(tmp_path / "chromium-profile")


def _wait(driver, js: str, timeout: float = 120.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(js)
        if value:
            return value
        time.sleep(0.25)
    status = driver.execute_script("return document.querySelector('#status').textContent")
    raise AssertionError(f"timed out waiting for {what or js} (page status: {status!r})")


def _shot(driver, name: str) -> None:
    folder = os.environ.get("COSYTUNE_LAB_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def test_listening_lab_in_a_real_browser(served, tmp_path):
    from cosytune.data.review import read_review
    from cosytune.fileio import read_jsonl

    url, data = served["url"], served["data"]
    driver = _browser(tmp_path)
    try:
        driver.get(url + "/lab")
        _wait(driver, "return document.body.dataset.ready === '1'", 60, "the page to load its settings")
        q = driver.find_element
        # Compare: two LLM variants of one text, streamed (playback starts before synthesis ends).
        driver.execute_script("document.querySelector('#text').value = arguments[0]", TEXT)
        q("css selector", "#llm-variants input[value='epoch_1']").click()
        q("css selector", "#seeds").clear()
        q("css selector", "#seeds").send_keys("3")
        q("css selector", "#synth").click()
        _wait(driver, "const r = [...document.querySelectorAll('#takes tbody tr')];"
                      "return r.length === 2 && r.every(x => x.dataset.state === 'done')", 180, "two takes")
        rows = driver.execute_script(
            "return [...document.querySelectorAll('#takes tbody tr')].map(r => [r.dataset.llm, "
            "Number(r.dataset.firstAudioMs), Number(r.dataset.doneMs)])")
        assert sorted(r[0] for r in rows) == ["epoch_1", "model"]
        for _, first, done in rows:
            assert 0 < first < done  # the first chunk played before the take was finished
        _shot(driver, "lab_compare.png")
        # Play both takes.
        for i in range(2):
            driver.execute_script(f"document.querySelectorAll('#takes audio')[{i}].play()")
        _wait(driver, "return [...document.querySelectorAll('#takes audio')].every(a => a.currentTime > 0.2 || a.ended)",
              30, "both takes to play")
        # Three blind A/B rounds.
        q("css selector", "#tab-ab").click()
        q("css selector", "#ab-start").click()
        for i, pick in enumerate(("#pick-a", "#pick-same", "#pick-b"), 1):
            _wait(driver, "return !document.querySelector('#pick-a').disabled", 10, "the next pair")
            if i == 1:
                _shot(driver, "lab_ab.png")
            q("css selector", pick).click()
            _wait(driver, f"return document.querySelector('#ab-pair').dataset.rated === '{i}'", 30, f"rating {i}")
        ratings = read_jsonl(served["run"] / "lab" / "ratings.jsonl")
        assert [r["choice"] for r in ratings] == ["a", "same", "b"]
        for r in ratings:
            assert {r["a"]["llm"], r["b"]["llm"]} == {"model", "epoch_1"} and r["a"]["seed"] == r["b"]["seed"] == 3
            assert r["a"]["preset"] == "default" and "sampling" in r["a"]["settings"]
            assert r["text_chars"] == len(TEXT) and TEXT not in json.dumps(r)
        q("css selector", "#tab-results").click()
        _wait(driver, "return document.querySelectorAll('#summary tbody tr').length === 2", 30, "the summary")
        _shot(driver, "lab_results.png")
        # Dataset page: edit one transcript, exclude another clip, save, apply-review.
        q("css selector", "#tab-dataset").click()
        _wait(driver, "return document.querySelectorAll('#dataset tbody tr').length === 4", 30, "the dataset rows")
        utts = driver.execute_script("return [...document.querySelectorAll('#dataset tbody tr')].map(r => r.dataset.utt)")
        edit, drop = utts[0], utts[1]
        row = q("css selector", f"#dataset tr[data-utt='{edit}']")
        box = row.find_element("css selector", "input.transcript")
        box.clear()
        box.send_keys("An edited transcript, typed in the lab.")
        row.find_element("css selector", "button.save").click()
        _wait(driver, f"return document.querySelector(\"#dataset tr[data-utt='{edit}']\").dataset.saved === '1'", 30)
        review = read_review(data / "review.tsv")
        assert review[edit].text == "An edited transcript, typed in the lab." and not review[edit].delete
        other = q("css selector", f"#dataset tr[data-utt='{drop}']")
        other.find_element("css selector", "input.exclude").click()
        other.find_element("css selector", "button.save").click()
        _wait(driver, f"return document.querySelector(\"#dataset tr[data-utt='{drop}']\").dataset.saved === '1'", 30)
        assert read_review(data / "review.tsv")[drop].delete
        driver.execute_script(f"document.querySelector(\"#dataset tr[data-utt='{edit}'] audio\").play()")
        _wait(driver, f"const a = document.querySelector(\"#dataset tr[data-utt='{edit}'] audio\");"
                      "return a.currentTime > 0.2 || a.ended", 30, "the clip to play")
        _shot(driver, "lab_dataset.png")
        q("css selector", "#apply-review").click()
        _wait(driver, "return document.querySelector('#apply-result').dataset.done === '1'", 60, "apply-review")
        meta = {r["utt"]: r for r in read_jsonl(data / "metadata.jsonl")}
        assert meta[edit]["text"].endswith("An edited transcript, typed in the lab.") and drop not in meta
        assert read_review(data / "review.tsv")[edit].text == "An edited transcript, typed in the lab."
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()

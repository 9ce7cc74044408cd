"""The serve load test runs end to end on the tiny model (CPU): a real server subprocess, concurrent streams."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_serve_streams_concurrently_without_drops(tmp_path, tiny_model_dir):
    from speaker_models import speaker_model_dir

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = speaker_model_dir(tmp_path / "m", tokenizer_from=tiny_model_dir / "CosyVoice-BlankEN")
    out = bench.main(["--model_dir", str(model), "--device", "cpu", "--concurrency", "1,3", "--requests", "3",
                      "--request_timeout", "240", "--out", str(tmp_path / "b.json")])
    assert (tmp_path / "b.json").is_file() and "error" not in out["warmup"]
    for lv, clients in zip(out["levels"], (1, 3)):
        assert lv["clients"] == clients and lv["ok"] == 3 and not lv["errors"], lv
        assert 0 < lv["first_chunk_s"]["p50"] <= lv["first_chunk_s"]["p95"] <= lv["total_s"]["p95"]
        assert lv["x_real_time"] > 0
    assert 'cosytune_requests_total{endpoint="tts",outcome="ok"}' in out["metrics"]
    assert bench.pct([3.0, 1.0, 2.0], 50) == 2.0 and bench.pct([], 95) is None

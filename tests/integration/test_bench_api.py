"""The public-API benchmark runs end to end on the tiny model (CPU) and reports every figure it promises."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_api_reports_cold_warm_stream_and_concurrent(tmp_path, tiny_model_dir):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_api.py"
    spec = importlib.util.spec_from_file_location("bench_api", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # The session's tiny dir: what --preset tiny would build (into a temporary dir left behind), built once.
    out = bench.main(["--model_dir", str(tiny_model_dir), "--device", "cpu", "--requests", "1", "--concurrency", "2",
                      "--out", str(tmp_path / "b.json")])
    assert (tmp_path / "b.json").is_file() and out["load_s"] > 0
    assert out["first_request"]["rtf"] > 0 and out["first_stream"]["first_chunk_s"] > 0
    assert out["warm"]["llm_ms_per_token"]["p50"] > 0 and out["warm_stream"]["first_chunk_s"]["n"] == 1
    c = out["concurrent"][0]
    assert c["clients"] == 2 and c["requests"] == 2 and not c["errors"] and c["x_real_time"] > 0
    assert bench.pct([3.0, 1.0, 2.0], 50) == 2.0 and bench.pct([], 95) is None

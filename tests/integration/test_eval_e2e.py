"""`cosytune eval` end to end on a demo-style work dir with the tiny random model (it scores badly: these
tests check the machinery and the files, not the quality), `cosytune run --select scorecard` and
`cosytune average --select scorecard`. ASR: a tiny random Whisper built offline (its transcripts are
random words, so CER is high but computed); without an ASR model the scorecard says intelligibility was
skipped."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from cosytune.cli.main import main
from cosytune.fileio import sha256_file

pytestmark = pytest.mark.slow

CLIPS = ["agent-alreadyon", "agent-incorrect", "auth-incorrect", "conf-getchannel", "conf-getconfno",
         "conf-invalid", "invalid", "vm-passchanged"]


@pytest.fixture(scope="module")
def work(sample_speaker_dir, tmp_path_factory, tiny_model_dir) -> tuple[Path, str]:
    """A work dir made by `cosytune run --select scorecard` (8 clips, 2 epochs, tiny model); its output."""
    root = tmp_path_factory.mktemp("evalrun")
    audio = root / "audio"
    audio.mkdir()
    for c in CLIPS:
        shutil.copy(sample_speaker_dir / "audio" / f"{c}.mp3", audio)
    base = tiny_model_dir
    w = root / "work"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["run", "--audio", str(audio), "--speaker", "allison", "--base_model", str(base), "--work", str(w),
                     "--transcripts", str(sample_speaker_dir / "transcripts.txt"), "--llm_epochs", "2",
                     "--num_average", "2", "--device", "cpu", "--select", "scorecard", "--select_sentences", "1",
                     "--no_progress"]) == 0
    return w, buf.getvalue()


def test_run_select_scorecard_picks_and_records_why(work):
    w, out = work
    rec = json.loads((w / "exp" / "llm" / "llm_avg.selection.json").read_text())
    candidates = {"average of 2", "epoch_0_whole", "epoch_1_whole"}
    assert rec["winner"] in candidates and rec["kind"] == "llm"
    assert any("CER rule was skipped" in r for r in rec["why"]) and "ASR unavailable" in rec["asr_status"]
    # The averaged file now holds the winner's weights, and the assembled model is built from it.
    assert sha256_file(w / "exp" / "llm" / "llm_avg.pt") == sha256_file(rec["weights"])
    card = json.loads((w / "eval" / "select_llm" / "scorecard.json").read_text())
    assert set(card["summaries"]) == candidates and card["selection"]["winner"] == rec["winner"]
    assert "scorecard picked" in out and rec["winner"] in out


def test_eval_end_to_end_with_asr(work, tmp_path_factory, capsys):
    from test_transcribe_whisper import build_tiny_whisper

    w, _ = work
    asr = build_tiny_whisper(tmp_path_factory.mktemp("whisper"))
    assert main(["eval", "--run", str(w), "--languages", "en", "--max_sentences", "1", "--takes", "2",
                 "--no_checkpoints", "--asr_model", str(asr), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "verdict: " in out and "per minute" in out
    ev = w / "eval"
    card = json.loads((ev / "scorecard.json").read_text())
    assert list(card["summaries"]) == ["base zero-shot", "tuned"]
    assert card["asr"]["model"] == str(asr) and card["asr"]["same_as_labeller"] is False
    assert card["asr_status"].startswith("ASR: faster-whisper")
    assert card["selection"]["winner"] == "tuned" and "best by the rule" in out  # the baseline is not a candidate
    takes = card["takes"]
    assert len(takes) == 4
    # Same draws for every variant.
    seeds = {v: sorted(t["seed"] for t in takes if t["variant"] == v) for v in card["summaries"]}
    assert seeds["tuned"] == seeds["base zero-shot"] and len(set(seeds["tuned"])) == 2
    for t in takes:
        if t["wav"]:
            assert (ev / t["wav"]).is_file()
            assert -1 <= t["sim_ref"] <= 1 and 1 <= t["ovrl"] <= 5 and t["error_rate"] >= 0
            assert t["asr_text"] is not None and t["rtf"] > 0
        else:
            assert t["failures"]
    for s in card["summaries"].values():
        assert s["takes"] == 2 and 0 <= s["failure_rate"] <= 1 and "error_rate" in s["seed_spread"]
    rows = list(csv.DictReader((ev / "scorecard.csv").open()))
    assert [r["variant"] for r in rows] == ["base zero-shot", "tuned"] and "sim_centroid_ci95" in rows[0]
    assert len(list(csv.DictReader((ev / "takes.csv").open()))) == 4
    html = (ev / "index.html").read_text()
    assert "Did the fine-tune help?" in html and card["verdict"].split(".")[0][:30] in html.replace("&#x27;", "'")
    for ref in re.findall(r"(?:src)='([^']+)'", html):
        assert (ev / ref).is_file(), ref
    assert "<audio" in html and (ev / "plots" / "sim_ref.png").read_bytes()[:4] == b"\x89PNG"


def test_average_select_scorecard_without_asr(work, tmp_path, capsys):
    w, _ = work
    dst = tmp_path / "best.pt"
    assert main(["average", "--dst_model", str(dst), "--src_path", str(w / "exp" / "llm"), "--num", "2",
                 "--select", "scorecard", "--model_dir", str(w / "models" / "allison"), "--spk_id", "allison",
                 "--data", str(w / "data"), "--max_sentences", "1", "--takes", "1", "--no_progress"]) == 0
    out = capsys.readouterr().out
    rec = json.loads(dst.with_suffix(".selection.json").read_text())
    assert sha256_file(dst) == sha256_file(rec["weights"]) and rec["winner"] in out
    assert "ASR unavailable" in rec["asr_status"] and "intelligibility skipped" in out
    with pytest.raises(SystemExit):
        main(["average", "--dst_model", str(dst), "--src_path", str(w / "exp" / "llm"), "--select", "nope"])
    assert main(["average", "--dst_model", str(dst), "--src_path", str(w / "exp" / "llm"),
                 "--select", "scorecard"]) == 2
    assert "needs --model_dir, --spk_id, --data" in capsys.readouterr().err


def test_bench_eval_reports_takes_per_minute(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_eval.py"
    spec = importlib.util.spec_from_file_location("bench_eval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--device", "cpu", "--clips", "2", "--sentences", "0", "--out", str(tmp_path / "b.json")])
    assert (tmp_path / "b.json").is_file() and out["scoring"]["clips"] == 2
    assert out["scoring"]["takes_per_minute"] > 0 and out["scoring"]["ms_per_clip"]["dnsmos"] > 0
    assert "intelligibility skipped" in out["asr_status"]

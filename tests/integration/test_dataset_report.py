"""cosytune dataset-report: figures, text, JSON and a PNG, on a transcribe out_dir and a Kaldi dir."""

from __future__ import annotations

import json

import pytest

from cosytune.cli.main import main
from cosytune.data.report import build_report, duration_histogram
from cosytune.data.transcribe import TranscribeConfig, transcribe_dataset
from cosytune.errors import DataError
from cosytune.fileio import read_jsonl


@pytest.fixture(scope="module")
def dataset(sample_speaker_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "ds"
    tf = out.parent / "t.txt"
    lines = (sample_speaker_dir / "transcripts.txt").read_text().splitlines()
    lines[0] = lines[0].split("|")[0] + "|"  # one empty transcript -> a reject
    tf.write_text("\n".join(lines[:-1]) + "\n")  # and one clip without text
    transcribe_dataset(
        sample_speaker_dir / "audio", out, TranscribeConfig(backend="transcripts", transcripts=tf)
    )
    return out


def test_report_on_transcribe_dir(dataset, capsys):
    # Without the QA (DNSMOS and speaker distance of all 26 clips: ~30 s), which this test does not check:
    # test_eval_models.py's planted-speaker test runs it on a transcribe dir and checks what it adds.
    assert main(["dataset-report", str(dataset), "--qa", "off"]) == 0
    text = capsys.readouterr().out
    meta = read_jsonl(dataset / "metadata.jsonl")
    usable = sum(m["duration_s"] for m in meta) / 60
    assert f"{usable:.2f} usable of" in text
    assert f"{len(meta)} kept of 28 candidates" in text
    assert "transcribe/empty_transcript: 1" in text and "transcribe/no_transcript: 1" in text
    png = dataset / "dataset_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rep = json.loads((dataset / "dataset_report.json").read_text())
    assert rep["kept"] == 26 and sum(rep["duration_histogram"].values()) == 26
    assert rep["splits"]["train"] + rep["splits"]["dev"] == 26
    assert rep["rejects"] == {"transcribe/empty_transcript": 1, "transcribe/no_transcript": 1}
    assert rep["minutes_total"] > rep["minutes_usable"] > 0
    assert 5 < rep["chars_per_s"]["median"] < 20


def test_report_on_a_kaldi_dir(dataset, tmp_path):
    assert main(["dataset-report", str(dataset / "dev"), "--out_dir", str(tmp_path), "--qa", "off"]) == 0
    rep = build_report(dataset / "dev")
    assert rep.kept == len((dataset / "dev" / "wav.scp").read_text().splitlines()) and rep.durations_s
    assert (tmp_path / "dataset_report.png").is_file() and (tmp_path / "dataset_report.txt").is_file()


def test_histogram_bins_and_bad_dir(tmp_path, capsys):
    h = duration_histogram([0.5, 1.0, 4.9, 5.0, 29.99, 31.0])
    assert h["0-1 s"] == 1 and h["1-2 s"] == 1 and h["2-5 s"] == 1 and h["5-10 s"] == 1
    assert h["20-30 s"] == 1 and h[">=30 s"] == 1
    with pytest.raises(DataError, match="none of metadata.jsonl"):
        build_report(tmp_path)
    assert main(["dataset-report"]) == 2


def test_report_on_a_prepare_audio_dir_and_readable_plots(sample_speaker_dir, tmp_path):
    """Where a user first looks: the prepare-audio folder, before any transcript. Counts have whole-number
    ticks and the histograms equal-width bins."""
    from cosytune.data.prepare_audio import PrepareAudioConfig, prepare_audio
    from cosytune.data.report import report_figure

    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((sample_speaker_dir / "audio").glob("*.mp3"))[:5]:
        (src / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "wavs"
    prepare_audio(src, out, PrepareAudioConfig(num_workers=1))
    assert main(["dataset-report", str(out)]) == 0
    rep = build_report(out)
    assert rep.kept == 5 and rep.splits == {"prepared": 5} and rep.minutes_usable > 0
    fig = report_figure(rep)
    fig.canvas.draw()
    for ax in fig.axes[:2]:
        ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
        assert all(float(t).is_integer() for t in ticks), ticks
    widths = {round(p.get_width(), 6) for p in fig.axes[0].patches}
    assert widths == {1.0}, widths

"""The prepare-audio stage end to end: shipped sample, generated edge cases, resume, CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from audio_media import sample_speech, tone, write_av, write_sf

from cosytune.cli.main import main
from cosytune.config.loading import load_config
from cosytune.data.prepare_audio import (
    MANIFEST_NAME,
    REJECTS_NAME,
    STATE_NAME,
    PrepareAudioConfig,
    assign_names,
    prepare_audio,
    safe_stem,
)
from cosytune.errors import ConfigError, DataError
from cosytune.fileio import read_jsonl

# About 45 s of real speech with 0.6 s pauses between the clips.
LONG_CLIPS = (
    "demo-thanks.mp3",
    "agent-alreadyon.mp3",
    "conf-getchannel.mp3",
    "vm-intro.mp3",
    "privacy-prompt.mp3",
    "queue-periodic-announce.mp3",
    "dir-instr.mp3",
    "tt-allbusy.mp3",
)

# name -> expected fate: "ok", "ok-untrimmed", "sliced" or a reject reason
EXPECTED = {
    "silence.wav": "all_silence",
    "tone.wav": "ok",
    "clipped.wav": "heavy_clipping",
    "clipped speech.m4a": "heavy_clipping",
    "corrupt.mp3": "unreadable",
    "long 45 s.flac": "sliced",
    "speech_8k.wav": "ok",
    "speech_stereo_44k.wav": "ok",
    "数据 集/my clip 1.mp3": "ok",
    "nested/deeper/clip.m4a": "ok",
    "video.mp4": "ok",
    "voice.opus": "ok",
    "notes.bin": "not_audio",
    "empty.mp3": "zero_length",
    "blip.wav": "too_short",
    "loud click.wav": "too_short",  # 0.1 s at -6 dBFS: short, not "very quiet"
    "quiet_end.wav": "ok-untrimmed",
}


def _build_edge_cases(root: Path, sample_dir: Path) -> None:
    import soxr

    speech, sr = sample_speech(sample_dir, ("demo-thanks.mp3",))
    rng = np.random.default_rng(0)
    write_sf(root / "silence.wav", (rng.standard_normal(3 * sr) * 10 ** (-70 / 20)).astype(np.float32), sr)
    write_sf(root / "tone.wav", tone(2.0, sr, 440.0, 0.3), sr)
    write_sf(root / "loud click.wav", tone(0.1, sr, 440.0, 0.5), sr)
    write_sf(root / "clipped.wav", np.clip(tone(2.0, sr, 200.0, 4.0), -1, 1), sr)
    # Speech driven 5x into the rails, then AAC-encoded (lossy smears the flat tops).
    write_av(root / "clipped speech.m4a", np.clip(5 * speech / np.abs(speech).max(), -1, 1), sr, "aac")
    (root / "corrupt.mp3").write_bytes(rng.integers(0, 256, 40000, np.uint8).tobytes())
    long_speech, _ = sample_speech(sample_dir, LONG_CLIPS)
    write_sf(root / "long 45 s.flac", long_speech, sr)
    write_sf(root / "speech_8k.wav", soxr.resample(speech, sr, 8000).astype(np.float32), 8000)
    s44 = soxr.resample(speech, sr, 44100).astype(np.float32)
    write_sf(root / "speech_stereo_44k.wav", np.stack([s44, 0.7 * s44], axis=1), 44100)
    write_sf(root / "数据 集" / "my clip 1.mp3", speech, sr)
    write_av(root / "nested" / "deeper" / "clip.m4a", speech, sr, "aac")
    write_av(root / "video.mp4", np.stack([s44, s44], axis=1), 44100, "aac", video=True)
    write_av(root / "voice.opus", soxr.resample(speech, sr, 48000).astype(np.float32), 48000, "libopus")
    (root / "notes.bin").write_bytes(b"not audio at all\n" * 100)
    (root / "empty.mp3").write_bytes(b"")
    write_sf(
        root / "blip.wav", np.concatenate([np.zeros(sr // 2), tone(0.3, sr, 500, 0.5), np.zeros(sr // 2)]), sr
    )
    # 2.5 s with 1.2 s of sound: trimming would leave < 1.5 s, so the seed rule keeps it whole.
    write_sf(
        root / "quiet_end.wav",
        np.concatenate([np.zeros(sr // 2), tone(1.2, sr, 300, 0.3), np.zeros(int(0.8 * sr))]),
        sr,
    )
    (root / "transcripts.txt").write_text("tone.wav|a tone\n", encoding="utf-8")  # side file: ignored
    (root / ".hidden.wav").write_bytes(b"")  # hidden: ignored


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory, sample_speaker_dir):
    root = tmp_path_factory.mktemp("edge") / "in put ü"
    root.mkdir()
    _build_edge_cases(root, sample_speaker_dir)
    out = root.parent / "out wavs"
    summary = prepare_audio(root, out, PrepareAudioConfig(num_workers=2))
    return root, out, summary


def _by_source(rows: list[dict], key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def test_edge_cases_every_input_accounted_for(edge_run):
    root, out, summary = edge_run
    rows = read_jsonl(out / MANIFEST_NAME)
    rejects = read_jsonl(out / REJECTS_NAME)
    kept = _by_source(rows, "source_rel")
    rejected = _by_source(rejects, "input")
    assert summary.num_inputs == len(EXPECTED) and summary.num_sidecars_skipped == 1
    for rel, fate in EXPECTED.items():
        src = str(root / rel)
        if fate.startswith("ok") or fate == "sliced":
            assert rel in kept, (rel, rejected.get(src))
            assert src not in rejected, rejected[src]
        else:
            assert rel not in kept
            assert [r["reason"] for r in rejected[src]] == [fate], rejected[src]
            assert all(r["stage"] == "prepare-audio" and r["detail"] for r in rejected[src])
    assert set(kept) | {Path(i).relative_to(root).as_posix() for i in rejected} == set(EXPECTED)
    assert summary.reject_counts == {
        "heavy_clipping": 2, "too_short": 2,
        **{k: 1 for k in ("all_silence", "unreadable", "not_audio", "zero_length")},
    }
    assert summary.num_outputs == len(rows)


def test_edge_cases_outputs_are_24k_mono_pcm16(edge_run):
    root, out, _ = edge_run
    rows = read_jsonl(out / MANIFEST_NAME)
    utts = [r["utt"] for r in rows]
    assert len(set(utts)) == len(utts)
    for r in rows:
        info = sf.info(str(out / r["wav"]))
        assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
        assert info.frames == r["num_samples"] and abs(info.frames / 24000 - r["duration_s"]) < 1e-3
        assert r["wav"] == f"{r['utt']}.wav" and Path(r["source"]).is_file()
        assert Path(r["source"]).relative_to(root).as_posix() == r["source_rel"]
        assert " " not in r["utt"] and "/" not in r["utt"]
        assert 0.5 <= r["duration_s"] <= 30.0
    wavs = sorted(p.name for p in out.glob("*.wav"))
    assert wavs == sorted(r["wav"] for r in rows)  # no stray or temporary files
    assert not list(out.glob(".*.tmp*"))


def test_edge_cases_slicing_trim_and_metadata(edge_run):
    _root, out, summary = edge_run
    kept = _by_source(read_jsonl(out / MANIFEST_NAME), "source_rel")
    sliced = kept["long 45 s.flac"]
    assert len(sliced) >= 2 and summary.num_sliced_sources == 1
    assert all(
        r["num_segments"] == len(sliced) and r["utt"].endswith(f"__{r['segment_index']:03d}") for r in sliced
    )
    assert [r["segment_index"] for r in sliced] == list(range(len(sliced)))
    assert 40 < sliced[0]["source_duration_s"] < 55
    total = sum(r["duration_s"] for r in sliced)
    assert total > 0.8 * sliced[0]["source_duration_s"]
    starts = [r["source_start_s"] for r in sliced]
    assert starts == sorted(starts)
    (untrimmed,) = kept["quiet_end.wav"]
    assert untrimmed["untrimmed_overtrim"] and not untrimmed["trim"]["applied"]
    assert abs(untrimmed["duration_s"] - 2.5) < 1e-3 and summary.num_untrimmed_overtrim == 1
    (tone_row,) = kept["tone.wav"]
    assert abs(tone_row["duration_s"] - 2.0) < 0.01 and tone_row["num_segments"] == 1
    (stereo,) = kept["speech_stereo_44k.wav"]
    assert stereo["source_channels"] == 2 and stereo["source_sample_rate"] == 44100
    (low,) = kept["speech_8k.wav"]
    assert low["source_sample_rate"] == 8000
    # The same speech arrives through five decoders/rates; trimmed lengths agree closely.
    same = [
        kept[k][0]["duration_s"]
        for k in (
            "speech_8k.wav",
            "speech_stereo_44k.wav",
            "数据 集/my clip 1.mp3",
            "nested/deeper/clip.m4a",
            "voice.opus",
        )
    ]
    assert max(same) - min(same) < 0.1
    assert kept["数据 集/my clip 1.mp3"][0]["utt"] == "数据_集-my_clip_1"
    assert kept["nested/deeper/clip.m4a"][0]["utt"] == "nested-deeper-clip"


def _small_input(tmp_path: Path, sample_dir: Path, n: int = 4) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted((sample_dir / "audio").glob("*.mp3"))[:n]:
        shutil.copy2(p, src / p.name)
    return src


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.wav")}


def test_resume_skips_unchanged_and_redoes_changed(tmp_path, sample_speaker_dir):
    src = _small_input(tmp_path, sample_speaker_dir)
    out = tmp_path / "out"
    cfg = PrepareAudioConfig(num_workers=1)
    first = prepare_audio(src, out, cfg)
    assert first.num_processed == 4 and first.num_outputs == 4
    before = _mtimes(out)
    manifest = (out / MANIFEST_NAME).read_text(encoding="utf-8")

    second = prepare_audio(src, out, cfg)
    assert second.num_processed == 0 and second.num_reused == 4
    assert _mtimes(out) == before and (out / MANIFEST_NAME).read_text(encoding="utf-8") == manifest

    # num_workers does not change outputs; other settings do.
    assert prepare_audio(src, out, PrepareAudioConfig(num_workers=2)).num_processed == 0
    third = prepare_audio(src, out, PrepareAudioConfig(num_workers=1, trim_threshold_db=-45.0))
    assert third.num_processed == 4

    # A changed input is redone; a removed input's wav disappears.
    victim = min(src.glob("*.mp3"))
    x, sr = sf.read(str(victim))
    write_sf(victim, x[: len(x) // 2], sr)
    removed = sorted(src.glob("*.mp3"))[1]
    removed.unlink()
    fourth = prepare_audio(src, out, PrepareAudioConfig(num_workers=1, trim_threshold_db=-45.0))
    assert fourth.num_processed == 1 and fourth.num_reused == 2 and fourth.num_outputs == 3
    rows = read_jsonl(out / MANIFEST_NAME)
    assert removed.name not in {Path(r["source"]).name for r in rows}
    assert sorted(p.name for p in out.glob("*.wav")) == sorted(r["wav"] for r in rows)


def test_a_damaged_output_is_made_again(tmp_path, sample_speaker_dir):
    """A truncated prepared wav is not trusted as "unchanged": its source is processed again."""
    src = _small_input(tmp_path, sample_speaker_dir)
    out = tmp_path / "out"
    prepare_audio(src, out, PrepareAudioConfig(num_workers=1))
    victim = min(out.glob("*.wav"))
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 3])
    again = prepare_audio(src, out, PrepareAudioConfig(num_workers=1))
    assert again.num_processed == 1 and again.num_reused == 3
    assert victim.read_bytes() == whole


def test_interrupted_run_continues(tmp_path, sample_speaker_dir):
    src = _small_input(tmp_path, sample_speaker_dir)
    out = tmp_path / "out"
    prepare_audio(src, out, PrepareAudioConfig(num_workers=1))
    state = (out / STATE_NAME).read_text(encoding="utf-8").splitlines()
    # Simulate a kill: two files finished, the third's journal line torn, a temporary wav left over.
    (out / STATE_NAME).write_text("\n".join(state[:2]) + "\n" + state[2][:40], encoding="utf-8")
    (out / MANIFEST_NAME).unlink()
    (out / ".agent-user.abc123.tmp.wav").write_bytes(b"RIFF")
    again = prepare_audio(src, out, PrepareAudioConfig(num_workers=1))
    assert again.num_reused == 2 and again.num_processed == 2 and again.num_outputs == 4
    assert not list(out.glob(".*.tmp*"))
    assert len(read_jsonl(out / STATE_NAME)) == 4


def test_names_are_safe_and_unique():
    assert safe_stem("a b/c  d.mp3") == "a_b-c_d"
    assert safe_stem("数据集/Dream 01.wav") == "数据集-Dream_01"
    assert safe_stem("x__y.wav") == "x_y"  # "__" stays reserved for slice suffixes
    assert safe_stem("!!!.mp3") == "audio"
    names = assign_names(["a b.mp3", "a_b.wav", "A_B.flac", "c.mp3"])
    assert len(set(names.values())) == 4 and names["c.mp3"] == "c"
    assert all(names[k].startswith(("a_b-", "A_B-")) for k in ("a b.mp3", "a_b.wav", "A_B.flac"))
    assert assign_names(["a_b.wav", "a b.mp3"])["a b.mp3"] == names["a b.mp3"]  # order does not matter


def test_config_is_strict():
    cfg = load_config(PrepareAudioConfig, None, ["trim_threshold_db=-40", "loudness_target_lufs=-20"])
    assert cfg.trim_threshold_db == -40.0 and cfg.loudness_target_lufs == -20.0
    with pytest.raises(ConfigError) as info:
        load_config(PrepareAudioConfig, None, ["trim_treshold_db=-40", "max_duration_s=abc"])
    assert "trim_treshold_db" in str(info.value) and "max_duration_s" in str(info.value)
    with pytest.raises(ConfigError, match="slice_min_s"):
        load_config(PrepareAudioConfig, None, ["slice_min_s=40"])
    assert PrepareAudioConfig().settings_hash() == PrepareAudioConfig(num_workers=7).settings_hash()
    assert PrepareAudioConfig().settings_hash() != PrepareAudioConfig(trim=False).settings_hash()


def test_bad_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_audio(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no input files"):
        prepare_audio(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="must differ"):
        prepare_audio(tmp_path / "empty", tmp_path / "empty")


def test_cli_shipped_sample_with_aliases(tmp_path, sample_speaker_dir, capsys):
    out = tmp_path / "wavs"
    rc = main(
        [
            "prepare-audio",
            "--input",
            str(sample_speaker_dir / "audio"),
            "--wav_dir",
            str(out),
            "--num_workers",
            "2",
            "--no_progress",
            "peak_ceiling_db=-3",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "prepare-audio" in text and "28" in text
    rows = read_jsonl(out / MANIFEST_NAME)
    assert len(rows) == 28 and read_jsonl(out / REJECTS_NAME) == []
    assert all(r["loudness"]["peak_db_out"] <= -3.0 + 1e-6 for r in rows)
    assert 150 < sum(r["duration_s"] for r in rows) < 166
    cfg_text = (out / "prepare_audio.yaml").read_text(encoding="utf-8")
    assert "peak_ceiling_db: -3.0" in cfg_text and "num_workers: 2" in cfg_text


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.mp3").write_bytes(b"")
    (bad / "b.txt.bin").write_bytes(b"hello")
    assert (
        main(["prepare-audio", "--src_dir", str(bad), "--out_dir", str(tmp_path / "o"), "--no_progress"]) == 1
    )
    err = capsys.readouterr().err
    assert "no usable audio" in err and "zero_length 1" in err and "not_audio 1" in err
    assert read_jsonl(tmp_path / "o" / REJECTS_NAME)
    assert main(["prepare-audio", "--in_dir", str(bad), "--out_dir", str(tmp_path / "o"), "bogus_key=1"]) == 2
    assert "bogus_key" in capsys.readouterr().err


def test_cli_help_lists_flags(capsys):
    with pytest.raises(SystemExit):
        main(["prepare-audio", "--help"])
    text = capsys.readouterr().out
    for opt in (
        "--in_dir",
        "--src_dir",
        "--input",
        "--out_dir",
        "--wav_dir",
        "--config",
        "--num_workers",
        "--trim_threshold_db",
        "--loudness_target_lufs",
        "--no_slice",
        "key=value",
        "examples:",
    ):
        assert opt in text, opt


def test_loudness_normalisation_option(tmp_path, sample_speaker_dir):
    src = _small_input(tmp_path, sample_speaker_dir, n=3)
    out = tmp_path / "out"
    prepare_audio(src, out, PrepareAudioConfig(num_workers=2, loudness_target_lufs=-20.0))
    from cosytune.audio.loudness import measure_lufs

    for r in read_jsonl(out / MANIFEST_NAME):
        x, sr = sf.read(str(out / r["wav"]), dtype="float32")
        if not r["loudness"]["ceiling_applied"]:
            assert measure_lufs(x, sr) == pytest.approx(-20.0, abs=0.1)
        assert r["loudness"]["lufs_in"] is not None


def test_unexpected_failure_is_a_reject_without_orphans(tmp_path, sample_speaker_dir, monkeypatch):
    from cosytune.audio import loudness

    src = tmp_path / "src"
    speech, sr = sample_speech(sample_speaker_dir, LONG_CLIPS)
    write_sf(src / "long.flac", speech, sr)
    shutil.copy2(sample_speaker_dir / "audio" / "demo-thanks.mp3", src / "ok.mp3")
    real = loudness.apply_gain_and_ceiling
    calls = []

    def flaky(y, *args, **kw):
        calls.append(len(y))
        if len(calls) == 2:  # the second slice of the long file
            raise RuntimeError("injected failure")
        return real(y, *args, **kw)

    monkeypatch.setattr(loudness, "apply_gain_and_ceiling", flaky)
    out = tmp_path / "out"
    summary = prepare_audio(src, out, PrepareAudioConfig(num_workers=1))
    assert summary.reject_counts == {"processing_error": 1}
    (rej,) = read_jsonl(out / REJECTS_NAME)
    assert rej["input"].endswith("long.flac") and "injected failure" in rej["detail"]
    assert [p.name for p in out.glob("*.wav")] == ["ok.wav"]  # the slice written first is gone too


def test_crashing_worker_becomes_a_reject(tmp_path, sample_speaker_dir, monkeypatch):
    import cosytune.audio.io as audio_io

    src = _small_input(tmp_path, sample_speaker_dir, n=4)
    victim = sorted(src.glob("*.mp3"))[2]
    real = audio_io.load_mono

    def crashing(path, *args):
        if Path(path).name == victim.name:
            os._exit(3)  # a decoder segfault, as far as the pool can tell
        return real(path, *args)

    # Forked workers inherit the patched decoder (pytest may run helper threads, which would
    # otherwise make prepare-audio choose forkserver).
    import multiprocessing

    import cosytune.data.prepare_audio as stage

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    monkeypatch.setattr(stage, "_mp_context", lambda: multiprocessing.get_context("fork"))
    monkeypatch.setattr(audio_io, "load_mono", crashing)
    out = tmp_path / "out"
    summary = prepare_audio(src, out, PrepareAudioConfig(num_workers=2))
    assert summary.num_outputs == 3 and summary.reject_counts == {"worker_crashed": 1}
    (rej,) = read_jsonl(out / REJECTS_NAME)
    assert rej["input"] == str(victim)


def test_cli_no_slice_and_no_trim(tmp_path, sample_speaker_dir):
    src = tmp_path / "src"
    speech, sr = sample_speech(sample_speaker_dir, LONG_CLIPS)
    write_sf(src / "long.flac", speech, sr)
    write_sf(src / "short.wav", np.concatenate([np.zeros(sr), speech[: 3 * sr], np.zeros(sr)]), sr)
    write_sf(src / "silence.wav", np.zeros(3 * sr), sr)  # no trimming, but still "all silence"
    out = tmp_path / "out"
    assert (
        main(
            [
                "prepare-audio",
                "--in_dir",
                str(src),
                "--out_dir",
                str(out),
                "--no_slice",
                "--no_trim",
                "--num_workers",
                "1",
                "--no_progress",
            ]
        )
        == 0
    )
    (row,) = read_jsonl(out / MANIFEST_NAME)
    assert row["source_rel"] == "short.wav" and row["duration_s"] == pytest.approx(5.0, abs=1e-3)
    assert not row["trim"]["applied"]
    rejects = {Path(r["input"]).name: r for r in read_jsonl(out / REJECTS_NAME)}
    assert rejects["long.flac"]["reason"] == "too_long" and "slice_long" in rejects["long.flac"]["detail"]
    assert rejects["silence.wav"]["reason"] == "all_silence" and len(rejects) == 2


def test_output_samples_are_the_resampled_source(tmp_path, sample_speaker_dir):
    import soxr

    from cosytune.audio.io import load_audio, to_mono

    src = _small_input(tmp_path, sample_speaker_dir, n=2)
    out = tmp_path / "out"
    prepare_audio(src, out, PrepareAudioConfig(num_workers=1))
    for row in read_jsonl(out / MANIFEST_NAME):
        audio, rate = load_audio(row["source"])
        ref = soxr.resample(to_mono(audio), rate, 24000, quality="HQ")
        start = round(row["source_start_s"] * 24000)
        ref = ref[start : start + row["num_samples"]]
        got, _ = sf.read(str(out / row["wav"]), dtype="float32")
        assert row["loudness"]["gain_db"] == 0.0
        np.testing.assert_allclose(got, ref, atol=1.0 / 32768)


def test_cli_config_file_and_precedence(tmp_path, sample_speaker_dir):
    src = _small_input(tmp_path, sample_speaker_dir, n=1)
    cfg = tmp_path / "prep.yaml"
    cfg.write_text("trim_threshold_db: -40\nmin_duration_s: 0.7\npeak_ceiling_db: -2\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = [
        "prepare-audio",
        "--in_dir",
        str(src),
        "--out_dir",
        str(out),
        "--config",
        str(cfg),
        "--no_progress",
    ]
    # file < key=value < explicit flag
    assert main([*argv, "--peak_ceiling_db", "-6", "min_duration_s=0.6", "peak_ceiling_db=-4"]) == 0
    used = load_config(PrepareAudioConfig, out / "prepare_audio.yaml")
    assert (used.trim_threshold_db, used.min_duration_s, used.peak_ceiling_db) == (-40.0, 0.6, -6.0)
    cfg.write_text("trim_threshold: -40\n", encoding="utf-8")
    assert main(argv) == 2

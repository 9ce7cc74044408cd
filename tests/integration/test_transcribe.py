"""cosytune transcribe with the transcripts backend: inputs, transcripts formats, filters, split.

Real audio throughout: the shipped sample (28 mp3 clips of one speaker) and small wavs/mp3s
written with soundfile. ASR with a real (tiny) Whisper is in test_transcribe_whisper.py.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cosytune.cli.main import main
from cosytune.config import load_config
from cosytune.data.kaldi import read_kaldi_entries, read_kaldi_map, validate_kaldi_dir
from cosytune.data.transcribe import (
    DEFAULT_INSTRUCT,
    TranscribeConfig,
    Utterance,
    apply_review,
    char_error_rate,
    guess_language,
    review_flags,
    speakable_units,
    split_train_dev,
    transcribe_dataset,
)
from cosytune.errors import ConfigError, DataError, MissingDependencyError
from cosytune.fileio import read_jsonl, write_jsonl

SR = 24000


def write_wav(path: Path, seconds: float, sr: int = SR, fmt: str | None = None) -> Path:
    """A quiet noise clip of ``seconds`` (content does not matter to these stages)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    sf.write(str(path), (0.05 * rng.standard_normal(int(seconds * sr))).astype(np.float32), sr, format=fmt)
    return path


def make_prepared(root: Path, sources: dict[str, list[float]]) -> Path:
    """A prepare-audio style out_dir: wavs + prepared.jsonl; ``sources`` maps source name -> slice lengths."""
    out = root / "wavs"
    rows = []
    for name, lengths in sources.items():
        stem = Path(name).stem
        for k, sec in enumerate(lengths):
            utt = stem if len(lengths) == 1 else f"{stem}__{k:03d}"
            write_wav(out / f"{utt}.wav", sec)
            rows.append(
                {
                    "utt": utt,
                    "wav": f"{utt}.wav",
                    "source": str(root / "raw" / name),
                    "source_rel": name,
                    "duration_s": sec,
                    "sample_rate": SR,
                    "segment_index": k,
                    "num_segments": len(lengths),
                }
            )
    write_jsonl(out / "prepared.jsonl", rows)
    return out


def check_dataset(out: Path, expected_inputs: set[str] | None = None) -> dict:
    """The issue's consistency checks: ids agree across files, spk2utt inverse, wavs exist, rejects complete."""
    for split in ("train", "dev"):
        assert validate_kaldi_dir(out / split) == [], split
        ids = set(read_kaldi_map(out / split / "wav.scp"))
        for name in ("text", "utt2spk", "instruct"):
            assert set(read_kaldi_map(out / split / name)) == ids
        for e in read_kaldi_entries(out / split):
            assert Path(e.wav).is_file() and e.utt.startswith(e.speaker + "_")
    meta = read_jsonl(out / "metadata.jsonl")
    train = set(read_kaldi_map(out / "train" / "wav.scp"))
    dev = set(read_kaldi_map(out / "dev" / "wav.scp"))
    assert not train & dev and {m["utt"] for m in meta} == train | dev
    # slices of one source never straddle train and dev
    split_of = {}
    for m in meta:
        assert split_of.setdefault(m["source"], m["split"]) == m["split"]
        assert m["split"] == ("train" if m["utt"] in train else "dev")
    rejects = read_jsonl(out / "rejects.jsonl") if (out / "rejects.jsonl").exists() else []
    if expected_inputs is not None:
        kept_wavs = {m["wav"] for m in meta}
        rejected = {r["input"] for r in rejects}
        assert expected_inputs <= kept_wavs | rejected, expected_inputs - kept_wavs - rejected
        assert kept_wavs.isdisjoint({r["input"] for r in rejects if r["stage"] == "transcribe"})
    return {"meta": meta, "train": train, "dev": dev, "rejects": rejects}


def test_shipped_sample_with_seed_flag_names(sample_speaker_dir, tmp_path, capsys):
    audio = sample_speaker_dir / "audio"
    out = tmp_path / "out"
    rc = main(
        [
            "transcribe",
            "--wav_dir",
            str(audio),
            "--out_root",
            str(out),
            "--spk_id",
            "allison",
            "--backend",
            "transcripts",
            "--transcripts",
            str(sample_speaker_dir / "transcripts.txt"),
            "--language",
            "en",
            "--max_sec",
            "30",
            "--whisper_model",
            "unused",
            "--device",
            "cpu",
            "--compute_type",
            "int8",
            "--vad_filter",
            "false",
            "--no_progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    inputs = {str(p.resolve()) for p in audio.glob("*.mp3")}
    ds = check_dataset(out, inputs)
    assert len(ds["meta"]) == 28 and len(ds["dev"]) == 3  # default dev_size 0.1 of 28
    texts = dict(
        line.split("|", 1) for line in (sample_speaker_dir / "transcripts.txt").read_text().splitlines()
    )
    for m in ds["meta"]:
        assert m["text"] == texts[Path(m["wav"]).name] and m["language"] == "en" and m["speaker"] == "allison"
        assert m["duration_s"] > 1 and 5 < m["chars_per_s"] < 20 and m["instruct"] == DEFAULT_INSTRUCT
    assert set(read_kaldi_map(out / "train" / "instruct").values()) == {DEFAULT_INSTRUCT}
    assert "kept        28 (train 25, dev 3)" in capsys.readouterr().out
    # deterministic: the same seed gives the same split, another seed (usually) another
    again = tmp_path / "again"
    cfg = TranscribeConfig(
        backend="transcripts", transcripts=sample_speaker_dir / "transcripts.txt", speaker="allison"
    )
    transcribe_dataset(audio, again, cfg)
    assert set(read_kaldi_map(again / "dev" / "wav.scp")) == ds["dev"]
    other = transcribe_dataset(
        audio,
        tmp_path / "other",
        TranscribeConfig(
            backend="transcripts",
            transcripts=sample_speaker_dir / "transcripts.txt",
            speaker="allison",
            seed=7,
        ),
    )
    assert other.dev == 3 and set(read_kaldi_map(tmp_path / "other" / "dev" / "wav.scp")) != ds["dev"]


def test_mp3_under_unicode_path_with_spaces_and_sidecars(tmp_path):
    src = tmp_path / "数据集 Dream" / "录音 一"
    texts = {
        "第一 句.mp3": "今天天气很好，我们去公园散步吧。",
        "second take.mp3": "Hello there, this is the second take.",
        "third.mp3": "And a third recording, for the dev set.",
    }
    for i, (name, text) in enumerate(texts.items()):
        write_wav(src / name, 3.0 + i, sr=16000, fmt="MP3")
        (src / name).with_suffix(".txt" if i != 1 else ".lab").write_text(text + "\n", encoding="utf-8")
    write_wav(src / "no text here.mp3", 2.0, sr=16000, fmt="MP3")
    (src / "phone memo.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A ")  # not readable here: a reject
    out = tmp_path / "数据 out"
    summary = transcribe_dataset(src.parent, out, TranscribeConfig(backend="transcripts", dev_size=1))
    ds = check_dataset(out, {str(p.resolve()) for p in src.glob("*.m*")})
    assert summary.kept == 3 and summary.rejects == Counter({"no_transcript": 1, "needs_prepare_audio": 1})
    by_src = {Path(m["source"]).name: m for m in ds["meta"]}
    assert by_src["第一 句.mp3"]["text"] == texts["第一 句.mp3"] and by_src["第一 句.mp3"]["language"] == "zh"
    assert by_src["second take.mp3"]["text"] == texts["second take.mp3"]
    assert all(" " not in m["utt"] for m in ds["meta"])
    assert "录音_一__第一_句" in by_src["第一 句.mp3"]["utt"]


def test_prepared_manifest_slices_and_transcripts_formats(tmp_path):
    wavs = make_prepared(
        tmp_path,
        {
            "a.mp3": [4.0],
            "b.wav": [3.0],
            "long.mp3": [10.0, 8.0, 9.0],
            "c.flac": [5.0],
            "d.mp3": [2.5],
        },
    )
    tsv = tmp_path / "t.tsv"
    tsv.write_text(
        f"{tmp_path / 'raw' / 'a.mp3'}\tAbsolute path as the key, that works fine.\n"  # by absolute source path
        "b\tThe stem works as a key as well.\n"  # by stem
        "long.mp3\tOne transcript for a recording that was sliced into three parts.\n"
        "c.flac\tThe file name works too.\n",
        encoding="utf-8",
    )
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(r, ensure_ascii=False)
            for r in [
                {
                    "file": f"{tmp_path / 'raw' / 'a.mp3'}",
                    "text": "Absolute path as the key, that works fine.",
                },
                {"name": "b", "text": "The stem works as a key as well."},
                {
                    "path": "long.mp3",
                    "text": "One transcript for a recording that was sliced into three parts.",
                },
                {"wav": "c.flac", "text": "The file name works too."},
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    for i, tf in enumerate((tsv, jsonl)):
        out = tmp_path / f"out{i}"
        s = transcribe_dataset(wavs, out, TranscribeConfig(backend="transcripts", transcripts=tf, dev_size=1))
        ds = check_dataset(
            out, {str((wavs / r["wav"]).resolve()) for r in read_jsonl(wavs / "prepared.jsonl")}
        )
        assert s.kept == 3 and s.rejects == Counter({"sliced_source_needs_asr": 3, "no_transcript": 1})
        assert {Path(m["source"]).name for m in ds["meta"]} == {"a.mp3", "b.wav", "c.flac"}
        utts = {r["utt"]: r for r in read_jsonl(out / "utterances.jsonl")}
        assert utts["spk_long__001"]["reject_reason"] == "sliced_source_needs_asr"


def test_transcript_lines_that_match_nothing_are_reported(tmp_path, caplog):
    wavs = make_prepared(tmp_path, {"a.mp3": [3.0], "b.mp3": [3.0]})
    tf = tmp_path / "t.txt"
    tf.write_text(
        "a.mp3|The first one is right.\nb.mp3|So is the second.\nc_typo.mp3|But this name is wrong.\n"
    )
    with caplog.at_level("WARNING", logger="cosytune.data.transcribe"):
        transcribe_dataset(
            wavs, tmp_path / "out", TranscribeConfig(backend="transcripts", transcripts=tf, dev_size=1)
        )
    assert "1 of 3 line(s)" in caplog.text and "c_typo.mp3" in caplog.text


def test_earlier_stage_rejects_are_carried(tmp_path):
    wavs = make_prepared(tmp_path, {"a.mp3": [3.0], "b.mp3": [3.0], "c.mp3": [3.0]})
    write_jsonl(
        wavs / "rejects.jsonl",
        [{"stage": "prepare-audio", "input": "/x/silence.mp3", "reason": "all_silence", "detail": ""}],
    )
    (wavs / "c.wav").unlink()  # listed but gone
    for n in "ab":
        (tmp_path / "raw").mkdir(exist_ok=True)
        (tmp_path / "raw" / f"{n}.txt").write_text(f"Recording {n} says something short.")
    out = tmp_path / "out"
    s = transcribe_dataset(wavs, out, TranscribeConfig(backend="transcripts", dev_size=1))
    assert s.kept == 2
    reasons = Counter((r["stage"], r["reason"]) for r in read_jsonl(out / "rejects.jsonl"))
    assert reasons == Counter({("prepare-audio", "all_silence"): 1, ("transcribe", "missing_wav"): 1})
    transcribe_dataset(
        wavs, out, TranscribeConfig(backend="transcripts", dev_size=1)
    )  # re-run: no duplicates
    assert len(read_jsonl(out / "rejects.jsonl")) == 2
    apply_review(out)  # rebuilding from the review file keeps both
    assert Counter((r["stage"], r["reason"]) for r in read_jsonl(out / "rejects.jsonl")) == reasons


def test_filters_become_rejects(tmp_path):
    lengths = {
        "ok1": 3.0,
        "ok2": 3.0,
        "ok3": 4.0,
        "empty": 3.0,
        "dots": 3.0,
        "tags": 3.0,
        "fast": 1.0,
        "slow": 20.0,
        "long": 31.0,
        "short": 0.3,
        "zh_ok": 2.0,
        "zh_fast": 1.0,
    }
    texts = {
        "ok1": "A perfectly normal sentence.",
        "ok2": "Another normal one, fine.",
        "ok3": "And the third clip here.",
        "empty": "   ",
        "dots": "… ? !",
        "tags": "[music] (applause)",
        "fast": "This sentence is far too long to be spoken in one second.",
        "slow": "Hi.",
        "long": "Some words for a clip that is longer than max sec. " * 3,
        "short": "Hi.",
        "zh_ok": "你好，今天天气很好。",
        "zh_fast": "这是一个在一秒钟里不可能说完的很长的中文句子。",
    }
    wavs = make_prepared(tmp_path, {f"{k}.wav": [v] for k, v in lengths.items()})
    tf = tmp_path / "t.txt"
    tf.write_text("".join(f"{k}|{v}\n" for k, v in texts.items()), encoding="utf-8")
    out = tmp_path / "out"
    s = transcribe_dataset(wavs, out, TranscribeConfig(backend="transcripts", transcripts=tf, dev_size=1))
    by_input = {Path(r["input"]).stem: r["reason"] for r in read_jsonl(out / "rejects.jsonl")}
    assert by_input == {
        "empty": "empty_transcript",
        "dots": "no_speakable_text",
        "tags": "no_speakable_text",
        "fast": "chars_per_sec_too_high",
        "slow": "chars_per_sec_too_low",
        "long": "too_long",
        "short": "too_short",
        "zh_fast": "chars_per_sec_too_high",
    }
    assert s.kept == 4 and s.train + s.dev == 4
    check_dataset(out, {str(p.resolve()) for p in wavs.glob("*.wav")})
    # bounds are settings: raising max_sec keeps the long clip
    s2 = transcribe_dataset(
        wavs, tmp_path / "o2", TranscribeConfig(backend="transcripts", transcripts=tf, dev_size=1, max_sec=35)
    )
    assert s2.kept == 5


def test_review_flags():
    base = Utterance(
        utt="spk_a", wav="", duration_s=3, sample_rate=SR, speaker="spk", source="a", source_rel="a"
    )
    asr = replace(
        base,
        text="Thank you for watching",
        text_source="faster-whisper",
        chars_per_s=7.0,
        asr_avg_logprob=-1.5,
        asr_no_speech_prob=0.9,
        asr_compression_ratio=3.0,
    )
    assert set(review_flags(asr)) == {
        "asr_known_hallucination",
        "asr_low_confidence",
        "asr_no_speech",
        "asr_repetitive",
        "no_punctuation",
    }
    assert review_flags(
        replace(asr, edited=True, asr_avg_logprob=None, asr_no_speech_prob=None, asr_compression_ratio=None)
    ) == ("no_punctuation",)
    mine = replace(base, text="Call 911 now.", text_source="transcripts", chars_per_s=30.0, check_cer=0.5)
    assert review_flags(mine) == ("asr_disagrees", "fast_speech", "digits")
    assert review_flags(mine, max_disagreement=0.6) == ("fast_speech", "digits")


def test_char_error_rate():
    assert char_error_rate("Hello, World!", "hello world") == 0
    assert char_error_rate("abcd", "abxd") == 0.25
    assert char_error_rate("今天天气很好。", "今天天气不好") == 1 / 6
    assert char_error_rate("abc", "") == 1 and char_error_rate("...", "") == 0
    assert char_error_rate("ab", "abab") == 1  # insertions count too


def test_speakable_units_and_language_guess():
    assert speakable_units("Hello, world!") == 10
    assert speakable_units("你好。") == 6  # two CJK characters, weight 3 each
    assert speakable_units("Call 911 [laughter] <strong>now</strong>") == 4 + 9 + 3
    assert speakable_units("... ♪ (music)") == 0
    assert guess_language("今天天气很好") == "zh" and guess_language("こんにちは") == "ja"
    assert guess_language("안녕하세요") == "ko" and guess_language("Bonjour") == "und"


def _utts(groups: dict[str, int]) -> list[Utterance]:
    return [
        Utterance(
            utt=f"spk_{g}_{i}", wav="", duration_s=3, sample_rate=SR, speaker="spk", source=g, source_rel=g
        )
        for g, n in groups.items()
        for i in range(n)
    ]


def test_split_groups_sources_and_sizes():
    utts = _utts({f"src{i}": 1 + i % 3 for i in range(20)})
    n = len(utts)
    for dev_size, want in ((0.1, round(0.1 * n)), (5, 5), (1, 1), (0.001, 1)):
        train, dev = split_train_dev(utts, dev_size, seed=3)
        assert 1 <= len(dev) <= want and len(train) + len(dev) == n
        src = {u.utt: u.source for u in utts}
        assert not {src[u] for u in train} & {src[u] for u in dev}
    assert split_train_dev(utts, 0.2, 1) == split_train_dev(list(reversed(utts)), 0.2, 1)
    with pytest.raises(DataError, match="too little data"):
        split_train_dev(_utts({"only": 5}), 1, 0)
    with pytest.raises(DataError, match="too little data"):
        split_train_dev(_utts({"a": 1, "b": 1}), 2, 0)


def test_too_small_dataset_is_a_clear_error(tmp_path):
    wavs = make_prepared(tmp_path, {"one.wav": [3.0]})
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "one.txt").write_text("Just one recording here.")
    with pytest.raises(DataError, match="too little data to split"):
        transcribe_dataset(wavs, tmp_path / "out", TranscribeConfig(backend="transcripts"))
    assert (tmp_path / "out" / "review.tsv").is_file()  # the user can still see and fix what was found


def test_config_validation_and_custom_instruct(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(TranscribeConfig, overrides=["instruct=Speak slowly.", "dev_size=1.5", "speaker=my spk"])
    msg = str(e.value)
    assert "<|endofprompt|>" in msg and "dev_size" in msg and "speaker" in msg
    with pytest.raises(ConfigError, match="cross_check: must differ from backend"):
        load_config(TranscribeConfig, overrides=["cross_check=faster-whisper"])
    wavs = make_prepared(tmp_path, {"a.wav": [3.0], "b.wav": [3.0]})
    (tmp_path / "raw").mkdir()
    for n in "ab":
        (tmp_path / "raw" / f"{n}.lab").write_text(f"Clip {n} has words.")
    instruct = "Speak like a news anchor.<|endofprompt|>"
    rc = main(
        [
            "transcribe",
            "--in_dir",
            str(wavs),
            "--backend",
            "transcripts",
            "--no_progress",
            f"instruct={instruct}",
            "dev_size=1",
        ]
    )
    assert rc == 0
    assert set(read_kaldi_map(wavs / "train" / "instruct").values()) == {instruct}
    tf = tmp_path / "t.txt"
    tf.write_text("a|Clip a, from the file.\nb|Clip b, from the file.\n")
    assert (
        main(["transcribe", "--in_dir", str(wavs), "--transcripts", str(tf), "dev_size=1", "--no_progress"])
        == 0
    )
    assert read_kaldi_map(wavs / "train" / "text").popitem()[1].endswith("from the file.")  # backend implied
    bad = ["transcribe", "--in_dir", str(wavs), "--transcripts", str(wavs), "--backend", "faster-whisper"]
    assert main(bad) == 2  # a transcripts file with an ASR backend is a config error, not silently ignored
    assert (
        main(["transcribe", "--in_dir", str(wavs), "--backend", "transcripts", "--instruct", "no marker"])
        == 2
    )


def test_openai_whisper_missing_gives_install_hint(tmp_path):
    pytest.importorskip("faster_whisper")
    try:
        import whisper  # noqa: F401

        pytest.skip("openai-whisper is installed here")
    except ImportError:
        pass
    wavs = make_prepared(tmp_path, {"a.wav": [3.0], "b.wav": [3.0]})
    with pytest.raises(MissingDependencyError, match=r"pip install 'cosytune\[whisper\]'"):
        transcribe_dataset(wavs, tmp_path / "out", TranscribeConfig(backend="openai-whisper"))


def test_empty_input_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["transcribe", "--in_dir", str(tmp_path / "empty"), "--backend", "transcripts"]) == 1
    assert "no audio found" in capsys.readouterr().err


def test_clips_outside_duration_bounds_are_not_decoded(tmp_path):
    wavs = make_prepared(tmp_path, {"a.wav": [3.0], "b.wav": [4.0]})

    def no_model(name, cfg):
        raise AssertionError("clips the duration filter rejects must not be sent to ASR")

    with pytest.raises(DataError, match="no usable utterances remain"):
        transcribe_dataset(wavs, tmp_path / "out", TranscribeConfig(max_sec=2.0), backend_factory=no_model)
    reasons = {r["reason"] for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert reasons == {"too_long"}

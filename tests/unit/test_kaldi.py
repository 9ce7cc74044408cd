"""Kaldi data dirs: write → read round trip, the reader's line rule, and the validator finds every kind of
inconsistency."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosytune.data.kaldi import (
    KaldiEntry,
    read_kaldi_dir,
    read_kaldi_entries,
    read_kaldi_map,
    upstream_warnings,
    validate_kaldi_dir,
    write_kaldi_dir,
)
from cosytune.errors import DataError

INSTRUCT = "You are a helpful assistant.<|endofprompt|>"


def _entries(tmp_path: Path, n: int = 3, spk: str = "spk") -> list[KaldiEntry]:
    out = []
    for i in range(n):
        wav = tmp_path / f"w {i}.wav"
        wav.write_bytes(b"RIFF")
        out.append(KaldiEntry(f"{spk}_u{i}", str(wav), f"text number {i}, with spaces", spk, INSTRUCT))
    return out


def test_round_trip_sorted_and_valid(tmp_path):
    entries = _entries(tmp_path, 4)[::-1] + _entries(tmp_path, 2, spk="Zed")  # unsorted, two speakers
    d = tmp_path / "train"
    assert write_kaldi_dir(d, entries) == 6
    assert validate_kaldi_dir(d) == []
    back = read_kaldi_entries(d)
    assert sorted(back, key=lambda e: e.utt) == sorted(entries, key=lambda e: e.utt)
    # byte order: upper-case 'Z' sorts before lower-case 's' (LC_ALL=C)
    assert [e.utt for e in back][:2] == ["Zed_u0", "Zed_u1"]
    spk2utt = dict(line.split(" ", 1) for line in (d / "spk2utt").read_text().splitlines())
    assert spk2utt["spk"].split() == ["spk_u0", "spk_u1", "spk_u2", "spk_u3"]
    # text keeps its words: the fields after the id, re-joined with single spaces
    assert back[2].text == "text number 0, with spaces"


def test_validator_reports_each_problem(tmp_path):
    d = tmp_path / "dev"
    write_kaldi_dir(d, _entries(tmp_path, 3))
    assert validate_kaldi_dir(d) == []
    text = (d / "text").read_text().splitlines()
    (d / "text").write_text("\n".join(text[1:]) + "\n")  # drop one utterance's text
    (d / "spk2utt").write_text("spk spk_u0\n")
    (d / "instruct").write_text((d / "instruct").read_text().replace("<|endofprompt|>", "", 1))
    Path(read_kaldi_dir_wav(d, "spk_u2")).unlink()
    problems = "\n".join(validate_kaldi_dir(d))
    assert "missing from text" in problems
    assert "spk2utt is not the inverse of utt2spk" in problems
    assert "not ending with <|endofprompt|>" in problems
    assert "do not exist" in problems
    with pytest.raises(DataError, match="inconsistent"):
        read_kaldi_entries(d)


def read_kaldi_dir_wav(d: Path, utt: str) -> str:
    return dict(line.split(" ", 1) for line in (d / "wav.scp").read_text().splitlines())[utt]


def test_unsorted_and_missing_files_are_reported(tmp_path):
    d = tmp_path / "x"
    write_kaldi_dir(d, _entries(tmp_path, 3))
    lines = (d / "utt2spk").read_text().splitlines()
    (d / "utt2spk").write_text("\n".join(lines[::-1]) + "\n")
    assert any("utt2spk is not sorted" in p for p in validate_kaldi_dir(d))
    (d / "instruct").unlink()
    assert "missing file(s) instruct" in validate_kaldi_dir(d)[0]
    assert validate_kaldi_dir(d, require_instruct=False) != []  # still unsorted


def test_writer_refuses_bad_ids_and_duplicates(tmp_path):
    e = _entries(tmp_path, 1)[0]
    with pytest.raises(DataError, match="whitespace"):
        write_kaldi_dir(tmp_path / "a", [KaldiEntry("spk u0", e.wav, "t", "spk", INSTRUCT)])
    with pytest.raises(DataError, match="appears twice"):
        write_kaldi_dir(tmp_path / "b", [e, e])
    with pytest.raises(DataError, match="line break"):
        write_kaldi_dir(tmp_path / "c", [KaldiEntry("spk_u0", e.wav, "two\nlines", "spk", INSTRUCT)])


def test_no_instruct_file_when_entries_have_none(tmp_path):
    d = tmp_path / "d"
    write_kaldi_dir(d, _entries(tmp_path, 2))
    write_kaldi_dir(d, [KaldiEntry(e.utt, e.wav, e.text, e.speaker) for e in _entries(tmp_path, 2)])
    assert not (d / "instruct").exists()
    assert validate_kaldi_dir(d, require_instruct=False) == []


def test_paths_with_spaces_read_back_but_warn_for_upstream(tmp_path):
    d = tmp_path / "e"
    entries = _entries(tmp_path, 2)  # files are named "w 0.wav", "w 1.wav"
    write_kaldi_dir(d, entries)
    assert [e.wav for e in read_kaldi_entries(d)] == [e.wav for e in entries]
    assert "make_parquet_list.py" in upstream_warnings(d)[0]
    plain = tmp_path / "plain.wav"
    plain.write_bytes(b"RIFF")
    write_kaldi_dir(d, [KaldiEntry("spk_u0", str(plain), "t", "spk", INSTRUCT)])
    assert upstream_warnings(d) == []


def test_reader_follows_upstreams_line_rule(tmp_path):
    """Upstream's tools split lines at whitespace runs: the first field is the id, text/instruct are
    the other fields re-joined with single spaces; a path keeps its spaces (upstream would cut it)."""
    d = tmp_path / "u"
    d.mkdir()
    (d / "wav.scp").write_text("a\t/data/my clips/a.wav\n\nb   /data/b.wav  \n")
    (d / "text").write_text("a  hello\t world \nb\n")
    (d / "utt2spk").write_text("a spk\nb\tspk\n")
    (d / "instruct").write_text(f"a You are  a helpful assistant.{INSTRUCT[-15:]}\nb {INSTRUCT}\n")
    kd = read_kaldi_dir(d, need=("wav.scp", "text", "utt2spk"))
    assert kd.utts == ["a", "b"]
    assert kd.utt2wav == {"a": "/data/my clips/a.wav", "b": "/data/b.wav"}
    assert kd.utt2text == {"a": "hello world", "b": ""}  # empty text is read (the validator reports it)
    assert kd.utt2spk == {"a": "spk", "b": "spk"}
    assert kd.utt2instruct == {"a": INSTRUCT, "b": INSTRUCT}
    assert [e.text for e in kd.entries()] == ["hello world", ""]
    # the feature-extraction stages use this same reader
    from cosytune.data import frontend_common

    assert frontend_common.read_kaldi_dir is read_kaldi_dir


def test_reader_lists_every_malformed_line(tmp_path):
    p = tmp_path / "wav.scp"
    p.write_text("a /x/a.wav\nb\na /x/a2.wav\nc /x/c.wav\nd \t \n")
    with pytest.raises(DataError) as err:
        read_kaldi_map(p)
    msg = str(err.value)
    assert "3 malformed line(s)" in msg
    assert "line 2: 'b' has an id but no value" in msg
    assert "line 3: id 'a' appears twice" in msg
    assert "line 5: 'd' has an id but no value" in msg
    assert "Fix these lines" in msg
    # a word file may have an empty value, but ids must still be unique
    t = tmp_path / "text"
    t.write_text("a\nb two words\nb again\n")
    with pytest.raises(DataError, match="line 3: id 'b' appears twice"):
        read_kaldi_map(t)
    with pytest.raises(DataError, match="does not exist"):
        read_kaldi_map(tmp_path / "utt2spk")
    with pytest.raises(DataError, match="lacks utt2spk"):
        read_kaldi_entries(tmp_path)

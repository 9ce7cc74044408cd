"""The review loop: edit review.tsv, rebuild train/dev with apply-review, edits survive re-runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cosytune.cli.main import main
from cosytune.data.kaldi import read_kaldi_map, validate_kaldi_dir
from cosytune.data.review import read_review
from cosytune.data.transcribe import TranscribeConfig, apply_review, transcribe_dataset
from cosytune.errors import DataError
from cosytune.fileio import read_jsonl

TEXTS = {
    "a": "The first recording says this.",
    "b": "The second recording says that.",
    "c": "A third one, for good measure.",
    "d": "Number four is here as well.",
    "e": "And the fifth one closes the set.",
}


def _make(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in [*TEXTS, "f"]:
        sf.write(src / f"{name}.wav", (0.05 * rng.standard_normal(24000 * 3)).astype(np.float32), 24000)
        if name in TEXTS:
            (src / f"{name}.txt").write_text(TEXTS[name])
    return src


def _edit(path: Path, edits: dict[str, tuple[str | None, str | None]]) -> None:
    """Rewrite review.tsv lines: utt -> (new delete mark or None, new text or None)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        f = line.split("\t")
        if len(f) == 7 and f[0] in edits:
            mark, text = edits[f[0]]
            f[4] = f[4] if mark is None else mark
            f[6] = f[6] if text is None else text
            lines[i] = "\t".join(f)
    path.write_text("\n".join(lines), encoding="utf-8")


def _all_texts(out: Path) -> dict[str, str]:
    return {**read_kaldi_map(out / "train" / "text"), **read_kaldi_map(out / "dev" / "text")}


def test_review_round_trip_and_rerun_keeps_edits(tmp_path, capsys):
    src = _make(tmp_path)
    out = tmp_path / "out"
    cfg = TranscribeConfig(backend="transcripts", dev_size=1)
    s = transcribe_dataset(src, out, cfg)
    assert s.kept == 5 and s.rejects["no_transcript"] == 1
    review = read_review(out / "review.tsv")
    assert review["spk_f"].status == "rejected:no_transcript" and review["spk_f"].text == ""
    assert next(iter(review)) == "spk_f"  # rejected rows come first

    _edit(
        out / "review.tsv",
        {
            "spk_a": (None, "The first recording, corrected by hand."),
            "spk_b": ("x", None),
            "spk_f": (None, "Typed in during review, this clip is back."),
        },
    )
    assert main(["apply-review", "--dir", str(out), "--no_progress"]) == 0
    assert "review edits applied" in capsys.readouterr().out
    texts = _all_texts(out)
    assert texts["spk_a"] == "The first recording, corrected by hand."
    assert "spk_b" not in texts and texts["spk_f"].startswith("Typed in")
    for split in ("train", "dev"):
        assert validate_kaldi_dir(out / split) == []
    rejects = {(r["stage"], r["reason"]) for r in read_jsonl(out / "rejects.jsonl")}
    assert rejects == {("transcribe", "deleted_in_review")}
    meta = {m["utt"]: m for m in read_jsonl(out / "metadata.jsonl")}
    assert (
        meta["spk_a"]["edited"]
        and meta["spk_a"]["text_source"] == "transcripts"
        and set(meta)
        == {
            "spk_a",
            "spk_c",
            "spk_d",
            "spk_e",
            "spk_f",
        }
    )

    # apply-review is idempotent; the rewritten review file still carries every edit
    before = (out / "review.tsv").read_text()
    apply_review(out)
    assert (out / "review.tsv").read_text() == before and _all_texts(out) == texts

    # a re-run of transcribe keeps the edits, but takes changed source text for unedited rows
    (src / "c.txt").write_text("A third one, with a new transcript.")
    s2 = transcribe_dataset(src, out, cfg)
    texts2 = _all_texts(out)
    assert texts2["spk_a"] == texts["spk_a"] and texts2["spk_f"] == texts["spk_f"] and "spk_b" not in texts2
    assert texts2["spk_c"] == "A third one, with a new transcript."
    assert s2.review_edits == 3

    # overrides of the saved settings apply; undoing a delete brings the row back
    _edit(out / "review.tsv", {"spk_b": ("", None)})
    s3 = apply_review(out, ["dev_size=2"])
    assert s3.dev == 2 and s3.kept == 6 and _all_texts(out)["spk_b"] == TEXTS["b"]
    # reverting an edit by hand restores the backend's text and clears the edited mark
    _edit(out / "review.tsv", {"spk_a": (None, TEXTS["a"])})
    apply_review(out)
    meta = {m["utt"]: m for m in read_jsonl(out / "metadata.jsonl")}
    assert meta["spk_a"]["text"] == TEXTS["a"] and not meta["spk_a"]["edited"]


def test_spreadsheet_quoting_and_crlf(tmp_path):
    p = tmp_path / "review.tsv"
    p.write_bytes(
        "utt_id\tduration_s\tstatus\tflags\tdelete\tasr_check\ttext\r\n"
        'spk_a\t3.00\ttrain\t\t\t\t"She said ""hi"", then left."\r\n'
        "spk_b\t2.50\tdev\tdigits\tX\tcall nine one one\tCall 911.\r\n"
        "spk_c\t2.00\trejected:no_transcript\t\t\t\r\n".encode("utf-8-sig")
    )
    rows = read_review(p)
    assert rows["spk_a"].text == 'She said "hi", then left.' and not rows["spk_a"].delete
    assert rows["spk_b"].delete and rows["spk_b"].flags == ("digits",)
    assert rows["spk_b"].check_text == "call nine one one"
    assert rows["spk_c"].text == ""


def test_malformed_review_files_name_the_line(tmp_path):
    p = tmp_path / "review.tsv"
    p.write_text(
        "utt_id\tduration_s\tstatus\tflags\tdelete\tasr_check\ttext\nspk_a\t3\ttrain\t\tmaybe\t\tText.\nspk_b\t3\n"
    )
    with pytest.raises(DataError) as e:
        read_review(p)
    assert "line 2 (spk_a): delete column holds 'maybe'" in str(e.value) and "line 3" in str(e.value)
    p.write_text("spk_a\t3\ttrain\t\t\tText.\n")
    with pytest.raises(DataError, match="expected the header"):
        read_review(p)


def test_apply_review_needs_a_transcribe_dir(tmp_path, capsys):
    assert main(["apply-review", "--dir", str(tmp_path)]) == 1
    assert "transcribe_config.yaml" in capsys.readouterr().err


def test_failed_rebuild_leaves_no_stale_lists(tmp_path):
    src = _make(tmp_path)
    out = tmp_path / "out"
    transcribe_dataset(src, out, TranscribeConfig(backend="transcripts", dev_size=1))
    assert (out / "train" / "wav.scp").is_file()
    _edit(out / "review.tsv", {u: ("x", None) for u in ("spk_a", "spk_b", "spk_c", "spk_d")})
    with pytest.raises(DataError, match="too little data to split"):
        apply_review(out)
    assert not (out / "train" / "wav.scp").exists() and not (out / "metadata.jsonl").exists()
    assert read_review(out / "review.tsv")["spk_a"].delete  # the edits are kept for the next try
    _edit(out / "review.tsv", {"spk_a": ("", None)})
    assert apply_review(out).kept == 2

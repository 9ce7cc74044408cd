"""cosytune eval's pure parts: CER/WER alignment and normalisation, looping detection, the held-out sentence
set, the selection rule on scores that are known, the verdict and the summaries."""

from __future__ import annotations

import math

import pytest

from cosytune.errors import DataError, UsageError
from cosytune.evaluation.report import compare, verdict
from cosytune.evaluation.scorecard import Variant, clip_failures, mean_ci, summarize
from cosytune.evaluation.select import SelectionRule, select
from cosytune.evaluation.sentences import build_sentence_set, shipped
from cosytune.evaluation.textmetrics import align, clean, repeated_ngram_score, score_text


def test_alignment_counts_substitutions_deletions_insertions():
    e = align(["a", "b", "c", "d"], ["a", "x", "c", "d", "e"])
    assert (e.substitutions, e.deletions, e.insertions, e.ref_len) == (1, 0, 1, 4) and e.error_rate == 0.5
    e = align(["a", "b", "c"], ["a"])
    assert (e.deletions, e.error_rate) == (2, 2 / 3)
    assert align([], []).error_rate == 0.0 and align([], ["x"]).error_rate == 1.0


def test_wer_and_cer_normalise_both_sides():
    # Case and punctuation never count.
    s = score_text("Hello, World! Is it ready?", "hello world is it ready")
    assert s.lang == "en" and s.error_rate == 0.0
    # Numbers: the same text front end spells them out on both sides.
    from cosytune.text.normalize import TextNormalizer

    tn = TextNormalizer()
    norm = lambda t: " ".join(tn.normalize(t))
    s = score_text("Gate 42, at 3 PM.", "gate forty two at three pm", norm)
    assert s.error_rate == 0.0, (s.reference, s.hypothesis)
    s = score_text("会议在3月14日。", "会议在三月十四日", norm)
    assert s.lang == "zh" and s.error_rate == 0.0, (s.reference, s.hypothesis)
    # Chinese is compared per character: one wrong character of seven.
    s = score_text("今天天气很好啊", "今天天汽很好啊")
    assert s.error_rate == pytest.approx(1 / 7) and s.substitution_rate == pytest.approx(1 / 7)
    assert clean("Don't  STOP—now!") == "don't stop now"


def test_looping_output_is_flagged():
    ref = "the cat sat on the mat"
    loop = score_text(ref, " ".join([ref] * 3))
    assert loop.insertion_rate == 2.0 and loop.repeat_score > 0.5
    ok = score_text(ref, ref)
    assert ok.repeat_score == 0.0 and ok.error_rate == 0.0
    assert repeated_ngram_score(list("abcabcabc"), 3) == pytest.approx(4 / 7)


def test_shipped_sentences_and_overlap_with_training_text(tmp_path):
    en, zh = shipped("en"), shipped("zh")
    assert len(en) >= 12 and len(zh) >= 12 and all(s.lang == "zh" for s in zh)
    assert any(any(c.isdigit() for c in s.text) for s in en) and any(s.text.endswith("?") for s in en)
    training = [en[2].text.upper(), "unrelated words", zh[0].text + "啊"]  # one in other case, one inside
    user = tmp_path / "mine.txt"
    user.write_text("# mine\nMy own sentence.\n\n", encoding="utf-8")
    ss = build_sentence_set(["en", "zh"], texts_file=user, training_texts=training)
    texts = [s.text for s in ss.sentences]
    assert en[2].text not in texts and en[2] in ss.dropped and "My own sentence." in texts
    assert [s.source for s in ss.sentences].count("mine.txt") == 1
    assert len(build_sentence_set(["en"], max_per_language=3).sentences) == 3
    with pytest.raises(UsageError, match="no shipped sentence list"):
        shipped("fr")
    with pytest.raises(DataError, match="no such file"):
        build_sentence_set([], texts_file=tmp_path / "missing.txt")
    with pytest.raises(DataError, match="every evaluation sentence"):
        build_sentence_set([], texts_file=user, training_texts=["my own sentence"])


def _summary(cer, sim, ovrl, fail=0.0):
    return {"role": "checkpoint", "takes": 4, "failure_rate": fail,
            "error_rate": {"mean": cer, "ci95": 0.01, "n": 4}, "sim_centroid": {"mean": sim, "ci95": 0.01, "n": 4},
            "sim_ref": {"mean": sim, "ci95": 0.01, "n": 4}, "ovrl": {"mean": ovrl, "ci95": 0.05, "n": 4}}


def test_selection_rule_on_known_scores():
    rule = SelectionRule(cer_tolerance=0.02, sim_tie=0.01)
    s = {"avg": _summary(0.05, 0.80, 3.0), "ep1": _summary(0.10, 0.90, 3.5),  # best SIM but CER regresses
         "ep2": _summary(0.06, 0.85, 2.9), "ep3": _summary(0.04, 0.84, 3.4)}
    sel = select(s, ["avg", "ep1", "ep2", "ep3"], rule)
    # ep1 is out on CER (0.10 > 0.04 + 0.02); ep2 (0.85) and ep3 (0.84) tie on SIM; ep3 has the higher OVRL.
    assert sel.winner == "ep3" and "ep1" in sel.eliminated and "CER" in sel.eliminated["ep1"]
    assert "tie" in sel.why and "OVRL" in sel.why
    # Without a tie the higher similarity wins.
    s["ep3"] = _summary(0.04, 0.70, 3.4)
    assert select(s, ["avg", "ep1", "ep2", "ep3"], rule).winner == "ep2"
    # No ASR: the CER step is skipped and says so; failures still count.
    noasr = {k: {**v, "error_rate": {"mean": math.nan, "ci95": math.nan, "n": 0}} for k, v in s.items()}
    noasr["ep1"]["failure_rate"] = 0.5
    sel = select(noasr, ["avg", "ep1", "ep2", "ep3"], rule)
    assert sel.winner == "ep2" and "skipped" in sel.why and "failure rate" in sel.eliminated["ep1"]
    # An exact tie keeps the first (default) candidate.
    same = {"a": _summary(0.05, 0.8, 3.0), "b": _summary(0.05, 0.8, 3.0)}
    assert select(same, ["a", "b"]).winner == "a" and select(same, ["b", "a"]).winner == "b"
    with pytest.raises(UsageError):
        select(same, [])
    with pytest.raises(UsageError, match="no scores"):
        select(same, ["c"])


def test_verdict_names_the_differences():
    s = {"base": {**_summary(0.05, 0.70, 3.2), "role": "baseline"},
         "tuned": {**_summary(0.05, 0.78, 3.1), "role": "tuned"},
         "base flow": {**_summary(0.05, 0.78, 3.5), "role": "base_flow"}}
    v = verdict(s, "ASR: faster-whisper x", {"winner": "tuned", "reasons": ["r"]}, baseline="base", tuned="tuned",
                base_flow="base flow")
    assert "tuned beats base on SIM by +0.08 and CER equal" in v
    assert "flow tuning hurts OVRL by 0.40 → keep base flow" in v and "pick: tuned" in v
    assert compare(s["tuned"], s["base"], "error_rate") == ("equal", 0.0)
    assert "ASR unavailable" in verdict(s, "ASR unavailable (x): intelligibility skipped")


def test_failures_and_summaries():
    import numpy as np

    assert clip_failures(np.zeros(0, np.float32), 24000) == ["empty"]
    assert set(clip_failures(np.zeros(1000, np.float32), 24000)) == {"too_short", "silent"}
    loud = np.ones(24000, np.float32)
    assert clip_failures(loud, 24000) == ["clipped"]
    assert clip_failures((0.3 * np.sin(np.arange(24000) / 5)).astype(np.float32), 24000) == []
    m, ci, n = mean_ci([1.0, 2.0, 3.0, math.nan])
    assert (m, n) == (2.0, 3) and ci == pytest.approx(1.96 / math.sqrt(3))
    v = [Variant("a", "x", "tuned")]
    rows = [{"variant": "a", "sentence": "s1", "take": k, "failures": ["silent"] if k == 0 else [],
             "sim_ref": 0.5 + 0.1 * k} for k in range(2)]
    summ = summarize(rows, v)["a"]
    assert summ["failure_rate"] == 0.5 and summ["failures"]["silent"] == 1
    assert summ["sim_ref"]["mean"] == pytest.approx(0.55) and summ["seed_spread"]["sim_ref"] == pytest.approx(0.0707, abs=1e-3)

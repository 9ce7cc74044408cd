"""Tests for the text front end (cosytune.text.normalize).

Golden: every input and expected output comes from ``tests/golden/textnorm.json`` (golden README §12),
looped over its items, compared by exact string equality. We target the ``latest`` variant (wetext 0.1.8);
the ``pinned`` variant's recorded wetext output is replayed through our post-TN rules and splitter, which
do not depend on the wetext version. The fixture's tokenizer stand-in counts one token per UTF-8 byte, so
English splits use :func:`count_utf8_bytes`.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from cosytune.config.loading import load_config
from cosytune.errors import ConfigError, DataError
from cosytune.text.normalize import (
    TextFrontendConfig,
    TextFrontendError,
    TextNormalizer,
    UnspeakableTextError,
    contains_chinese,
    count_utf8_bytes,
    has_special_token_syntax,
    is_only_punctuation,
    postprocess_en,
    postprocess_zh,
    split_paragraph,
)
from cosytune.text.special import ENDOFPROMPT

TARGET = "latest"  # the wetext 0.1.8 variant; see the module docstring of cosytune.text.normalize


@pytest.fixture(scope="module")
def textnorm(golden) -> dict:
    return golden.json("textnorm")


@pytest.fixture(scope="module")
def items(textnorm) -> list[dict]:
    assert textnorm["items"], "textnorm.json has no items"
    return textnorm["items"]


@pytest.fixture(scope="module")
def norm() -> TextNormalizer:
    return TextNormalizer(token_counter=count_utf8_bytes)


def _expects_error(item: dict, variant: str) -> bool:
    """Inputs for which we deliberately raise instead of returning upstream's degenerate result."""
    return item["input"].strip() == "" or item[variant]["split_true"] == []


def _speakable(items: list[dict]) -> list[dict]:
    return [it for it in items if not _expects_error(it, TARGET)]


def _of_branch(items: list[dict], branch: str) -> list[dict]:
    return [it for it in _speakable(items) if it["branch"] == branch]


def _skipped(items: list[dict]) -> list[dict]:
    return [it for it in _speakable(items) if it["branch"].startswith("skipped")]


# --------------------------------------------------------------------------------------------------
# Golden: latest variant, end to end through wetext 0.1.8
# --------------------------------------------------------------------------------------------------


def test_golden_split_false_matches_latest(norm, items):
    mismatches = []
    for it in items:
        if _expects_error(it, TARGET):
            with pytest.raises(UnspeakableTextError):
                norm.normalize(it["input"])
            continue
        out = norm.normalize(it["input"], split=False)
        if out != [it[TARGET]["split_false"]]:
            mismatches.append((it["input"], out, it[TARGET]["split_false"]))
    assert not mismatches, mismatches


def test_golden_split_true_matches_latest(norm, items):
    checked = 0
    mismatches = []
    for it in items:
        expected = it[TARGET]["split_true"]
        if _expects_error(it, TARGET):
            with pytest.raises(UnspeakableTextError):
                norm.normalize(it["input"], split=True)
            continue
        if expected is None:  # English text too long for the byte-count stand-in to decide splits
            continue
        out = norm.normalize(it["input"], split=True)
        checked += 1
        if out != expected:
            mismatches.append((it["input"], out, expected))
    assert not mismatches, mismatches
    assert checked > 0


def test_golden_branch_and_wetext_output(norm, items):
    for it in items:
        if it["branch"].startswith("skipped"):
            assert it["input"] == "" or norm.branch(it["input"]) == "special"
            continue
        assert norm.branch(it["input"]) == it["branch"], it["input"]
        expected_tn = it[TARGET]["wetext_out"]
        # The fixture records wetext's raw call; a mismatch means the installed wetext is not the version
        # the fixture was made with. (norm.tn adds our workarounds, which matter only for quotes/crashes.)
        zh_tn, en_tn = norm._backends()
        raw = (zh_tn if it["branch"] == "zh" else en_tn).normalize(it["input"].strip())
        assert raw == expected_tn, it["input"]
        if '"' not in raw and "\\" not in raw:
            assert norm.tn(it["input"].strip(), it["branch"]) == raw


def test_golden_pinned_variant_rules_replayed(items):
    """Our post-TN rules and splitter on the pinned variant's recorded wetext output (no wetext involved)."""
    import inflect

    engine = inflect.engine()
    checked = 0
    for it in items:
        pinned = it["pinned"]
        if it["branch"] not in ("zh", "en") or _expects_error(it, "pinned"):
            continue
        if it["branch"] == "zh":
            text = postprocess_zh(pinned["wetext_out"])
            measure = len
        else:
            text = postprocess_en(pinned["wetext_out"], engine.number_to_words)
            measure = count_utf8_bytes
        assert text == pinned["split_false"], it["input"]
        if pinned["split_true"] is not None:
            segs = [s for s in split_paragraph(text, it["branch"], measure) if not is_only_punctuation(s)]
            assert segs == pinned["split_true"], it["input"]
        checked += 1
    assert checked > 0


def test_golden_fixture_records_13_differences(textnorm, items):
    """The count the module docstring documents is the fixture's own count."""
    n_diff = sum(it["pinned"]["split_false"] != it["latest"]["split_false"] for it in items)
    assert n_diff == textnorm["n_split_false_differences"]


# --------------------------------------------------------------------------------------------------
# The seed's worst bug: split=False must give exactly one segment, never one per character
# --------------------------------------------------------------------------------------------------


def _one_segment_inputs(items: list[dict]) -> list[str]:
    """Fixture inputs of every kind, plus long, mixed and <|endofprompt|> texts built from them."""
    zh = [it["input"] for it in _of_branch(items, "zh")]
    en = [it["input"] for it in _of_branch(items, "en")]
    special = [it["input"] for it in _skipped(items)]
    texts = zh + en + special
    if zh:
        texts.append("".join(zh))  # long enough that split=True cuts it into several segments
    if en:
        texts.append(" ".join(en))
    if zh and en:
        texts.append(zh[0] + " " + en[0])  # mixed: contains Chinese → zh branch
    for base in (zh[:1] + en[:1]) or [it["input"] for it in _speakable(items)][:1]:
        texts.append(f"You are a helpful assistant.{ENDOFPROMPT}{base}")
    return texts


def test_split_false_yields_exactly_one_segment(norm, items):
    texts = _one_segment_inputs(items)
    assert len(texts) >= len(_speakable(items))
    for text in texts:
        out = norm.normalize(text)
        assert isinstance(out, list), type(out)
        assert len(out) == 1, (text, out)
        assert isinstance(out[0], str) and len(out[0]) > 1
        # Also with the front end off, and with split explicitly False.
        assert norm.normalize(text, split=False, enabled=False) == [text]


def test_split_false_one_segment_where_split_true_gives_many(norm, items):
    zh = [it["input"] for it in _of_branch(items, "zh")]
    if not zh:
        pytest.skip("fixture has no zh items")
    long_text = "".join(zh)
    many = norm.normalize(long_text, split=True)
    one = norm.normalize(long_text, split=False)
    assert len(many) > 1
    assert len(one) == 1
    # The single segment holds every segment's words (split only adds a final stop and drops doubles).
    assert all(seg.rstrip("。") in one[0] for seg in many)


def test_special_token_text_is_untouched_in_both_modes(norm, items):
    special = _skipped(items)
    if not special:
        pytest.skip("fixture has no <|...|> items")
    for it in special:
        text = it["input"]
        assert has_special_token_syntax(text)
        assert norm.normalize(text) == [it[TARGET]["split_false"]] == [text]
        assert norm.normalize(text, split=True) == it[TARGET]["split_true"] == [text]


# --------------------------------------------------------------------------------------------------
# Errors and switches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "。。。", "...", "?!", "😀", "（）——", "<||>"])
@pytest.mark.parametrize("split", [False, True])
def test_empty_and_punctuation_only_text_raise(norm, text, split):
    with pytest.raises(UnspeakableTextError) as info:
        norm.normalize(text, split=split)
    assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)
    assert "expected" in str(info.value)


@pytest.mark.parametrize("text", ["", "  ", "!!!"])
def test_empty_text_raises_with_front_end_off(text):
    with pytest.raises(UnspeakableTextError):
        TextNormalizer(TextFrontendConfig(enabled=False)).normalize(text)


def test_number_too_long_for_inflect_is_a_clear_error(norm):
    # wetext leaves full-width digits alone; str.isdigit matches them, so inflect sees the whole run.
    long_run = "\uff11" * 40
    assert norm.tn("id " + long_run, "en") == "id " + long_run
    with pytest.raises(UnspeakableTextError, match="too long"):
        norm.normalize("id " + long_run)


def test_repeated_whitespace_in_english_does_not_crash(norm, items):
    """wetext 0.1.8 fails on whitespace runs in English; we collapse them and get the single-space result."""
    en = [it for it in _of_branch(items, "en") if "  " not in it["input"]]
    if not en:
        pytest.skip("fixture has no en items")
    for it in en:
        doubled = it["input"].replace(" ", "  ")
        assert norm.normalize(doubled) == [it[TARGET]["split_false"]], it["input"]
    first, last = en[0], en[-1]
    paragraphs = norm.normalize(first["input"] + "\n\n" + last["input"])
    assert paragraphs == norm.normalize(first["input"] + " " + last["input"])


def test_wetext_quote_escaping_is_undone(norm, items):
    """wetext 0.1.8 outputs \\" for every quote when its grammar runs; no backslash may reach the LLM."""
    checked = 0
    for it in _of_branch(items, "zh") + _of_branch(items, "en"):
        text = it["input"].strip()
        if text[-1] in "，,、":  # the trailing-comma rule cannot see through a closing quote
            continue
        assert norm.normalize(f'"{text}"') == [f'"{it[TARGET]["split_false"]}"'], text
        checked += 1
    assert checked > 0
    # Backslashes survive: escaped ones are unescaped, untouched text (zh without digits) is left alone.
    assert norm.normalize("path C:\\dir 5") == ["path C:\\dir five"]
    assert norm.normalize('他说"你好"\\好') == ['他说"你好"\\好']
    assert norm.normalize('他说"你好2"\\好') == ['他说"你好二"\\好']


def test_wetext_failure_is_a_clear_error(norm):
    text = "Item #1 is here."
    try:
        norm._backends()[1].normalize(text)
    except AssertionError:
        pass
    else:
        pytest.skip("this wetext version no longer fails on '#1'")
    with pytest.raises(TextFrontendError, match="no-text_frontend") as info:
        norm.normalize(text)
    assert isinstance(info.value, DataError)


def test_non_str_input_is_a_type_error(norm):
    with pytest.raises(TypeError, match="generator"):
        norm.normalize(iter(["hello"]))  # type: ignore[arg-type]


def test_english_split_needs_a_token_counter(items):
    en = _of_branch(items, "en")
    if not en:
        pytest.skip("fixture has no en items")
    bare = TextNormalizer()
    assert len(bare.normalize(en[0]["input"])) == 1  # split=False needs no counter
    with pytest.raises(ValueError, match="token_counter"):
        bare.normalize(en[0]["input"], split=True)


def test_front_end_switch(items):
    off = TextNormalizer(TextFrontendConfig(enabled=False))
    on = TextNormalizer(TextFrontendConfig(enabled=True))
    changed = [
        it
        for it in _of_branch(items, "zh") + _of_branch(items, "en")
        if it[TARGET]["split_false"] != it["input"]
    ]
    assert changed
    for it in changed:
        assert off.normalize(it["input"]) == [it["input"]]
        assert off.normalize(it["input"], split=True) == [it["input"]]
        assert off.branch(it["input"]) == "disabled"
        assert on.normalize(it["input"], enabled=False) == [it["input"]]
    assert off._zh_tn is None  # wetext is never built while disabled
    for it in changed:  # per-call override, upstream's text_frontend argument
        assert off.normalize(it["input"], enabled=True) == [it[TARGET]["split_false"]]


def test_normalisers_are_per_object(items):
    a, b = TextNormalizer(), TextNormalizer()
    text = _speakable(items)[0]["input"]
    a.normalize(text)
    b.normalize(text)
    assert a._zh_tn is not None and a._zh_tn is not b._zh_tn and a._en_tn is not b._en_tn


def test_import_does_not_load_wetext():
    code = "import sys, cosytune.text.normalize; print('wetext' in sys.modules, 'inflect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_describe_reports_backend_and_versions():
    info = TextNormalizer().describe()
    assert info["backend"] == "wetext" and info["enabled"] is True
    assert info["wetext_version"] and info["inflect_version"]
    assert TextNormalizer(TextFrontendConfig(enabled=False)).describe()["backend"] == "none"


def test_config_loads_strictly():
    cfg = load_config(TextFrontendConfig, overrides=["enabled=false", "token_max_n=100"])
    assert cfg == TextFrontendConfig(enabled=False, token_max_n=100)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TextFrontendConfig, overrides=["tokn_max_n=3"])
    with pytest.raises(ConfigError, match="token_min_n"):
        load_config(TextFrontendConfig, overrides=["token_min_n=90"])


# --------------------------------------------------------------------------------------------------
# Rules and splitter, unit level (small synthetic strings exercising each documented rule)
# --------------------------------------------------------------------------------------------------


def test_language_and_special_detection():
    assert contains_chinese("abc中") and not contains_chinese("abc ｡ 한국어 かな")
    assert has_special_token_syntax("a<|x|>b") and has_special_token_syntax("|> then <|")
    assert not has_special_token_syntax("a<|b") and not has_special_token_syntax("a|>b")
    assert is_only_punctuation("") and is_only_punctuation("。！…$+😀")
    assert not is_only_punctuation(" .") and not is_only_punctuation("a.")


def test_postprocess_zh_rules():
    assert postprocess_zh("你 好 ab cd 中 e") == "你好ab cd中e"
    assert postprocess_zh(" 中 ") == "中"  # boundary spaces: upstream would index out of range
    assert postprocess_zh("面积5m²体积6m³") == "面积5m平方体积6m立方"
    assert postprocess_zh("第一.二") == "第一。二"
    assert postprocess_zh("中A - B文") == "中A，B文"
    assert postprocess_zh("（注意）【重要】`x`——好") == "注意重要x 好"
    assert postprocess_zh("明天见，,、") == "明天见。"
    assert postprocess_zh("第\n一行") == "第一行"


def test_postprocess_en_spells_every_digit_run():
    seen = []

    def words(run: str) -> str:
        seen.append(run)
        return f"<{run}>"

    assert postprocess_en("a1 b22c 333", words) == "a<1> b<22>c <333>"
    assert seen == ["1", "22", "333"]
    assert postprocess_en("no digits", words) == "no digits"


def test_split_paragraph_rules():
    # A final stop is added (。 for zh, . for en); short sentences merge into one segment.
    assert split_paragraph("你好。他说：“好”再见", "zh", len) == ["你好。他说：“好”再见。"]
    assert split_paragraph("Hi there", "en", len) == ["Hi there."]
    # A closing quote right after a stop stays with its sentence.
    assert split_paragraph("他说“好。”再见", "zh", len, token_max_n=5, token_min_n=1, merge_len=1) == [
        "他说“好。”",
        "再见。",
    ]
    # Greedy merge: a new segment when len(cur + next) > max and len(cur) > min ...
    parts = split_paragraph("aaaa. bbbb. cccc. d.", "en", len, token_max_n=12, token_min_n=4, merge_len=4)
    assert parts == ["aaaa. bbbb.", " cccc. d."]
    # ... and a final remainder shorter than merge_len joins the previous segment.
    long3 = "aaaaaa. bbbbbb. c."
    assert split_paragraph(long3, "en", len, token_max_n=10, token_min_n=4, merge_len=7) == [
        "aaaaaa.",
        " bbbbbb. c.",
    ]
    assert split_paragraph(long3, "en", len, token_max_n=10, token_min_n=4, merge_len=3) == [
        "aaaaaa.",
        " bbbbbb.",
        " c.",
    ]
    # The measure decides (tokens for en): with a 2x counter the same text cuts earlier.
    assert split_paragraph(
        "aaaa. bbbb.", "en", lambda s: 2 * len(s), token_max_n=12, token_min_n=4, merge_len=1
    ) == ["aaaa.", " bbbb."]
    # No cut while cur is not longer than token_min_n.
    assert split_paragraph("aaaa. bbbb.", "en", len, token_max_n=6, token_min_n=5) == ["aaaa. bbbb."]
    # A stop right after a stop is dropped (upstream), a quote after it joins the last sentence.
    assert split_paragraph("真的吗？？好", "zh", len) == ["真的吗？好。"]
    assert split_paragraph('好。。"再见', "zh", len) == ['好。"再见。']
    # A quote with no sentence before it opens the next one (upstream raises IndexError).
    assert split_paragraph('。"好', "zh", len) == ['"好。']
    # Commas cut only with comma_split.
    assert split_paragraph("一，二，三", "zh", len, token_max_n=2, token_min_n=1, merge_len=1) == [
        "一，二，三。"
    ]
    assert split_paragraph(
        "一，二，三", "zh", len, token_max_n=2, token_min_n=1, merge_len=1, comma_split=True
    ) == ["一，", "二，", "三。"]
    with pytest.raises(ValueError):
        split_paragraph("", "zh", len)


def test_random_text_never_crashes_and_keeps_the_result_shape(norm):
    """Seeded fuzz over digits, symbols, quotes, whitespace and CJK: a list of the documented shape, or a
    CosytuneError with a message; never a bare wetext/inflect exception, never a leaked backslash."""
    from cosytune.errors import CosytuneError

    pool = list(
        "0123456789    abcXYZ.,!?;:-+#%$€/'\"“”（）【】——`²³\n\\你好世界年月日。，、！？：；😀<|>&@*=_~"
    )
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(250):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 25)))
        for split in (False, True):
            try:
                out = norm.normalize(text, split=split)
            except CosytuneError as e:
                assert str(e)
                outcomes["error"] += 1
                continue
            outcomes["ok"] += 1
            assert isinstance(out, list) and out and all(isinstance(s, str) and s for s in out)
            if not split:
                assert len(out) == 1
            if "\\" not in text:
                assert "\\" not in "".join(out), (text, out)
    assert outcomes["ok"] > outcomes["error"]


def test_plain_text_does_not_pay_for_inflect():
    """inflect costs ~5 s to import on a CPU; it is only imported when a digit run is left after wetext."""
    import subprocess
    import sys

    code = ("import sys; from cosytune.text.normalize import TextNormalizer; n = TextNormalizer(); "
            "n.normalize('Hello! This is my new voice, made with cosytune.'); n.normalize('今天是2024年1月1日'); "
            "print('inflect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

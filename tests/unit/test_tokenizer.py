"""CosyVoice 3 tokenizer: the special-token contract and a real Qwen2 vocabulary built offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cosytune.errors import ModelDirError
from cosytune.text.tokenizer import (
    ENDOFPROMPT,
    ENDOFPROMPT_ID,
    MAX_TEXT_ID,
    build_tiny_qwen_tokenizer,
    cosyvoice3_special_tokens,
    load_tokenizer,
    special_tokens_sha256,
)

# CHECKPOINT-COMPAT: fingerprint of upstream CosyVoice3Tokenizer's additional_special_tokens list
# (280 strings, in registration order), computed from the upstream source at ace7c47.
UPSTREAM_SPECIALS_SHA256 = "4d5267643001673d742c7033834779c1e24f936caaf7a9ce850807222ee94b91"


@pytest.fixture(scope="module")
def blanken(tmp_path_factory) -> Path:
    return build_tiny_qwen_tokenizer(tmp_path_factory.mktemp("blanken"))


@pytest.fixture(scope="module")
def tok(blanken):
    return load_tokenizer(blanken)


def test_special_token_list_matches_upstream_order():
    specials = cosyvoice3_special_tokens()
    assert len(specials) == 280 and len(set(specials)) == 280
    assert specials[:3] == ["<|im_start|>", "<|im_end|>", ENDOFPROMPT]
    assert specials[19] == "<|endofsystem|>"
    assert specials[20:24] == ["[AA]", "[AA0]", "[AA1]", "[AA2]"] and specials[103] == "[ZH]"
    assert specials[104] == "[a]" and specials[-1] == "[ǜ]"
    assert special_tokens_sha256() == UPSTREAM_SPECIALS_SHA256
    assert MAX_TEXT_ID == 151923


def test_built_tokenizer_is_blanken_shaped(blanken):
    assert (blanken / "tokenizer.json").is_file() and (blanken / "tokenizer_config.json").is_file()
    vocab = json.loads((blanken / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 151643  # BPE ranks only; the 3 base specials live in tokenizer_config.json


def test_special_ids(tok):
    assert tok.endofprompt_id == ENDOFPROMPT_ID == 151646
    assert tok.hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok.hf.convert_tokens_to_ids("[breath]") == 151647
    assert tok.hf.convert_tokens_to_ids("<|endofsystem|>") == 151663
    assert tok.hf.convert_tokens_to_ids("[AA]") == 151664
    assert tok.hf.convert_tokens_to_ids("[a]") == 151748
    assert tok.vocab_size == MAX_TEXT_ID + 1


def test_real_qwen_vocabulary_ids(tok):
    # Qwen2's real ids for these strings (tiktoken qwen.tiktoken ranks; env.md §6b).
    assert tok.encode("今天天气很好，")[:4] == [100644, 104307, 101243, 3837]
    # digits split one by one (Qwen2 pattern), no BOS/EOS added
    assert tok.encode("123") == [16, 17, 18]


def test_specials_are_single_ids_and_decode_skips_them(tok):
    ids = tok.encode("You are a helpful assistant.<|endofprompt|>对报道[j][ǐ]予好评[AA1]")
    assert ids.count(ENDOFPROMPT_ID) == 1
    for t in ("[j]", "[ǐ]", "[AA1]"):
        assert tok.hf.convert_tokens_to_ids(t) in ids
    assert tok.decode(ids) == "You are a helpful assistant.对报道予好评"


def test_roundtrip_plain_text(tok):
    text = "Hello, world! Ça va? 你好，世界。 1 2 3\n tabs\tand  spaces"
    assert tok.decode(tok.encode(text)) == text


def test_missing_dir_is_clear_error(tmp_path):
    with pytest.raises(ModelDirError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="init-model"):
        load_tokenizer(tmp_path / "empty")


def test_shifted_base_vocabulary_is_refused(blanken, tmp_path):
    """A base tokenizer with one extra special (e.g. stock Qwen2.5) would shift every CosyVoice id."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(blanken), local_files_only=True)
    hf.add_special_tokens({"additional_special_tokens": ["<|object_ref_start|>"]})
    hf.save_pretrained(str(tmp_path))
    with pytest.raises(ModelDirError, match=r"151647 \(expected 151646\)|got id 151647"):
        load_tokenizer(tmp_path)
    shutil.rmtree(tmp_path)

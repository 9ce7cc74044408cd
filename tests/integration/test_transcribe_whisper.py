"""The faster-whisper backend, for real: a tiny randomly initialised Whisper built offline.

The model is built once per test session (about 8 s): a byte-level BPE tokenizer padded to
Whisper's multilingual layout (env.md §6a: the empty token "" at id 50256 makes CTranslate2
treat the model as multilingual), a 2-layer Whisper with 128 mel bins, converted to
CTranslate2 int8 with tokenizer.json and preprocessor_config.json copied (without them
faster-whisper would go to the Hub or assume 80 mels). Its output is random tokens; the
padding tokens are spelled with letters so the decoded text is "speakable" and flows through
the filters. Nothing downloads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("faster_whisper")
pytest.importorskip("ctranslate2")

from cosytune.data.review import read_review
from cosytune.data.transcribe import TranscribeConfig, build_asr_backend, transcribe_dataset
from cosytune.errors import DataError
from cosytune.fileio import read_jsonl, write_jsonl

D_MODEL, LAYERS, HEADS, FFN = 64, 2, 2, 128


def _letters(i: int) -> str:
    s = ""
    while True:
        s = chr(97 + i % 26) + s
        i //= 26
        if not i:
            return "zq" + s


def build_tiny_whisper(root: Path) -> Path:
    """Build and convert the tiny Whisper; returns the CTranslate2 model dir."""
    import torch
    from ctranslate2.converters import TransformersConverter
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(["please enter your number followed by the pound key."] * 8, trainer)
    model_json = json.loads(bpe.to_str())["model"]
    vocab = dict(model_json["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    i = 0
    while len(vocab) < 50256:  # pad to the multilingual layout; letters keep decoded text speakable
        vocab.setdefault(_letters(i), len(vocab))
        i += 1
    vocab[""] = 50256  # CTranslate2 treats a Whisper vocab as multilingual only if it holds ""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = (
        ["<|endoftext|>", "<|startoftranscript|>"]
        + [f"<|{c}|>" for c in LANGUAGES]
        + [
            "<|translate|>",
            "<|transcribe|>",
            "<|startoflm|>",
            "<|startofprev|>",
            "<|nospeech|>",
            "<|notimestamps|>",
        ]
    )
    hf = WhisperTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=specials,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    hf.add_tokens([f"<|{k * 0.02:.2f}|>" for k in range(1501)])
    assert len(hf) == 51866 and hf.convert_tokens_to_ids("<|notimestamps|>") == 50364
    hf_dir = root / "hf"
    hf.save_pretrained(hf_dir)
    cfg = WhisperConfig(
        vocab_size=51866,
        num_mel_bins=128,
        d_model=D_MODEL,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        decoder_start_token_id=50258,
        eos_token_id=50257,
        pad_token_id=50257,
        bos_token_id=50257,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        lang_to_id={f"<|{c}|>": hf.convert_tokens_to_ids(f"<|{c}|>") for c in LANGUAGES},
        task_to_id={"translate": 50359, "transcribe": 50360},
        no_timestamps_token_id=50364,
        alignment_heads=[[1, 0], [1, 1]],
        is_multilingual=True,
        decoder_start_token_id=50258,
        eos_token_id=50257,
        pad_token_id=50257,
        bos_token_id=50257,
        suppress_tokens=[],
        begin_suppress_tokens=[220, 50257],
    )
    model.save_pretrained(hf_dir)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(hf_dir)
    ct2 = root / "ct2"
    TransformersConverter(str(hf_dir), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(
        str(ct2), quantization="int8", force=True
    )
    shutil.rmtree(hf_dir)
    return ct2


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny_whisper"))


def _cfg(model: Path, **kw) -> TranscribeConfig:
    base = {
        "whisper_model": str(model),
        "device": "cpu",
        "compute_type": "int8",
        "beam_size": 1,
        "max_new_tokens": 6,
        "num_threads": 1,
        "vad_filter": False,
        "min_cps": 0.0,
        "max_cps": 1000.0,
        "dev_size": 1,
    }
    return TranscribeConfig(**{**base, **kw})


def _clips(sample_speaker_dir: Path, dst: Path, n: int) -> Path:
    dst.mkdir(parents=True)
    for p in sorted((sample_speaker_dir / "audio").glob("*.mp3"))[:n]:
        shutil.copy(p, dst / p.name)
    return dst


def test_faster_whisper_decodes_caches_and_resumes(tiny_whisper, sample_speaker_dir, tmp_path):
    src = _clips(sample_speaker_dir, tmp_path / "clips", 3)
    out = tmp_path / "out"
    cfg = _cfg(tiny_whisper, backend="faster-whisper", vad_filter=True)
    s = transcribe_dataset(src, out, cfg)
    assert (s.asr_decoded, s.asr_cached) == (3, 0)
    assert s.kept + sum(s.rejects.values()) == 3
    utts = read_jsonl(out / "utterances.jsonl")
    for u in utts:
        assert u["text_source"] == "faster-whisper" and u["language"]
        assert isinstance(u["asr_avg_logprob"], float) and 0 <= u["asr_no_speech_prob"] <= 1
        assert 0 <= u["asr_language_prob"] <= 1
    cache = json.loads((out / "asr_cache_faster-whisper.json").read_text())["entries"]
    assert sorted(cache) == sorted(u["utt"] for u in utts)

    def no_model(name, cfg):
        raise AssertionError("a re-run must not load the ASR model: every clip is cached")

    s2 = transcribe_dataset(src, out, cfg, backend_factory=no_model)
    assert (s2.asr_decoded, s2.asr_cached) == (0, 3)
    assert [u["text"] for u in read_jsonl(out / "utterances.jsonl")] == [u["text"] for u in utts]
    # a setting that changes the output invalidates the cache; forcing a language is honoured
    s3 = transcribe_dataset(src, out, _cfg(tiny_whisper, backend="faster-whisper", language="zh"))
    assert s3.asr_decoded == 3
    assert {u["language"] for u in read_jsonl(out / "utterances.jsonl")} == {"zh"}


def test_transcripts_fall_back_to_asr_for_sliced_sources(tiny_whisper, tmp_path):
    wavs = tmp_path / "wavs"
    rows = []
    rng = np.random.default_rng(0)
    for name, n in (("a.mp3", 1), ("b.mp3", 1), ("long.mp3", 2)):
        for k in range(n):
            utt = Path(name).stem + (f"__{k:03d}" if n > 1 else "")
            wavs.mkdir(exist_ok=True)
            sf.write(wavs / f"{utt}.wav", (0.05 * rng.standard_normal(24000 * 2)).astype(np.float32), 24000)
            rows.append(
                {
                    "utt": utt,
                    "wav": f"{utt}.wav",
                    "source": str(tmp_path / "raw" / name),
                    "source_rel": name,
                    "duration_s": 2.0,
                    "sample_rate": 24000,
                    "segment_index": k,
                    "num_segments": n,
                }
            )
    write_jsonl(wavs / "prepared.jsonl", rows)
    tf = tmp_path / "t.txt"
    tf.write_text("a.mp3|First clip, in my own words.\nlong.mp3|One text for two slices.\n")
    s = transcribe_dataset(
        wavs,
        tmp_path / "out",
        _cfg(tiny_whisper, backend="transcripts", transcripts=tf, asr_fallback="faster-whisper"),
    )
    assert s.asr_decoded == 3  # b (no transcript) and both slices of long
    by_utt = {u["utt"]: u for u in read_jsonl(tmp_path / "out" / "utterances.jsonl")}
    assert by_utt["spk_a"]["text_source"] == "transcripts" and by_utt["spk_a"]["text"].startswith(
        "First clip"
    )
    assert {by_utt[k]["text_source"] for k in ("spk_b", "spk_long__000", "spk_long__001")} == {
        "faster-whisper"
    }


def test_unloadable_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "not a model"
    bad.mkdir()
    with pytest.raises(DataError, match="could not load faster-whisper model"):
        build_asr_backend("faster-whisper", _cfg(bad, backend="faster-whisper"))
    with pytest.raises(DataError, match="does not exist"):
        build_asr_backend("faster-whisper", _cfg(tmp_path / "missing", backend="faster-whisper"))


def test_cross_check_flags_disagreeing_transcripts(tiny_whisper, sample_speaker_dir, tmp_path):
    src = _clips(sample_speaker_dir, tmp_path / "clips", 3)
    cfg = _cfg(
        tiny_whisper,
        backend="transcripts",
        transcripts=sample_speaker_dir / "transcripts.txt",
        cross_check="faster-whisper",
        min_cps=2.0,
        max_cps=30.0,
    )
    s = transcribe_dataset(src, tmp_path / "out", cfg)
    assert s.kept == 3 and s.asr_decoded == 3  # user text kept; the random model only adds a second opinion
    rows = read_review(tmp_path / "out" / "review.tsv")
    for u in read_jsonl(tmp_path / "out" / "metadata.jsonl"):
        assert u["text_source"] == "transcripts" and u["check_text"] and u["check_cer"] > 0.35
        assert "asr_disagrees" in u["flags"] and rows[u["utt"]].check_text == u["check_text"]
    s2 = transcribe_dataset(src, tmp_path / "out", cfg)
    assert (s2.asr_decoded, s2.asr_cached) == (0, 3)

"""Front-end features and resampling against the golden upstream fixtures (frontend.*).

Every clip, size and tolerance comes from the fixture files: ``frontend.json`` lists the clips (file,
rate, sample count), ``frontend.safetensors`` holds upstream's outputs, ``tolerances.json`` the bounds.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import soundfile as sf
import torch

from cosytune.audio.features import cmn, kaldi_fbank, mel_spectrogram, whisper_log_mel
from cosytune.audio.resample import resample

STEM = "frontend"


@pytest.fixture(scope="module")
def clips(golden):
    meta = golden.json(STEM)
    tensors = golden.tensors(STEM)
    out = {}
    for name, info in meta["clips"].items():
        path = golden.path(info["file"])
        raw = path.read_bytes()
        if "md5" in info:
            assert hashlib.md5(raw).hexdigest() == info["md5"], f"{path} is not the fixture's input"
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)  # upstream load_wav: soundfile float32
        assert sr == info["sample_rate"] and wav.shape[0] == info["num_samples"]
        mono = torch.from_numpy(np.ascontiguousarray(wav.T)).mean(dim=0)
        out[name] = (mono, sr, {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
    assert out, "frontend.json lists no clips"
    return out


def _wav16k(mono, sr, expected):
    return resample(mono, sr, 16000) if sr != 16000 else mono


def test_resample_to_24k_and_16k(golden, clips):
    checked = 0
    for name, (mono, sr, exp) in clips.items():
        for key, rate in (("load_wav_24k", 24000), ("load_wav_16k", 16000)):
            if key in exp:
                golden.check(STEM, f"{name}.{key}", resample(mono, sr, rate)[None], exp[key], tol_key=key)
                checked += 1
    assert checked >= len(clips)


def test_kaldi_fbank_and_cmn(golden, clips):
    for name, (mono, sr, exp) in clips.items():
        wav = _wav16k(mono, sr, exp)
        fb = kaldi_fbank(wav, sample_rate=16000, num_mel_bins=exp["kaldi_fbank"].shape[1])
        golden.check(STEM, f"{name}.kaldi_fbank", fb, exp["kaldi_fbank"], tol_key="kaldi_fbank")
        golden.check(STEM, f"{name}.kaldi_fbank_cmn", cmn(fb), exp["kaldi_fbank_cmn"], tol_key="kaldi_fbank_cmn")


def test_whisper_log_mel(golden, clips):
    for name, (mono, sr, exp) in clips.items():
        ref = exp["whisper_logmel128"]
        feat = whisper_log_mel(_wav16k(mono, sr, exp), n_mels=ref.shape[1])
        golden.check(STEM, f"{name}.whisper_logmel128", feat[None], ref, tol_key="whisper_logmel128")


def test_24k_mel_from_upstream_24k_wave(golden, clips):
    # Feed upstream's own 24 kHz wave so this isolates the mel; the chained test is below.
    for name, (_, _, exp) in clips.items():
        ref = exp["speech_feat_24k_mel"]
        mel = mel_spectrogram(exp["load_wav_24k"][0], n_mels=ref.shape[2])
        golden.check(STEM, f"{name}.speech_feat_24k_mel", mel.T[None], ref, tol_key="speech_feat_24k_mel")


def test_24k_mel_end_to_end(golden, clips):
    for name, (mono, sr, exp) in clips.items():
        ref = exp["speech_feat_24k_mel"]
        mel = mel_spectrogram(resample(mono, sr, 24000), n_mels=ref.shape[2])
        golden.check(STEM, f"{name}.speech_feat_24k_mel", mel.T[None], ref, tol_key="speech_feat_24k_mel")

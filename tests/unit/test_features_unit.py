"""Unit tests of the feature functions: filterbanks, shapes, edge cases, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cosytune.audio.features import (
    kaldi_fbank,
    kaldi_mel_banks,
    mel_spectrogram,
    slaney_mel_filterbank,
    whisper_log_mel,
)


@pytest.mark.parametrize("sr,n_fft,n_mels,fmax", [(16000, 400, 128, None), (24000, 1920, 80, None),
                                                  (22050, 1024, 80, 8000.0)])
def test_slaney_filterbank_matches_librosa_exactly(sr, n_fft, n_mels, fmax):
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=fmax)
    ours = slaney_mel_filterbank(sr, n_fft, n_mels, 0.0, fmax).numpy()
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


def test_filterbank_cache_is_keyed_on_every_parameter():
    # Matcha's cache keyed only on fmax returned a wrong basis for a second sample rate.
    a = slaney_mel_filterbank(24000, 1920, 80)
    b = slaney_mel_filterbank(16000, 1920, 80)
    assert not torch.equal(a, b)
    a[0, 0] = 123.0  # callers get copies, so the cache cannot be corrupted
    assert slaney_mel_filterbank(24000, 1920, 80)[0, 0] != 123.0


def test_kaldi_banks_shape_and_edges():
    banks = kaldi_mel_banks(80, 512, 16000, 20.0, 0.0)
    assert banks.shape == (80, 257)
    assert float(banks[:, -1].abs().sum()) == 0.0  # Nyquist bin unused
    assert float(banks[:, 0].abs().sum()) == 0.0  # DC is below low_freq 20 Hz
    assert torch.all(banks.max(dim=1).values > 0.3)  # every band sees at least one FFT bin


def test_frame_counts_follow_the_recipes():
    x = torch.randn(16000 * 2 + 123) * 0.1
    assert kaldi_fbank(x).shape == (1 + (x.numel() - 400) // 160, 80)
    assert whisper_log_mel(x).shape == (128, x.numel() // 160)
    y = torch.randn(24000 + 479) * 0.1
    assert mel_spectrogram(y).shape == (80, y.numel() // 480)


def test_whisper_floor_is_per_utterance():
    x = torch.cat([torch.randn(16000) * 0.1, torch.zeros(16000)])  # the silent half sits on the floor
    feat = whisper_log_mel(x)
    assert math.isclose(float(feat.max() - feat.min()), 2.0, rel_tol=0, abs_tol=1e-5)  # (max - (max-8))/4
    # The floor follows this utterance's own maximum: a louder copy moves it.
    assert not torch.allclose(whisper_log_mel(x * 4)[:, -10:], feat[:, -10:])


def test_short_and_bad_inputs():
    assert kaldi_fbank(torch.zeros(399)).shape == (0, 80)
    assert whisper_log_mel(torch.zeros(100)).shape == (128, 0)
    with pytest.raises(ValueError, match="mono"):
        kaldi_fbank(torch.zeros(2, 16000))
    with pytest.raises(ValueError, match="floating-point"):
        whisper_log_mel(torch.zeros(16000, dtype=torch.int16))
    with pytest.raises(ValueError, match="reflect padding"):
        mel_spectrogram(torch.zeros(100))


def test_silence_hits_the_documented_floors():
    z = torch.zeros(24000)
    assert torch.allclose(mel_spectrogram(z), torch.full((80, 50), math.log(1e-5)))
    fb = kaldi_fbank(torch.zeros(16000))
    assert torch.allclose(fb, torch.full_like(fb, math.log(torch.finfo(torch.float32).eps)))


def test_non_contiguous_views_give_the_same_features():
    stereo = torch.randn(16000, 2) * 0.1  # (N, C) as soundfile returns it; [:, 0] is a strided view
    left = stereo[:, 0]
    assert not left.is_contiguous()
    assert torch.equal(kaldi_fbank(left), kaldi_fbank(left.contiguous()))
    assert torch.equal(whisper_log_mel(left), whisper_log_mel(left.contiguous()))

"""Windowed-sinc resampler: lengths, identities, band-limiting, batching (golden parity is in
test_features_golden.py)."""

from __future__ import annotations

import math

import pytest
import torch

from cosytune.audio.resample import resample, resampled_length, sinc_resample_kernel


@pytest.mark.parametrize("n,orig,new", [(67263, 16000, 24000), (181472, 44100, 16000), (1, 24000, 16000),
                                        (100000, 48000, 24000), (999, 22050, 16000)])
def test_length_is_ceil(n, orig, new):
    assert resampled_length(n, orig, new) == math.ceil(n * new / orig)
    assert resample(torch.zeros(n), orig, new).shape[-1] == resampled_length(n, orig, new)


def test_same_rate_is_identity():
    x = torch.randn(1000)
    assert resample(x, 16000, 16000) is x


def test_sine_is_preserved_and_band_limited():
    sr_in, sr_out, f = 16000, 24000, 440.0
    t_in = torch.arange(sr_in, dtype=torch.float64) / sr_in
    y = resample(torch.sin(2 * math.pi * f * t_in).float(), sr_in, sr_out)
    t_out = torch.arange(y.numel(), dtype=torch.float64) / sr_out
    ref = torch.sin(2 * math.pi * f * t_out).float()
    mid = slice(200, -200)  # edges see zero padding
    assert (y[mid] - ref[mid]).abs().max() < 2e-3
    # A tone above the new Nyquist (8 kHz for 24k -> 16k) must be removed.
    t = torch.arange(24000, dtype=torch.float64) / 24000
    hi = resample(torch.sin(2 * math.pi * 10000 * t).float(), 24000, 16000)
    assert hi[200:-200].abs().max() < 1e-2


def test_leading_dims_are_independent():
    x = torch.randn(2, 3, 4000)
    y = resample(x, 16000, 24000)
    assert y.shape == (2, 3, 6000)
    assert torch.allclose(y[1, 2], resample(x[1, 2], 16000, 24000), atol=1e-6, rtol=0)


def test_kernel_reduces_rates_and_errors():
    k, width, orig, new = sinc_resample_kernel(44100, 16000)
    assert (orig, new) == (441, 160) and k.shape == (160, 1, 2 * width + orig) and k.dtype == torch.float32
    with pytest.raises(ValueError, match="positive integers"):
        resample(torch.zeros(10), 0, 16000)
    with pytest.raises(ValueError, match="floating-point"):
        resample(torch.zeros(10, dtype=torch.int32), 8000, 16000)

"""Band-limited (windowed-sinc) resampling with the numerics upstream CosyVoice depends on.

Upstream resamples every prompt and training clip with ``torchaudio.transforms.Resample(orig, new)``
at its defaults (``sinc_interp_hann``, ``lowpass_filter_width=6``, ``rolloff=0.99``), see
``FunAudioLLM/CosyVoice:cosyvoice/cli/file_utils.py`` ``load_wav`` and
``cosyvoice/dataset/processor.py`` ``resample``. torchaudio does not install beside current torch, so
this module implements the same polyphase windowed-sinc filter in plain torch. It is checked against
the golden ``load_wav_16k`` / ``load_wav_24k`` tensors (within 1e-6).

Algorithm (after dividing both rates by their gcd, so ``orig`` input samples map to ``new`` output
samples):

* cutoff ``base = min(orig, new) * rolloff`` (in units of the reduced rates);
* half-width in input samples ``width = ceil(lowpass_filter_width * orig / base)``;
* output phase ``k`` (0 <= k < new) uses taps at input offsets ``j/orig - k/new`` for
  ``j in [-width, width + orig)``, scaled by ``base`` and clamped to +-lowpass_filter_width zero
  crossings; tap value ``sinc(pi * t) * cos(pi * t / (2 * lowpass_filter_width))**2 * base / orig``;
* the kernel is built in float64 and stored in float32 (torchaudio's default);
* the signal is zero-padded by ``width`` on the left and ``width + orig`` on the right, filtered by a
  strided conv1d (stride ``orig``), the ``new`` phases are interleaved, and the result is cut to
  ``ceil(new * N / orig)`` samples.

Shape legend: ``B`` independent signals (channels or batch), ``N`` input samples, ``M`` output samples.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resample", "resampled_length", "sinc_resample_kernel"]

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99


@functools.lru_cache(maxsize=32)
def _kernel_numpy(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[np.ndarray, int]:
    """Float32 polyphase kernel (new, 1, 2*width + orig) for reduced rates, and ``width``.

    Memoised on every argument (a pure function of them), so repeated calls with one rate pair are free.
    """
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    # Offsets of each tap (in input-sample units, relative to the output sample), float64 as upstream.
    taps = np.arange(-width, width + orig, dtype=np.float64) / orig  # (K,)
    # torchaudio computes the output phases in float32 before adding the float64 taps; keep that.
    phases = (-np.arange(new, dtype=np.float32) / np.float32(new)).astype(np.float64)  # (new,)
    t = (phases[:, None] + taps[None, :]) * base  # (new, K)
    t = np.clip(t, -lowpass_filter_width, lowpass_filter_width)
    window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(t) / t)
    kernel = sinc * window * (base / orig)
    return kernel.astype(np.float32)[:, None, :], width


def sinc_resample_kernel(
    orig_sr: int, new_sr: int, *, lowpass_filter_width: int = LOWPASS_FILTER_WIDTH, rolloff: float = ROLLOFF
) -> tuple[torch.Tensor, int, int, int]:
    """Build the polyphase filter for ``orig_sr -> new_sr``.

    Args:
        orig_sr: input sample rate in Hz (positive integer).
        new_sr: output sample rate in Hz (positive integer).
        lowpass_filter_width: number of sinc zero crossings on each side.
        rolloff: cutoff as a fraction of the lower Nyquist frequency.

    Returns:
        ``(kernel (new, 1, K) float32, width, orig, new)`` where ``orig``/``new`` are the rates
        divided by their gcd.
    """
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _kernel_numpy(orig, new, int(lowpass_filter_width), float(rolloff))
    return torch.from_numpy(kernel.copy()), width, orig, new


def resampled_length(num_samples: int, orig_sr: int, new_sr: int) -> int:
    """Number of samples :func:`resample` returns for ``num_samples`` input samples."""
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    return -(-new * int(num_samples) // orig)  # ceil without float rounding


def resample(
    waveform: torch.Tensor,
    orig_sr: int,
    new_sr: int,
    *,
    lowpass_filter_width: int = LOWPASS_FILTER_WIDTH,
    rolloff: float = ROLLOFF,
) -> torch.Tensor:
    """Resample along the last axis with torchaudio-default windowed-sinc interpolation.

    Args:
        waveform: ``(..., N)`` float tensor (any leading shape; each row is filtered independently).
        orig_sr: input sample rate in Hz.
        new_sr: output sample rate in Hz.
        lowpass_filter_width: sinc zero crossings per side (torchaudio default 6).
        rolloff: cutoff as a fraction of the lower Nyquist (torchaudio default 0.99).

    Returns:
        ``(..., M)`` tensor with ``M = ceil(N * new_sr / orig_sr)``, same dtype and device as the input.
        When the rates are equal the input is returned unchanged.

    Raises:
        ValueError: if a rate is not a positive integer or the input is not floating point.
    """
    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive integers; got orig_sr={orig_sr!r}, new_sr={new_sr!r}")
    if not waveform.is_floating_point():
        raise ValueError(f"resample expects a floating-point waveform; got dtype {waveform.dtype}")
    if orig_sr == new_sr:
        return waveform
    kernel, width, orig, new = sinc_resample_kernel(
        orig_sr, new_sr, lowpass_filter_width=lowpass_filter_width, rolloff=rolloff
    )
    lead_shape = waveform.shape[:-1]
    n = waveform.shape[-1]
    x = waveform.reshape(-1, n)  # (B, N)
    x = F.pad(x, (width, width + orig))
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    y = F.conv1d(x[:, None, :], kernel, stride=orig)  # (B, new, frames): one row per output phase
    y = y.transpose(1, 2).reshape(x.shape[0], -1)  # interleave phases -> (B, new * frames)
    y = y[:, : resampled_length(n, orig, new)]
    return y.reshape(*lead_shape, y.shape[-1])

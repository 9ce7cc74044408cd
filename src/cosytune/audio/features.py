"""Audio front-end features of CosyVoice 3, written in plain torch (no torchaudio, no openai-whisper).

Three features feed the three consumers of a waveform:

* :func:`kaldi_fbank` — 80-bin Kaldi log-mel filterbank at 16 kHz, the CAM++ speaker-embedding input
  (upstream ``torchaudio.compliance.kaldi.fbank(wav16k, num_mel_bins=80, dither=0,
  sample_frequency=16000)``, then :func:`cmn` subtracts the time mean;
  ``FunAudioLLM/CosyVoice:cosyvoice/cli/frontend.py`` ``_extract_spk_embedding``,
  ``tools/extract_embedding.py``). Kaldi defaults: 25 ms povey window, 10 ms shift, pre-emphasis 0.97,
  DC removal, 512-point FFT, power spectrum, snip_edges, low_freq 20 Hz, high_freq Nyquist, log floor
  float32 eps.
* :func:`whisper_log_mel` — 128-bin Whisper log-mel at 16 kHz, the speech-tokenizer input
  (openai-whisper ``log_mel_spectrogram(wav16k, n_mels=128)``; ``_extract_speech_token``,
  ``tools/extract_speech_token.py``): centred reflect-padded STFT (400/160, periodic Hann), last frame
  dropped, power → slaney mel → ``log10(max(x, 1e-10))`` → floor at ``max − 8`` → ``(x + 4) / 4``.
* :func:`mel_spectrogram` — the 80-bin 24 kHz mel of the flow and of training
  (``matcha.utils.audio.mel_spectrogram`` with n_fft 1920, hop 480, win 1920, fmin 0, fmax None,
  center False): reflect-pad by ``(n_fft − hop)/2`` per side, magnitude ``sqrt(re² + im² + 1e-9)``,
  slaney mel, ``ln(max(x, 1e-5))``.

All three take one mono waveform ``(N,)`` (float, in [-1, 1], no int16 scaling) and return a 2-D float32
tensor on the input's device. They are pure functions; the filterbanks are memoised on *all* of their
parameters (unlike Matcha, whose cache keyed only on ``fmax`` silently reused a wrong basis).

Shape legend: ``N`` samples, ``T`` frames, ``F`` mel bins.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MEL24K_HOP",
    "MEL24K_N_FFT",
    "WHISPER_HOP",
    "WHISPER_N_FFT",
    "cmn",
    "kaldi_fbank",
    "kaldi_mel_banks",
    "mel_spectrogram",
    "slaney_mel_filterbank",
    "whisper_log_mel",
]

# Whisper log-mel (speech tokenizer input, 16 kHz).
WHISPER_SAMPLE_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160
# Matcha mel (flow / training target, 24 kHz).
MEL24K_SAMPLE_RATE = 24000
MEL24K_N_FFT = 1920
MEL24K_HOP = 480
MEL24K_WIN = 1920
MEL24K_N_MELS = 80


def _check_wave(waveform: torch.Tensor, name: str) -> torch.Tensor:
    """Accept ``(N,)`` or ``(1, N)``; return ``(N,)`` float32-or-wider."""
    if waveform.dim() == 2 and waveform.shape[0] == 1:
        waveform = waveform[0]
    if waveform.dim() != 1:
        raise ValueError(f"{name} expects one mono waveform of shape (N,) or (1, N); got {tuple(waveform.shape)}")
    if not waveform.is_floating_point():
        raise ValueError(f"{name} expects a floating-point waveform in [-1, 1]; got dtype {waveform.dtype}")
    return waveform


# ----------------------------------------------------------------------------------------------
# Mel filterbanks
# ----------------------------------------------------------------------------------------------


# Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above (librosa htk=False).
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    log_part = _MIN_LOG_MEL + np.log(np.maximum(f, 1e-12) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log_part, f / _F_SP)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)), _F_SP * m)


@functools.lru_cache(maxsize=16)
def _slaney_mel_numpy(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    n_bins = 1 + n_fft // 2
    fft_freqs = np.linspace(0, sample_rate / 2, n_bins)  # float64, as librosa's fft_frequencies
    mel_edges = _mel_to_hz_slaney(
        np.linspace(_hz_to_mel_slaney(np.array(fmin)), _hz_to_mel_slaney(np.array(fmax)), n_mels + 2)
    )
    widths = np.diff(mel_edges)  # (n_mels + 1,)
    ramps = mel_edges[:, None] - fft_freqs[None, :]  # (n_mels + 2, n_bins)
    # Triangles are evaluated in float64 but stored in float32, then area-normalised in place; this
    # reproduces librosa's (and hence Whisper's stored mel_filters.npz) rounding exactly.
    weights = np.zeros((n_mels, n_bins), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / widths[i]
        upper = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_edges[2 : n_mels + 2] - mel_edges[:n_mels])
    weights *= enorm[:, None]
    return weights


def slaney_mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> torch.Tensor:
    """Slaney-scale, slaney-normalised mel filterbank (``librosa.filters.mel`` defaults).

    Args:
        sample_rate: audio sample rate in Hz.
        n_fft: FFT size; the bank covers ``n_fft // 2 + 1`` bins.
        n_mels: number of mel bands.
        fmin: lowest edge in Hz.
        fmax: highest edge in Hz; ``None`` means Nyquist.

    Returns:
        ``(n_mels, n_fft // 2 + 1)`` float32 tensor (CPU).
    """
    fmax = sample_rate / 2 if fmax is None else float(fmax)
    return torch.from_numpy(_slaney_mel_numpy(int(sample_rate), int(n_fft), int(n_mels), float(fmin), fmax).copy())


def _kaldi_mel(f: torch.Tensor) -> torch.Tensor:
    return 1127.0 * (1.0 + f / 700.0).log()


@functools.lru_cache(maxsize=8)
def _kaldi_mel_banks_cached(num_bins: int, padded_window: int, sample_rate: float, low_freq: float, high_freq: float):
    num_fft_bins = padded_window // 2
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    fft_bin_width = sample_rate / padded_window
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    # Float32 throughout, as Kaldi-compat torch code computes it (the golden fbank comes from there).
    b = torch.arange(num_bins, dtype=torch.float32)[:, None]
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _kaldi_mel(fft_bin_width * torch.arange(num_fft_bins, dtype=torch.float32))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # (num_bins, num_fft_bins)
    # The FFT has num_fft_bins + 1 bins; the Nyquist bin gets weight 0.
    return F.pad(banks, (0, 1)).numpy()


def kaldi_mel_banks(
    num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0, high_freq: float = 0.0
) -> torch.Tensor:
    """Kaldi triangular mel banks (mel = 1127 ln(1 + f/700), no VTLN warp, no area normalisation).

    Args:
        num_bins: number of mel bins.
        padded_window: FFT size.
        sample_rate: sample rate in Hz.
        low_freq: low edge in Hz.
        high_freq: high edge in Hz; ``<= 0`` is an offset from Nyquist (Kaldi convention).

    Returns:
        ``(num_bins, padded_window // 2 + 1)`` float32 tensor.
    """
    return torch.from_numpy(
        _kaldi_mel_banks_cached(int(num_bins), int(padded_window), float(sample_rate), float(low_freq), float(high_freq)).copy()
    )


# ----------------------------------------------------------------------------------------------
# Kaldi fbank (CAM++ input)
# ----------------------------------------------------------------------------------------------


def kaldi_fbank(
    waveform: torch.Tensor,
    *,
    sample_rate: int = 16000,
    num_mel_bins: int = 80,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> torch.Tensor:
    """Kaldi log-mel filterbank with upstream's settings (dither 0, povey window, snip_edges).

    Args:
        waveform: ``(N,)`` (or ``(1, N)``) float waveform in [-1, 1].
        sample_rate: sample rate in Hz (upstream: 16000).
        num_mel_bins: mel bins (upstream: 80).
        frame_length_ms: window length in ms.
        frame_shift_ms: hop in ms.
        preemphasis: pre-emphasis coefficient.
        low_freq: lowest mel edge in Hz.
        high_freq: highest mel edge in Hz (``<= 0``: offset from Nyquist).

    Returns:
        ``(T, num_mel_bins)`` float32 with ``T = 1 + (N - win) // shift`` (0 frames when ``N < win``).
    """
    # as_strided below reads raw storage, so the samples must be contiguous (a channel view is not).
    x = _check_wave(waveform, "kaldi_fbank").to(torch.float32).contiguous()
    win = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    padded = 1 << (win - 1).bit_length()  # round_to_power_of_two
    n = x.shape[0]
    if n < win:
        return torch.zeros(0, num_mel_bins, dtype=torch.float32, device=x.device)
    num_frames = 1 + (n - win) // shift
    frames = x.as_strided((num_frames, win), (shift, 1))  # (T, win)
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove_dc_offset
    # Pre-emphasis with the first sample replicated as its own predecessor (Kaldi).
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - preemphasis * prev
    window = torch.hann_window(win, periodic=False, dtype=torch.float32, device=x.device).pow(0.85)  # povey
    frames = F.pad(frames * window, (0, padded - win))  # (T, padded)
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (T, padded/2 + 1)
    banks = kaldi_mel_banks(num_mel_bins, padded, sample_rate, low_freq, high_freq).to(x.device)
    mel = power @ banks.T  # (T, F)
    eps = torch.finfo(torch.float32).eps
    return torch.clamp(mel, min=eps).log()


def cmn(feat: torch.Tensor) -> torch.Tensor:
    """Cepstral mean normalisation over time: ``feat − mean_t(feat)`` for ``(T, F)`` features."""
    return feat - feat.mean(dim=0, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Whisper log-mel (speech tokenizer input)
# ----------------------------------------------------------------------------------------------


def whisper_log_mel(waveform: torch.Tensor, *, n_mels: int = 128) -> torch.Tensor:
    """Whisper's log-mel spectrogram of a 16 kHz waveform.

    The ``max − 8`` floor uses the maximum of *this* utterance; batching several utterances into one
    call (as openai-whisper allows) would change it, so callers batch only after this step.

    Args:
        waveform: ``(N,)`` (or ``(1, N)``) float waveform at 16 kHz.
        n_mels: mel bins (speech_tokenizer_v3: 128).

    Returns:
        ``(n_mels, N // 160)`` float32.
    """
    x = _check_wave(waveform, "whisper_log_mel").to(torch.float32)
    window = torch.hann_window(WHISPER_N_FFT, dtype=torch.float32, device=x.device)
    if x.shape[0] <= WHISPER_N_FFT // 2:
        # Reflect padding needs more samples than the pad; such clips have no full token anyway.
        return torch.zeros(n_mels, x.shape[0] // WHISPER_HOP, dtype=torch.float32, device=x.device)
    spec = torch.stft(x, WHISPER_N_FFT, WHISPER_HOP, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # (201, N // 160 + 1)
    power = spec[:, :-1].abs() ** 2  # Whisper drops the last frame
    filters = slaney_mel_filterbank(WHISPER_SAMPLE_RATE, WHISPER_N_FFT, n_mels).to(x.device)
    mel = filters @ power  # (F, T)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# ----------------------------------------------------------------------------------------------
# 24 kHz mel (flow conditioning / training target)
# ----------------------------------------------------------------------------------------------


def mel_spectrogram(
    waveform: torch.Tensor,
    *,
    sample_rate: int = MEL24K_SAMPLE_RATE,
    n_fft: int = MEL24K_N_FFT,
    hop_length: int = MEL24K_HOP,
    win_length: int = MEL24K_WIN,
    n_mels: int = MEL24K_N_MELS,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> torch.Tensor:
    """Matcha-TTS log-mel spectrogram with CosyVoice 3's ``feat_extractor`` settings.

    Values above 1 in magnitude are not clipped (Matcha only warns); callers normalise peaks first.

    Args:
        waveform: ``(N,)`` (or ``(1, N)``) float waveform at ``sample_rate``.
        sample_rate: sample rate in Hz (24000).
        n_fft: FFT size (1920).
        hop_length: hop in samples (480).
        win_length: Hann window length (1920).
        n_mels: mel bins (80).
        fmin: lowest mel edge in Hz (0).
        fmax: highest mel edge in Hz (``None`` = Nyquist, 12 kHz).

    Returns:
        ``(n_mels, N // hop_length)`` float32 (natural log, floor ``ln 1e-5``).
    """
    x = _check_wave(waveform, "mel_spectrogram").to(torch.float32)
    pad = (n_fft - hop_length) // 2
    if x.shape[0] <= pad:
        raise ValueError(
            f"mel_spectrogram needs more than {pad} samples ({pad / sample_rate:.3f} s) for its reflect padding; "
            f"got {x.shape[0]}"
        )
    x = F.pad(x[None, None], (pad, pad), mode="reflect")[0, 0]
    window = torch.hann_window(win_length, dtype=torch.float32, device=x.device)
    spec = torch.stft(x, n_fft, hop_length, win_length, window=window, center=False, normalized=False,
                      onesided=True, return_complex=True)  # (n_fft/2 + 1, T)
    spec = torch.view_as_real(spec)
    mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    basis = slaney_mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).to(x.device)
    mel = basis @ mag  # (F, T)
    return torch.clamp(mel, min=1e-5).log()

"""Silence trimming: sox ``silence`` equivalence, quantitative lengths, the over-trim rule."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
from audio_media import sample_speech, tone

from cosytune.audio.trim import (
    _above,
    _first_run_start,
    running_rms,
    sox_silence_start,
    sox_window_size,
    trim_silence,
    trim_with_overtrim_rule,
)

SR = 24000
# Tolerance of the quantitative test: the 20 ms RMS window crosses -35 dBFS within a few samples
# of a -13 dBFS tone's onset, so 1 ms (24 samples) per edge is generous but meaningful.
EDGE_TOL_S = 0.001


def _noise_floor(n: int, db: float, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32) * np.float32(10 ** (db / 20))


def _sox_reference(
    signal: np.ndarray, sample_rate: int, threshold_db: float, duration_s: float
) -> int | None:
    """sox 14.4 ``silence 1 D T`` (SILENCE_TRIM mode) written as its per-sample state machine.

    Input is treated as 16-bit (signal quantised to int16, scaled to sox's 32-bit samples), so the
    RMS is masked to 16 bits as sox does for a 16-bit input. Returns the first output sample.
    """
    window = int(sample_rate // 50)
    ring = np.zeros(window)
    pos = 0
    rms_sum = 0.0
    needed = round(duration_s * sample_rate)
    held = 0
    samples = np.clip(np.rint(signal * 32768), -32768, 32767).astype(np.int64) * 65536
    for i, s in enumerate(samples):
        new_sum = rms_sum - ring[pos] + float(s) * float(s)
        rms = int(math.sqrt(max(new_sum, 0.0) / window))  # C cast to sox_sample_t truncates
        masked = rms & ~0xFFFF
        level = masked / (2**31 - 1)
        above = level > 0 and 20 * math.log10(level) > threshold_db
        rms_sum -= ring[pos]
        ring[pos] = float(s) * float(s)
        rms_sum += ring[pos]
        pos = (pos + 1) % window
        if above:
            held += 1
            if held >= needed:
                return i - held + 1
        else:
            held = 0
    return None


def _bursty_signal(seed: int, sample_rate: int) -> np.ndarray:
    """Noise bursts whose level hovers around the thresholds, some shorter than D."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(14):
        length = int(rng.uniform(0.02, 0.25) * sample_rate)
        amp = 10 ** (rng.uniform(-60, -28) / 20)
        parts.append((rng.standard_normal(length) * amp).astype(np.float32))
    signal = np.concatenate(parts)
    return (np.rint(signal * 32768) / 32768).astype(np.float32)  # exactly representable as 16-bit


def test_vectorised_rule_matches_sox_state_machine():
    sr = 8000
    outcomes = []
    for seed in range(6):
        signal = _bursty_signal(seed, sr)
        for thr, dur in [(-35.0, 0.15), (-40.0, 0.05), (-30.0, 0.1), (-45.0, 0.2)]:
            for x in (signal, signal[::-1].copy()):
                expected = _sox_reference(x, sr, thr, dur)
                assert sox_silence_start(x, sr, thr, dur) == expected, (seed, thr, dur)
                outcomes.append(expected)
    # The cases must exercise the interesting paths: no run at all, and runs found deep inside
    # after shorter runs were discarded.
    assert any(o is None for o in outcomes)
    assert sum(1 for o in outcomes if o is not None and o > 0.3 * sr) >= 5


def test_prefix_search_equals_whole_signal_search():
    # sox_silence_start looks at growing prefixes; the answer must equal a whole-signal pass,
    # including runs that straddle a prefix boundary.
    rng = np.random.default_rng(3)
    for lead_s in (0.0, 0.97, 3.9, 17.3, 70.0):
        lead = (rng.standard_normal(int(lead_s * SR)) * 10 ** (-50 / 20)).astype(np.float32)
        # A short burst (discarded) right before the real start.
        signal = np.concatenate(
            [
                lead,
                tone(0.1, SR, 300.0, 0.3),
                np.zeros(SR // 10, np.float32),
                tone(2.0, SR, 300.0, 0.3),
                np.zeros(SR, np.float32),
            ]
        )
        whole = _first_run_start(_above(running_rms(signal, 480), -35.0, 16), 3600)
        assert sox_silence_start(signal, SR) == whole
        assert abs(whole - len(lead) - int(0.2 * SR)) < 24


def test_known_silence_lengths_are_removed():
    rng = np.random.default_rng(0)
    lead_s, body_s, tail_s = 0.7, 2.0, 1.1
    body = tone(body_s, SR, 300.0, 0.3)
    signal = np.concatenate(
        [np.zeros(int(lead_s * SR), np.float32), body, np.zeros(int(tail_s * SR), np.float32)]
    )
    signal = signal + _noise_floor(len(signal), -65.0, rng)
    res = trim_silence(signal, SR)
    assert abs(res.start / SR - lead_s) <= EDGE_TOL_S
    assert abs((len(signal) - res.end) / SR - tail_s) <= EDGE_TOL_S
    assert abs((res.end - res.start) / SR - body_s) <= 2 * EDGE_TOL_S
    assert not res.untrimmed_overtrim


@pytest.mark.parametrize("lead_s,tail_s", [(0.5, 0.8), (1.3, 0.2)])
def test_real_speech_padding_is_removed(sample_speaker_dir, lead_s, tail_s):
    import soxr

    speech, rate = sample_speech(sample_speaker_dir, ("demo-thanks.mp3",))
    speech = soxr.resample(speech, rate, SR).astype(np.float32)
    ref = trim_silence(speech, SR)
    padded = np.concatenate(
        [np.zeros(int(lead_s * SR), np.float32), speech, np.zeros(int(tail_s * SR), np.float32)]
    )
    res = trim_silence(padded, SR)
    lead = int(lead_s * SR)
    # Added digital silence goes, and the speech's own edges are found where they were.
    assert abs(res.start - lead - ref.start) <= EDGE_TOL_S * SR
    assert abs(res.end - lead - ref.end) <= EDGE_TOL_S * SR
    assert (res.end - res.start) / SR > 1.0


def test_run_shorter_than_duration_is_discarded():
    click = tone(0.1, SR, 500.0, 0.5)  # 0.1 s < 0.15 s: sox discards it
    gap = np.zeros(int(0.3 * SR), np.float32)
    body = tone(1.0, SR, 500.0, 0.5)
    signal = np.concatenate([gap, click, gap, body, gap])
    start = sox_silence_start(signal, SR, -35.0, 0.15)
    body_at = len(gap) * 2 + len(click)
    assert body_at <= start <= body_at + 24
    # With a shorter required run the click counts.
    assert sox_silence_start(signal, SR, -35.0, 0.05) <= len(gap) + 24


def test_threshold_and_window_edges():
    quiet = tone(1.0, SR, 440.0, 10 ** (-37 / 20))  # RMS about -40 dBFS
    assert sox_silence_start(quiet, SR, -35.0, 0.15) is None
    assert sox_silence_start(quiet, SR, -45.0, 0.15) is not None
    # Sound from sample 0: the zero-filled window delays detection by only a few samples.
    loud = tone(1.0, SR, 440.0, 0.5)
    assert sox_silence_start(loud, SR, -35.0, 0.15) < sox_window_size(SR)
    assert sox_window_size(SR) == 480 and sox_window_size(22050) == 441
    np.testing.assert_allclose(running_rms(np.ones(1000), 100)[99:], 1.0)


def test_all_silence_is_empty():
    res = trim_with_overtrim_rule(np.zeros(SR * 3, np.float32), SR)
    assert not res.found_sound and res.start == res.end and not res.untrimmed_overtrim


def test_overtrim_rule_keeps_clip_untrimmed():
    # 3 s clip with 1 s of sound: trimming would leave 1 s < 1.5 s, so it stays whole.
    sil = np.zeros(SR, np.float32)
    clip = np.concatenate([sil, tone(1.0, SR, 300.0, 0.3), sil])
    res = trim_with_overtrim_rule(clip, SR)
    assert res.untrimmed_overtrim and (res.start, res.end) == (0, len(clip))
    assert abs((res.sox_end - res.sox_start) / SR - 1.0) < 0.002
    # A clip not longer than 1.5 s is trimmed normally.
    short = np.concatenate([sil[: SR // 4], tone(0.8, SR, 300.0, 0.3), sil[: SR // 4]])
    res = trim_with_overtrim_rule(short, SR)
    assert not res.untrimmed_overtrim and abs((res.end - res.start) / SR - 0.8) < 0.002
    # Trimmed result of at least 1.5 s: trimmed normally.
    long = np.concatenate([sil, tone(2.0, SR, 300.0, 0.3), sil])
    res = trim_with_overtrim_rule(long, SR)
    assert not res.untrimmed_overtrim and abs((res.end - res.start) / SR - 2.0) < 0.002


@pytest.mark.skipif(
    shutil.which("sox") is None, reason="the sox binary is not installed (apt-get install sox)"
)
def test_bit_identical_to_real_sox(tmp_path, sample_speaker_dir):
    """Parity with SoX itself, when installed: same kept samples as the seed's exact command."""
    import soundfile as sf
    import soxr

    rng = np.random.default_rng(1)
    cases = []
    for name in ("demo-thanks.mp3", "vm-intro.mp3", "privacy-prompt.mp3"):
        x, rate = sample_speech(sample_speaker_dir, (name,))
        x = soxr.resample(x, rate, SR).astype(np.float32)
        lead, tail = (np.zeros(int(rng.uniform(0, 1) * SR), np.float32) for _ in range(2))
        padded = np.concatenate([lead, x, tail])
        cases.append(padded + _noise_floor(len(padded), -60.0, rng))
    cases += [_bursty_signal(seed, SR) for seed in range(3)]
    for x in cases:
        pcm = np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)
        src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
        sf.write(str(src), pcm, SR, subtype="PCM_16")
        cmd = [
            "sox",
            str(src),
            str(dst),
            "silence",
            "1",
            "0.15",
            "-35d",
            "reverse",
            "silence",
            "1",
            "0.15",
            "-35d",
            "reverse",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        expected, _ = sf.read(str(dst), dtype="int16")
        res = trim_silence(pcm.astype(np.float32) / 32768, SR)
        np.testing.assert_array_equal(pcm[res.start : res.end], expected)

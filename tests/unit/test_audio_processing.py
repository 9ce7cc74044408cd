"""Slicing long recordings at pauses, loudness normalisation, peak ceiling, clipping detection."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from audio_media import sample_speech, tone

from cosytune.audio.loudness import apply_gain_and_ceiling, clipping_fraction, measure_lufs, peak_dbfs
from cosytune.audio.slicing import find_pauses, frame_levels_db, slice_at_pauses

SR = 16000
CLIPS = (
    "demo-thanks.mp3",
    "agent-alreadyon.mp3",
    "conf-getchannel.mp3",
    "vm-intro.mp3",
    "privacy-prompt.mp3",
    "queue-periodic-announce.mp3",
    "dir-instr.mp3",
    "demo-moreinfo.mp3",
    "tt-allbusy.mp3",
    "agent-incorrect.mp3",
    "conf-onlyone.mp3",
    "invalid.mp3",
)


@pytest.fixture(scope="module")
def long_speech(sample_speaker_dir):
    x, rate = sample_speech(sample_speaker_dir, CLIPS)
    assert rate == SR
    return x


def test_long_speech_is_sliced_at_pauses(long_speech):
    x = long_speech
    assert len(x) / SR > 45
    segs = slice_at_pauses(x, SR, max_s=30.0, min_s=3.0, target_s=15.0)
    assert len(segs) >= 3
    # The segments tile the input: nothing is lost, nothing overlaps.
    assert segs[0].start == 0 and segs[-1].end == len(x)
    assert all(a.end == b.start for a, b in itertools.pairwise(segs))
    assert all(s.num_samples <= 30 * SR for s in segs)
    assert all(s.num_samples >= 3 * SR for s in segs)
    assert not any(s.forced for s in segs)
    # Every cut lies inside a pause: 50 ms around it is quiet.
    for s in segs[:-1]:
        around = x[s.end - SR // 20 : s.end + SR // 20]
        assert np.sqrt(np.mean(around.astype(np.float64) ** 2)) < 10 ** (-35 / 20)
    # The joined pauses between shipped clips are found.
    assert len(find_pauses(x, SR, -35.0, 0.3)) >= len(CLIPS) - 1


def test_target_length_controls_grouping(long_speech):
    short = slice_at_pauses(long_speech, SR, max_s=30.0, min_s=2.0, target_s=6.0)
    long = slice_at_pauses(long_speech, SR, max_s=30.0, min_s=2.0, target_s=25.0)
    assert len(short) > len(long)


def test_no_pause_forces_cuts_at_quietest_point():
    x = tone(70.0, SR, 220.0, 0.3)
    # A slight dip at 20 s: the quietest point inside [3 s, 30 s].
    x[20 * SR : 20 * SR + 800] *= 0.1
    segs = slice_at_pauses(x, SR, max_s=30.0, min_s=3.0, target_s=15.0)
    assert all(s.num_samples <= 30 * SR for s in segs)
    assert segs[0].forced and abs(segs[0].end / SR - 20.0) < 0.06
    assert segs[-1].end == len(x)


def test_short_input_is_one_segment():
    x = tone(10.0, SR, 400.0)  # 8 whole periods per 20 ms frame
    segs = slice_at_pauses(x, SR, max_s=30.0)
    assert [(s.start, s.end, s.forced) for s in segs] == [(0, len(x), False)]
    levels, hop, win = frame_levels_db(x, SR)
    assert hop == 160 and win == 320 and np.allclose(levels, 20 * np.log10(0.5 / np.sqrt(2)), atol=0.05)


def test_lufs_of_reference_sine():
    # BS.1770: a full-scale 997 Hz sine on one channel reads -3.01 LUFS.
    x = tone(5.0, 48000, 997.0, 1.0)
    assert measure_lufs(x, 48000) == pytest.approx(-3.01, abs=0.05)
    assert measure_lufs(0.1 * x, 48000) == pytest.approx(-23.01, abs=0.05)
    assert measure_lufs(x[:1000], 48000) is None  # shorter than one gating block
    assert measure_lufs(np.zeros(48000, np.float32), 48000) is None


def test_normalise_to_target_and_peak_ceiling(sample_speaker_dir):
    x, rate = sample_speech(sample_speaker_dir, ("vm-intro.mp3",))
    y, info = apply_gain_and_ceiling(0.05 * x, rate, target_lufs=-20.0, peak_ceiling_db=-1.0)
    assert info.lufs_in is not None and not info.ceiling_applied
    assert measure_lufs(y, rate) == pytest.approx(-20.0, abs=0.05)
    assert info.lufs_out == pytest.approx(-20.0, abs=1e-6)
    # A target that would push the peak above the ceiling stops at the ceiling.
    y, info = apply_gain_and_ceiling(x, rate, target_lufs=-5.0, peak_ceiling_db=-1.0)
    assert info.ceiling_applied and peak_dbfs(y) == pytest.approx(-1.0, abs=0.01)
    assert info.lufs_out < -5.0
    # No target: only the ceiling acts, and only when needed.
    loud = tone(1.0, SR, 300.0, 1.0)
    y, info = apply_gain_and_ceiling(loud, SR, None, -1.0)
    assert info.ceiling_applied and peak_dbfs(y) == pytest.approx(-1.0, abs=0.01) and info.lufs_in is None
    quiet = 0.1 * loud
    y, info = apply_gain_and_ceiling(quiet, SR, None, -1.0)
    assert not info.ceiling_applied and info.gain_db == 0.0 and np.array_equal(y, quiet)
    assert info.to_dict()["peak_db_in"] == pytest.approx(-20.0, abs=0.01)


def test_clipping_fraction():
    clean = tone(1.0, SR, 300.0, 0.9)
    assert clipping_fraction(clean) == 0.0
    clipped = np.clip(tone(1.0, SR, 300.0, 3.0), -1, 1)
    assert clipping_fraction(clipped) > 0.5
    stereo = np.stack([clean, clipped])
    assert clipping_fraction(stereo) == clipping_fraction(clipped)


@pytest.mark.parametrize(
    "rate,n", [(16000, 16000 * 3 + 77), (22050, 22050 * 2 + 219), (24000, 480 * 4096 + 5)]
)
def test_frame_levels_match_direct_computation(rate, n):
    x = np.random.default_rng(rate).standard_normal(n).astype(np.float32) * 0.1
    levels, hop, win = frame_levels_db(x, rate)
    assert win == 2 * hop and hop == round(0.01 * rate)
    direct = [np.mean(x[k * hop : k * hop + win].astype(np.float64) ** 2) for k in range(len(levels))]
    np.testing.assert_allclose(levels, 10 * np.log10(np.array(direct) + 1e-20), atol=1e-6)
    assert (len(levels) - 1) * hop < n <= (len(levels) + 1) * hop

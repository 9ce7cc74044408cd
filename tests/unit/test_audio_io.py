"""Decoding every supported kind of input (generated offline) and writing PCM16 wav."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
from audio_media import sample_speech, write_av, write_sf

from cosytune.audio.io import AudioDecodeError, load_audio, to_mono, to_pcm16, write_wav_pcm16


@pytest.fixture(scope="module")
def speech(sample_speaker_dir):
    return sample_speech(sample_speaker_dir, ("demo-thanks.mp3",))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


@pytest.mark.parametrize(
    "name,kw",
    [
        ("clip.wav", {"subtype": "PCM_16"}),
        ("clip.flac", {}),
        ("clip.ogg", {}),
        ("clip.mp3", {}),
    ],
)
def test_soundfile_formats(tmp_path, speech, name, kw):
    x, sr = speech
    path = write_sf(tmp_path / name, x, sr, **kw)
    audio, rate = load_audio(path)
    assert rate == sr and audio.dtype == np.float32 and audio.shape[0] == 1
    assert abs(audio.shape[1] - len(x)) < 0.1 * sr
    if name.endswith((".wav", ".flac")):
        np.testing.assert_allclose(audio[0], x, atol=1.0 / 32768 + 1e-6)


@pytest.mark.parametrize(
    "name,codec,rate",
    [
        ("clip.m4a", "aac", 16000),
        ("clip.opus", "libopus", 48000),
        ("clip.webm", "libopus", 48000),
        ("clip.mka", "flac", 16000),  # integer samples: the libswresample path
    ],
)
def test_ffmpeg_formats(tmp_path, speech, name, codec, rate):
    import soxr

    x, sr = speech
    x = soxr.resample(x, sr, rate).astype(np.float32)
    audio, got_rate = load_audio(write_av(tmp_path / name, x, rate, codec))
    assert got_rate == rate and audio.shape[0] == 1
    assert abs(audio.shape[1] - len(x)) < 0.1 * rate
    # Lossy codecs add a delay; the content is still clearly the same speech.
    lag = int(np.argmax(np.correlate(audio[0][: 2 * rate], x[:rate], mode="valid")))
    assert _corr(audio[0][lag:], x) > 0.9


def test_video_audio_track_stereo_44k(tmp_path, speech):
    import soxr

    x, sr = speech
    x = soxr.resample(x, sr, 44100).astype(np.float32)
    stereo = np.stack([x, 0.5 * x], axis=1)
    audio, rate = load_audio(write_av(tmp_path / "talk video.mp4", stereo, 44100, "aac", video=True))
    assert rate == 44100 and audio.shape[0] == 2
    assert abs(audio.shape[1] - len(x)) < 0.1 * 44100
    ratio = np.std(audio[1]) / np.std(audio[0])
    assert 0.45 < ratio < 0.55
    assert to_mono(audio).shape == (audio.shape[1],)


def test_unicode_path_with_spaces(tmp_path, speech):
    x, sr = speech
    path = write_sf(tmp_path / "数据集" / "my clip ü 1.mp3", x, sr)
    audio, rate = load_audio(path)
    assert rate == sr and audio.shape[1] > sr


def test_bad_inputs_have_reasons(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "corrupt.mp3").write_bytes(
        np.random.default_rng(0).integers(0, 256, 30000, np.uint8).tobytes()
    )
    (tmp_path / "notes.bin").write_bytes(b"just some text, not audio\n" * 50)
    write_sf(tmp_path / "header_only.wav", np.zeros(0, np.float32), 16000)
    img = tmp_path / "picture.png"
    import av

    with av.open(str(img), "w", format="image2") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 8, 8, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), np.uint8), format="rgb24")):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    expected = {
        "empty.wav": "zero_length",
        "corrupt.mp3": "unreadable",
        "notes.bin": "not_audio",
        "header_only.wav": "zero_length",
        "picture.png": "not_audio",
    }
    for name, reason in expected.items():
        with pytest.raises(AudioDecodeError) as info:
            load_audio(tmp_path / name)
        assert info.value.reason == reason, (name, info.value)
        assert info.value.detail


def test_write_wav_pcm16_roundtrip_and_atomic(tmp_path):
    x = np.array([0.0, 0.5, -0.5, 1.2, -1.5, 1 / 32768], np.float32)
    out = tmp_path / "sub" / "x.wav"
    write_wav_pcm16(out, x, 24000)
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (24000, 1, "PCM_16", "WAV")
    y, _ = sf.read(str(out), dtype="int16")
    np.testing.assert_array_equal(y, [0, 16384, -16384, 32767, -32768, 1])
    np.testing.assert_array_equal(to_pcm16(x), y)
    assert sorted(os.listdir(out.parent)) == ["x.wav"]  # no temporary left behind

    # A failure while writing leaves neither a final file nor a temporary.
    bad = tmp_path / "bad" / "y.wav"
    with pytest.raises(ValueError):
        write_wav_pcm16(bad, np.zeros((2, 2, 2), np.float32), 24000)
    assert not bad.exists() and os.listdir(bad.parent) == []


@pytest.mark.parametrize("name,codec", [("long.wav", None), ("long.m4a", "aac"), ("long.mka", "flac")])
def test_load_mono_matches_load_audio(tmp_path, speech, name, codec):
    from cosytune.audio.io import load_mono
    from cosytune.audio.loudness import clipping_fraction

    x, sr = speech
    # Several decode chunks long, stereo, with a clipped stretch on the right channel only.
    left = np.tile(x, 4)
    right = 0.5 * left
    right[sr : 2 * sr] = np.clip(right[sr : 2 * sr] * 40, -1, 1)
    stereo = np.stack([left, right], axis=1)
    path = (
        write_sf(tmp_path / name, stereo, sr)
        if codec is None
        else write_av(tmp_path / name, stereo, sr, codec)
    )
    audio, rate = load_audio(path)
    mono = load_mono(path, clip_level=0.95)
    assert audio.shape[1] > 65536 * 2 and mono.channels == 2 and mono.sample_rate == rate
    np.testing.assert_allclose(mono.samples, to_mono(audio), atol=1e-6)
    assert mono.clipped_fraction == pytest.approx(clipping_fraction(audio, 0.95))
    assert mono.clipped_fraction > 0.005


@pytest.mark.parametrize("name,rate", [("a.wav", 44100), ("b.m4a", 16000), ("c.flac", 24000)])
def test_load_mono_resamples_like_one_shot_soxr(tmp_path, speech, name, rate):
    import soxr

    from cosytune.audio.io import load_mono

    x, sr = speech
    x = soxr.resample(np.tile(x, 3), sr, rate).astype(np.float32)
    stereo = np.stack([x, -0.25 * x], axis=1)
    path = (
        write_sf(tmp_path / name, stereo, rate)
        if name[-3:] != "m4a"
        else write_av(tmp_path / name, stereo, rate, "aac")
    )
    audio, got_rate = load_audio(path)
    mono = load_mono(path, target_rate=24000, quality="HQ")
    expected = (
        to_mono(audio) if got_rate == 24000 else soxr.resample(to_mono(audio), got_rate, 24000, quality="HQ")
    )
    assert mono.sample_rate == 24000 and mono.source_sample_rate == got_rate and mono.channels == 2
    assert mono.source_duration_s == pytest.approx(audio.shape[1] / got_rate)
    assert len(mono.samples) == len(expected)
    np.testing.assert_allclose(mono.samples, expected, atol=1e-6)


def test_without_pyav_mp3_falls_back_to_libsndfile_and_others_say_what_to_install(tmp_path, speech, monkeypatch):
    """A minimal install without PyAV still reads mp3 (libsndfile >= 1.1); other formats name the fix."""
    from cosytune.errors import MissingDependencyError

    x, sr = speech
    mp3, m4a = tmp_path / "a.mp3", tmp_path / "a.m4a"
    write_av(mp3, x, sr, "libmp3lame")
    write_av(m4a, x, sr, "aac")
    with_av, rate = load_audio(mp3)
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # makes `import av` raise ImportError
    without_av, rate2 = load_audio(mp3)
    assert rate2 == rate and abs(without_av.shape[1] - with_av.shape[1]) <= 2304  # decoder delay handling differs
    with pytest.raises(MissingDependencyError, match=r"a\.m4a.*'av'.*pip install"):
        load_audio(m4a)

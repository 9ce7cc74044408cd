"""Helpers for the audio tests: real speech from the shipped sample and media files built offline.

Everything is generated inside the test run (soundfile writes wav/flac/ogg/mp3; PyAV's bundled
ffmpeg encodes m4a/aac, opus and an mp4 video with an audio track), so no test downloads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def sample_speech(
    sample_speaker_dir: Path, names: tuple[str, ...] = ("demo-thanks.mp3",)
) -> tuple[np.ndarray, int]:
    """Real speech: the given shipped clips decoded and joined with 0.6 s pauses (mono float32)."""
    from cosytune.audio.io import load_audio, to_mono

    parts, rate = [], 0
    for name in names:
        audio, rate = load_audio(sample_speaker_dir / "audio" / name)
        parts.append(to_mono(audio))
        parts.append(np.zeros(int(0.6 * rate), np.float32))
    return np.concatenate(parts[:-1]), rate


def tone(duration_s: float, sample_rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    """A pure sine tone (mono float32)."""
    t = np.arange(int(duration_s * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_sf(path: Path, audio: np.ndarray, sample_rate: int, **kw) -> Path:
    """Write with soundfile (format from the extension; mp3 needs libsndfile >= 1.1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, sample_rate, **kw)
    return path


def write_av(path: Path, audio: np.ndarray, sample_rate: int, codec: str, video: bool = False) -> Path:
    """Encode with PyAV: ``audio`` is (samples,) mono or (samples, channels); optional video track."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    audio = audio.reshape(len(audio), -1)
    channels = audio.shape[1]
    with av.open(str(path), "w") as container:
        vstream = None
        if video:
            vstream = container.add_stream("mpeg4", rate=10)
            vstream.width, vstream.height, vstream.pix_fmt = 64, 48, "yuv420p"
        astream = container.add_stream(codec, rate=sample_rate)
        astream.layout = "mono" if channels == 1 else "stereo"
        planar = np.ascontiguousarray(audio.T.astype(np.float32))
        hop = 1024
        for i in range(0, planar.shape[1], hop):
            frame = av.AudioFrame.from_ndarray(
                planar[:, i : i + hop], format="fltp", layout=astream.layout.name
            )
            frame.sample_rate = sample_rate
            frame.pts = i
            for packet in astream.encode(frame):
                container.mux(packet)
        for packet in astream.encode(None):
            container.mux(packet)
        if vstream is not None:
            num_frames = max(1, int(len(audio) / sample_rate * 10))
            for k in range(num_frames):
                img = np.full((48, 64, 3), (k * 7) % 255, np.uint8)
                vframe = av.VideoFrame.from_ndarray(img, format="rgb24")
                for packet in vstream.encode(vframe):
                    container.mux(packet)
            for packet in vstream.encode(None):
                container.mux(packet)
    return path

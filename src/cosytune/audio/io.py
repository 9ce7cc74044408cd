"""Reading any audio (or the audio track of a video) and writing PCM16 wav atomically.

Decoding goes through two backends, no system ``ffmpeg`` binary needed:

* libsndfile (``soundfile``) for the uncompressed and lossless formats it reads natively
  (wav, flac, aiff, ...) and ogg/vorbis/opus;
* ffmpeg's libraries bundled in PyAV (``av``) for everything else (mp3, m4a/aac, opus in
  webm/mka, wma, amr, the audio stream of mp4/mkv/mov/webm/avi videos, ...) and as the
  fallback when libsndfile refuses a file. mp3 goes to ffmpeg first: libsndfile's mpg123 prints
  resync notes straight to stderr on damaged files, and ffmpeg honours the LAME gapless header.

Layout: :func:`load_audio` returns ``(channels, samples)`` float32 in [-1, 1] (values slightly
beyond ±1 can come out of lossy decoders) and the native sample rate. Nothing is resampled
here; dataset preparation resamples with soxr (:mod:`cosytune.data.prepare_audio`).

Failures raise :class:`AudioDecodeError` whose ``reason`` is a stable reject reason
(``zero_length``, ``not_audio``, ``unreadable``), so callers can record a reject row.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from cosytune.fileio import atomic_path

logger = logging.getLogger(__name__)

#: Extensions libsndfile decodes; tried first for these because it is the faster path.
SOUNDFILE_EXTENSIONS = frozenset(
    {
        ".wav",
        ".wave",
        ".flac",
        ".ogg",
        ".oga",
        ".aiff",
        ".aif",
        ".aifc",
        ".au",
        ".snd",
        ".caf",
        ".w64",
        ".rf64",
    }
)
#: Extensions we expect to hold audio (a failure to decode them is "unreadable", not "not_audio").
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS | frozenset(
    {
        ".mp3",
        ".m4a",
        ".aac",
        ".mp4a",
        ".opus",
        ".wma",
        ".amr",
        ".ac3",
        ".eac3",
        ".mp2",
        ".mpga",
        ".mka",
        ".weba",
        ".ape",
        ".wv",
        ".tta",
        ".alac",
        ".dts",
        ".spx",
        ".3ga",
    }
)
#: Video containers whose audio track we use.
VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4",
        ".m4v",
        ".mkv",
        ".mov",
        ".webm",
        ".avi",
        ".flv",
        ".wmv",
        ".mpg",
        ".mpeg",
        ".ts",
        ".mts",
        ".3gp",
        ".ogv",
    }
)
#: Side files that legitimately sit next to recordings (transcripts, lists, notes); never decoded.
SIDECAR_EXTENSIONS = frozenset(
    {
        ".txt",
        ".lab",
        ".json",
        ".jsonl",
        ".tsv",
        ".csv",
        ".md",
        ".yaml",
        ".yml",
        ".lst",
        ".list",
        ".scp",
        ".srt",
        ".vtt",
        ".ass",
        ".lrc",
    }
)


class AudioDecodeError(Exception):
    """A file that yields no audio.

    Attributes:
        reason: stable reject reason: ``"zero_length"``, ``"not_audio"`` or ``"unreadable"``.
        detail: human-readable explanation including the decoder's message.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), int(sample_rate)


def _read_pyav(path: Path) -> tuple[np.ndarray, int]:
    import av

    with av.open(str(path), metadata_errors="ignore") as container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise AudioDecodeError("not_audio", f"no audio stream (found: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        # Planar float at the stream's own rate and layout. Most decoders (mp3, aac, opus,
        # vorbis) already emit planar float; their planes are read directly (one copy), the
        # rest go through libswresample.
        resampler = av.AudioResampler(format="fltp")
        planes: list[list[np.ndarray]] = []
        sample_rate = stream.rate or stream.codec_context.sample_rate

        def take(frame) -> None:
            n = frame.samples
            chans = [np.frombuffer(p, dtype=np.float32, count=n) for p in frame.planes]
            while len(planes) < len(chans):
                planes.append([])
            for k, c in enumerate(chans):
                planes[k].append(c.copy())

        for frame in container.decode(stream):
            sample_rate = frame.sample_rate or sample_rate
            if frame.format.name == "fltp":
                take(frame)
            else:
                for out in resampler.resample(frame):
                    take(out)
        for out in resampler.resample(None):
            take(out)
    if not planes or not planes[0]:
        return np.zeros((1, 0), dtype=np.float32), int(sample_rate or 0)
    # A stream whose channel count changes midway keeps only the channels present throughout
    # (channel 0 always is), so no stretch of audio is dropped.
    full = sum(len(c) for c in planes[0])
    keep = [chan for chan in planes if sum(len(c) for c in chan) == full]
    # Fill one preallocated array, releasing the per-frame pieces as we go: peak memory is
    # about twice the decoded audio rather than three times.
    data = np.empty((len(keep), full), dtype=np.float32)
    for k, chan in enumerate(keep):
        pos = 0
        chan.reverse()
        while chan:
            piece = chan.pop()
            data[k, pos : pos + len(piece)] = piece
            pos += len(piece)
    return data, int(sample_rate)


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode an audio file, or the first audio stream of a video file.

    Args:
        path: any file; the extension only picks which decoder is tried first.

    Returns:
        ``(audio, sample_rate)``: ``audio`` is float32 ``(channels, samples)``.

    Raises:
        AudioDecodeError: the file is empty, holds no audio, or cannot be decoded; ``reason``
            says which.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise AudioDecodeError("unreadable", f"cannot stat file: {e}") from e
    if size == 0:
        raise AudioDecodeError("zero_length", "file is empty (0 bytes)")
    ext = path.suffix.lower()
    errors: list[str] = []
    if ext in SOUNDFILE_EXTENSIONS:
        try:
            data, sample_rate = _read_soundfile(path)
        # libsndfile raises several exception types; any failure means "try ffmpeg".
        except Exception as e:  # noqa: BLE001
            errors.append(f"libsndfile: {e}")
        else:
            return _check_decoded(data, sample_rate)
    try:
        data, sample_rate = _read_pyav(path)
    except AudioDecodeError:
        if errors and ext in AUDIO_EXTENSIONS:
            raise AudioDecodeError("unreadable", f"{errors[0]}; ffmpeg: file has no audio stream") from None
        raise
    except Exception as e:  # av.error.* (a ValueError subclass tree) and OSError
        errors.append(f"ffmpeg: {e}")
        reason = "unreadable" if ext in AUDIO_EXTENSIONS | VIDEO_EXTENSIONS else "not_audio"
        raise AudioDecodeError(reason, "; ".join(errors)) from e
    return _check_decoded(data, sample_rate)


def _check_decoded(data: np.ndarray, sample_rate: int) -> tuple[np.ndarray, int]:
    if data.shape[-1] == 0:
        raise AudioDecodeError("zero_length", "decoded to 0 samples")
    if sample_rate <= 0:
        raise AudioDecodeError("unreadable", f"decoder reported sample rate {sample_rate}")
    if not np.all(np.isfinite(data)):
        raise AudioDecodeError("unreadable", "decoded samples contain NaN or infinity")
    return data, sample_rate


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average the channels of a ``(channels, samples)`` array into a 1-D float32 signal."""
    if audio.ndim == 1:
        return audio.astype(np.float32, copy=False)
    if audio.shape[0] == 1:
        return audio[0].astype(np.float32, copy=False)
    # float32 accumulation: exact enough for a handful of channels, half the memory of float64.
    return audio.mean(axis=0, dtype=np.float32)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Convert float [-1, 1] samples to int16, rounding to nearest and saturating at full scale."""
    scaled = np.rint(np.asarray(audio, dtype=np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def write_wav_pcm16(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Write a mono (or ``(samples, channels)``) signal as 16-bit PCM wav, atomically.

    The file appears under its final name only once complete, so an interrupted run never
    leaves a truncated wav that looks finished.

    Args:
        path: destination ``.wav`` path; parent folders are created.
        audio: float samples in [-1, 1] (values beyond saturate), or int16 samples.
        sample_rate: in Hz.
    """
    import soundfile as sf

    pcm = audio if audio.dtype == np.int16 else to_pcm16(audio)
    with atomic_path(path, suffix=".wav") as tmp:
        sf.write(str(tmp), pcm, int(sample_rate), subtype="PCM_16", format="WAV")

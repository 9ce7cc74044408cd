"""Reading any audio (or the audio track of a video) and writing PCM16 wav atomically.

Decoding goes through two backends, no system ``ffmpeg`` binary needed:

* libsndfile (``soundfile``) for the uncompressed and lossless formats it reads natively
  (wav, flac, aiff, ...) and ogg/vorbis/opus;
* ffmpeg's libraries bundled in PyAV (``av``) for everything else (mp3, m4a/aac, opus in
  webm/mka, wma, amr, the audio stream of mp4/mkv/mov/webm/avi videos, ...) and as the
  fallback when libsndfile refuses a file. mp3 goes to ffmpeg first: libsndfile's mpg123 prints
  resync notes straight to stderr on damaged files, and ffmpeg honours the LAME gapless header.

Layout: :func:`load_audio` returns ``(channels, samples)`` float32 in [-1, 1] (values slightly
beyond ±1 can come out of lossy decoders) at the native sample rate. :func:`load_mono` is what
dataset preparation uses: it downmixes to mono, optionally resamples with soxr and measures
clipping *while* decoding, in chunks of 65536 frames, so an hour-long stereo recording never
sits in memory as a multi-channel float array. Both functions share the decoders.

Failures raise :class:`AudioDecodeError` whose ``reason`` is a stable reject reason
(``zero_length``, ``not_audio``, ``unreadable``), so callers can record a reject row.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cosytune.errors import MissingDependencyError
from cosytune.fileio import atomic_path

if TYPE_CHECKING:
    import torch

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


#: Decoded samples are gathered into chunks of about this many frames before any processing.
_CHUNK = 1 << 16


class _Sink:
    """Receives decoded channel blocks; keeps them as is or downmixed, and counts clipping.

    Decoders deliver small blocks (an mp3 frame is 1152 samples); they are gathered into
    chunks of :data:`_CHUNK` frames so the per-chunk numpy work stays cheap. In mono mode each
    chunk is downmixed at once, so a long stereo recording never exists as a float32 stereo
    array in memory; with ``target_rate`` the mono chunks are also resampled as they come
    (soxr's streaming resampler gives the same samples as a one-shot call).
    """

    def __init__(
        self, mono: bool, clip_level: float | None, target_rate: int | None = None, quality: str = "HQ"
    ) -> None:
        self.mono = mono
        self.clip_level = clip_level
        self.target_rate = target_rate
        self.quality = quality
        self.reset()

    def start(self, sample_rate: int) -> None:
        """Called by a decoder before the first block, with the rate of every block it sends."""
        self.source_rate = int(sample_rate)
        if self.mono and self.target_rate and self.source_rate > 0 and self.source_rate != self.target_rate:
            import soxr

            self.stream = soxr.ResampleStream(
                self.source_rate, self.target_rate, 1, dtype="float32", quality=self.quality
            )

    def reset(self) -> None:
        self.source_rate = 0
        self.stream = None
        self.parts: list[np.ndarray] = []
        self.pending: list[list[np.ndarray]] = []
        self.pending_len = 0
        self.channels = 0
        self.num_samples = 0
        self.num_clipped = 0

    def add(self, chans: list[np.ndarray]) -> None:
        if self.pending and len(chans) != len(self.pending[0]):
            self._flush()
        self.pending.append(chans)
        self.pending_len += len(chans[0])
        if self.pending_len >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        num_channels = len(self.pending[0])
        block = np.empty((num_channels, self.pending_len), dtype=np.float32)
        pos = 0
        for chans in self.pending:
            n = len(chans[0])
            for k, c in enumerate(chans):
                block[k, pos : pos + n] = c
            pos += n
        self.pending, self.pending_len = [], 0
        if not np.isfinite(block).all():
            raise AudioDecodeError("unreadable", "decoded samples contain NaN or infinity")
        self.channels = max(self.channels, num_channels)
        self.num_samples += block.shape[1]
        if self.clip_level is not None and max(float(block.max()), -float(block.min())) >= self.clip_level:
            self.num_clipped += int(np.count_nonzero(np.max(np.abs(block), axis=0) >= self.clip_level))
        if self.mono:
            mono = block[0] if num_channels == 1 else block.mean(axis=0, dtype=np.float32)
            self.parts.append(mono if self.stream is None else self.stream.resample_chunk(mono, last=False))
        else:
            self.parts.append(block)

    def result(self) -> np.ndarray:
        self._flush()
        if self.stream is not None:
            self.parts.append(self.stream.resample_chunk(np.zeros(0, np.float32), last=True))
            self.stream = None
        if self.mono:
            out = np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)
        elif not self.parts:
            out = np.zeros((1, 0), np.float32)
        else:
            # A stream whose channel count changes midway keeps the channels present throughout.
            keep = min(p.shape[0] for p in self.parts)
            out = np.concatenate([p[:keep] for p in self.parts], axis=1)
        self.parts = []
        return out


def _decode_soundfile(path: Path, sink: _Sink) -> int:
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        sample_rate = int(f.samplerate)
        sink.start(sample_rate)
        while True:
            data = f.read(_CHUNK, dtype="float32", always_2d=True)
            if not len(data):
                break
            sink.add(list(data.T))
    return sample_rate


def _decode_pyav(path: Path, sink: _Sink) -> int:
    import av

    with av.open(str(path), metadata_errors="ignore") as container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise AudioDecodeError("not_audio", f"no audio stream (found: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        # Planar float at the stream's own rate and layout. Most decoders (mp3, aac, opus,
        # vorbis) already emit planar float, whose planes are read in place; the rest, and any
        # frame whose rate differs from the first one, go through libswresample.
        sample_rate = 0
        resampler = None

        def take(frame) -> None:
            n = frame.samples
            if n:
                # Views into the frame's buffers (kept alive by the views until the sink copies them).
                sink.add([np.frombuffer(p, dtype=np.float32, count=n) for p in frame.planes])

        for frame in container.decode(stream):
            if not sample_rate:
                sample_rate = int(frame.sample_rate or stream.rate or 0)
                sink.start(sample_rate)
                resampler = av.AudioResampler(format="fltp", rate=sample_rate or None)
            if frame.format.name == "fltp" and frame.sample_rate == sample_rate:
                take(frame)
            else:
                for out in resampler.resample(frame):
                    take(out)
        if resampler is not None:
            for out in resampler.resample(None):
                take(out)
    return int(sample_rate or stream.rate or 0)


def _decode(path: str | os.PathLike, sink: _Sink) -> int:
    """Run the decoders on ``path`` into ``sink``; returns the sample rate."""
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
            return _decode_soundfile(path, sink)
        # libsndfile raises several exception types; any failure means "try ffmpeg".
        except Exception as e:  # noqa: BLE001
            errors.append(f"libsndfile: {e}")
            sink.reset()
    try:
        return _decode_pyav(path, sink)
    except ImportError as e:
        # A broken or minimal install without PyAV: libsndfile (>= 1.1) still reads mp3 and ogg.
        if ext not in SOUNDFILE_EXTENSIONS:
            try:
                return _decode_soundfile(path, sink)
            except Exception as e2:  # noqa: BLE001
                errors.append(f"libsndfile: {e2}")
                sink.reset()
        raise MissingDependencyError(
            f"cannot decode {path.name}: {'; '.join(errors) or 'libsndfile does not read this format'}, and "
            f"the ffmpeg backend (the Python package 'av') is not installed ({e}). "
            "Install it with: pip install 'av>=12,<20'") from e
    except AudioDecodeError:
        if errors and ext in AUDIO_EXTENSIONS:
            raise AudioDecodeError("unreadable", f"{errors[0]}; ffmpeg: file has no audio stream") from None
        raise
    except Exception as e:  # av.error.* (a ValueError subclass tree) and OSError
        errors.append(f"ffmpeg: {e}")
        reason = "unreadable" if ext in AUDIO_EXTENSIONS | VIDEO_EXTENSIONS else "not_audio"
        raise AudioDecodeError(reason, "; ".join(errors)) from e


def _check_decoded(num_samples: int, sample_rate: int) -> None:
    if num_samples == 0:
        raise AudioDecodeError("zero_length", "decoded to 0 samples")
    if sample_rate <= 0:
        raise AudioDecodeError("unreadable", f"decoder reported sample rate {sample_rate}")


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
    sink = _Sink(mono=False, clip_level=None)
    sample_rate = _decode(path, sink)
    audio = sink.result()
    _check_decoded(audio.shape[1], sample_rate)
    return audio, sample_rate


@dataclass(frozen=True)
class MonoAudio:
    """A decoded file mixed down to mono, with what we learnt about the original on the way.

    Attributes:
        samples: (samples,) float32, the average of the source channels, at ``sample_rate``.
        sample_rate: rate of ``samples`` in Hz (the target rate if one was asked for).
        source_sample_rate: the source's sample rate in Hz.
        source_duration_s: the source's duration in seconds.
        channels: the source's channel count.
        clipped_fraction: share of sample instants where any source channel reached the
            ``clip_level`` given to :func:`load_mono`.
    """

    samples: np.ndarray
    sample_rate: int
    source_sample_rate: int
    source_duration_s: float
    channels: int
    clipped_fraction: float


def load_mono(
    path: str | os.PathLike,
    clip_level: float = 0.95,
    target_rate: int | None = None,
    quality: str = "HQ",
) -> MonoAudio:
    """Decode like :func:`load_audio`, downmixing (and resampling) chunk by chunk as it decodes.

    Peak memory is about two mono copies of the output instead of two multi-channel copies at
    the source rate (an hour of 44.1 kHz stereo: ~0.7 GB instead of ~2.5 GB). The clipping
    statistic is measured on the original channels before the downmix.

    Args:
        path: any file; the extension only picks which decoder is tried first.
        clip_level: amplitude (full scale 1.0) at which a sample counts as clipped.
        target_rate: resample to this rate with soxr (same samples as ``soxr.resample`` on the
            whole signal); None keeps the source rate.
        quality: soxr quality preset (``"HQ"``, ``"VHQ"``, ...).

    Returns:
        A :class:`MonoAudio`.

    Raises:
        AudioDecodeError: as :func:`load_audio`.
    """
    sink = _Sink(mono=True, clip_level=clip_level, target_rate=target_rate, quality=quality)
    source_rate = _decode(path, sink)
    samples = sink.result()
    _check_decoded(sink.num_samples, source_rate)
    return MonoAudio(
        samples=samples,
        sample_rate=int(target_rate or source_rate),
        source_sample_rate=int(source_rate),
        source_duration_s=sink.num_samples / source_rate,
        channels=sink.channels,
        clipped_fraction=sink.num_clipped / max(sink.num_samples, 1),
    )


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


def load_wav(path: str | os.PathLike, target_sr: int, *, min_sr: int = 16000) -> torch.Tensor:
    """Decode, mix to mono and resample (torchaudio-compatible sinc) — upstream's ``load_wav``.

    Reads with soundfile (float32 = int16/32768, like upstream's ``torchaudio.load(backend="soundfile")``)
    and falls back to PyAV for other containers (:func:`load_audio`).

    Args:
        path: audio file.
        target_sr: output rate in Hz.
        min_sr: lowest accepted input rate (upstream asserts >= 16 kHz).

    Returns:
        ``(N,)`` float32 tensor at ``target_sr``.

    Raises:
        DataError: missing or undecodable file, or a sample rate below ``min_sr``.
    """
    import torch

    from cosytune.audio.resample import resample
    from cosytune.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"audio file {p} does not exist")
    try:
        data, sr = load_audio(p)
    except AudioDecodeError as e:
        raise DataError(f"cannot decode audio {p}: {e}") from e
    data = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, data.shape[-1])
    if sr != target_sr and sr < min_sr:
        raise DataError(f"{p}: sample rate {sr} Hz is below the {min_sr} Hz minimum; re-record or upsample it "
                        "with `cosytune prepare-audio`")
    wav = torch.from_numpy(data).mean(dim=0)  # (N,) channel mean, as upstream load_wav
    return resample(wav, int(sr), target_sr)


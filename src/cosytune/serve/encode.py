"""Audio encodings of the HTTP API: ``wav`` (16-bit PCM), ``pcm`` (raw s16le), ``flac``, ``mp3``, ``opus``.

Streams are sent as ``wav`` (a header with open-ended sizes, then PCM) or raw ``pcm``; the compressed
formats need the whole take and are offered for non-streaming requests only.
"""

from __future__ import annotations

import io
import struct

import numpy as np

from cosytune.errors import UsageError

#: response_format -> media type.
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/L16", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg"}
STREAM_FORMATS = ("wav", "pcm")
#: soundfile (format, subtype) of the compressed formats.
_SOUNDFILE = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}


def available_formats() -> list[str]:
    """The response formats this installation can encode (mp3/opus need libsndfile >= 1.1)."""
    import soundfile as sf

    formats = sf.available_formats()
    out = ["wav", "pcm"]
    for name, (fmt, subtype) in _SOUNDFILE.items():
        if fmt in formats and subtype in sf.available_subtypes(fmt):
            out.append(name)
    return out


def media_type(fmt: str, sample_rate: int) -> str:
    """The Content-Type of ``fmt`` (raw PCM names its rate, RFC 2586)."""
    return f"audio/L16; rate={sample_rate}; channels=1" if fmt == "pcm" else MEDIA_TYPES[fmt]


def check_format(fmt: str, *, stream: bool) -> None:
    """Raise UsageError for a format this server cannot send (as asked)."""
    if stream and fmt not in STREAM_FORMATS:
        raise UsageError(f"response_format {fmt!r} cannot be streamed; expected one of {', '.join(STREAM_FORMATS)} "
                         "with stream=true, or set stream=false")
    avail = available_formats()
    if fmt not in avail:
        raise UsageError(f"response_format {fmt!r} is not supported here; expected one of {', '.join(avail)}")


def pcm16(audio: np.ndarray) -> bytes:
    """float32 in [-1, 1] → little-endian int16 bytes (``audio.io.to_pcm16``: the wav writer's rounding)."""
    from cosytune.audio.io import to_pcm16

    return to_pcm16(np.asarray(audio)).astype("<i2").tobytes()


def wav_header(sample_rate: int, num_samples: int | None = None) -> bytes:
    """A 44-byte PCM16 mono WAV header; ``num_samples=None`` writes open-ended sizes (for streams)."""
    data = 0xFFFFFFFF if num_samples is None else num_samples * 2
    riff = 0xFFFFFFFF if num_samples is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
            sample_rate * 2, 2, 16) + b"data" + struct.pack("<I", data))


def encode(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A whole take in ``fmt``."""
    if fmt == "pcm":
        return pcm16(audio)
    if fmt == "wav":
        return wav_header(sample_rate, int(np.asarray(audio).shape[0])) + pcm16(audio)
    import soundfile as sf

    check_format(fmt, stream=False)
    major, subtype = _SOUNDFILE[fmt]
    buf = io.BytesIO()
    rate = sample_rate
    data = np.asarray(audio, dtype=np.float32)
    if fmt == "opus" and rate not in (8000, 12000, 16000, 24000, 48000):
        raise UsageError(f"opus needs 8/12/16/24/48 kHz audio, the model makes {rate} Hz; use another format")
    sf.write(buf, data, rate, format=major, subtype=subtype)
    return buf.getvalue()

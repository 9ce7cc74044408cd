"""One segment of speech to one wav file plus its run.json: what ``cosytune infer`` and ``cosytune run``'s
sample synthesis call (:func:`synthesize_to_file`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosytune.console import print_summary
from cosytune.infer.synthesizer import SynthesisOptions, SynthesisResult, Synthesizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentRequest:
    """What to say and where to write it (``out_wav``'s folder also gets run.json)."""

    text: str
    out_wav: Path
    mode: str | None = None
    spk_id: str | None = None
    prompt_text: str | None = None
    prompt_wav: Path | None = None
    options: SynthesisOptions = field(default_factory=SynthesisOptions)
    stream: bool = False  # also write piece_NNNN.wav as chunks are produced


@dataclass(frozen=True)
class SegmentOutcome:
    out_wav: Path
    run_json: Path
    result: SynthesisResult
    pieces: int


def _warn_if_replacing_other_run(run_json: Path, out_wav: Path) -> None:
    """run.json describes one run; say so when it is about to replace the record of another wav."""
    try:
        previous = json.loads(run_json.read_text(encoding="utf-8"))["outputs"][0]["path"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return
    if Path(previous).resolve() != out_wav.resolve():
        logger.warning("%s described %s and now describes %s; give each run its own --out_dir (or folder of "
                       "--out_wav) to keep every run.json", run_json, previous, out_wav)


def check_output_path(out_wav: Path) -> None:
    """Refuse, before any work, an output the run could not write: a folder where the wav should go, a file
    where a folder should be, or a name whose extension promises another format than the WAV written."""
    from cosytune.errors import UsageError

    out_wav = Path(out_wav)
    if out_wav.is_dir():
        raise UsageError(f"{out_wav} is a folder; --out_wav needs a file name (or use --out_dir {out_wav})")
    if out_wav.suffix.lower() != ".wav":
        raise UsageError(f"{out_wav}: cosytune writes 16-bit PCM WAV; give the output a .wav name (convert it "
                         f"afterwards if you need {out_wav.suffix or 'another format'}, e.g. with ffmpeg)")
    for parent in out_wav.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{parent} is a file, so {out_wav} cannot be written there; choose another folder")
            break


def synthesize_to_file(synth: Synthesizer, req: SegmentRequest, *, settings: dict[str, Any],
                       load_s: float = 0.0, dtype: str = "float32", summary: bool = True,
                       show_progress: bool = False) -> SegmentOutcome:
    """Synthesise ``req`` with ``synth``, write the wav (and pieces) and run.json, print the summary.

    ``settings`` are recorded in run.json (text-valued ones redacted by its writer). Folders are made
    only when the first file is written, so a failed run leaves no empty output folder.
    """
    from cosytune.audio.io import write_wav_pcm16
    from cosytune.infer.runinfo import write_run_json

    req.options.check()
    out_wav = Path(req.out_wav)
    check_output_path(out_wav)
    out_dir = out_wav.parent
    request = {"text": req.text, "mode": req.mode, "spk_id": req.spk_id, "prompt_text": req.prompt_text,
               "prompt_wav": req.prompt_wav, "options": req.options}
    outputs = []
    if req.stream:
        result = None
        for chunk in synth.stream(**request):
            piece = out_dir / f"piece_{chunk.index:04d}.wav"
            write_wav_pcm16(piece, chunk.audio, chunk.sample_rate)
            outputs.append({"path": str(piece), "samples": int(chunk.audio.shape[0]),
                            "seconds": chunk.audio.shape[0] / chunk.sample_rate, "elapsed_s": chunk.elapsed_s})
            logger.info("piece %d: %.2f s of audio after %.2f s", chunk.index, chunk.audio.shape[0] /
                        chunk.sample_rate, chunk.elapsed_s)
            result = chunk.result if chunk.final else result
        assert result is not None
    else:
        from cosytune.console import progress

        # A long text decodes for a while before any audio exists: count its speech tokens (25 per second).
        with progress(total=None, desc="decoding", enabled=show_progress, unit="token") as bar:
            result = synth.synthesize(**request, on_token=lambda n: bar.update(1))
    write_wav_pcm16(out_wav, result.audio, result.sample_rate)
    outputs.insert(0, {"path": str(out_wav), "samples": int(result.audio.shape[0]), "seconds": result.duration_s})
    timings = {"load_s": load_s, **result.timings}
    _warn_if_replacing_other_run(out_dir / "run.json", out_wav)
    run_json = write_run_json(out_dir / "run.json", settings=settings, seed=result.seed,
                              model_files=synth.model_files, outputs=outputs, timings=timings, request=result.info,
                              device=str(synth.device), dtype=dtype)
    outcome = SegmentOutcome(out_wav, run_json, result, len(outputs) - 1)
    if summary:
        print_summary("infer", segment_rows(outcome, req.stream))
    return outcome


def segment_rows(o: SegmentOutcome, stream: bool = False) -> list[tuple[str, Any]]:
    """The summary ``cosytune infer`` prints."""
    r = o.result
    items: list[tuple[str, Any]] = [("output", o.out_wav), ("mode", r.info["mode"]), ("audio", f"{r.duration_s:.2f} s"),
                                    ("speech tokens", len(r.tokens)), ("seed", r.seed), ("RTF", f"{r.timings['rtf']:.3f}")]
    if stream:
        items += [("pieces", o.pieces), ("first chunk", f"{r.timings['first_chunk_s']:.2f} s")]
    items.append(("run.json", o.run_json))
    return items

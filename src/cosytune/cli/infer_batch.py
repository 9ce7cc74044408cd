"""Synthesise many segments, one wav each (plus, optionally, one joined wav with gaps).

Input (--input, alias --text_file), UTF-8:
  * .txt (or any non-.jsonl file): one segment per non-empty line;
  * .jsonl: one object per line with "text" and any per-line options: "name" (output file stem),
    "spk_id", "prompt_wav", "prompt_text", "mode", "speed", "seed", "temperature", "top_p", "top_k",
    "win_size", "tau_r", "text_frontend", "prompt_strategy", "guide_sep". Command-line flags are the
    defaults of every line; a line that names its own voice ("spk_id" or "prompt_wav") speaks in that
    voice instead of the command line's (its mode/prompt_text come from the line too); a relative
    "prompt_wav" may be relative to the input file's folder. --join is written only when every segment
    succeeded.
Each segment keeps its own text, voice, seed and settings and is never split; up to --batch_size
segments share one LLM batch and one flow batch (same tokens as one at a time; cosytune.infer.batch).
Outputs are OUT_DIR/<name>.wav (default name seg_NNNN, the 0-based segment number), batch.jsonl (one
row per segment: file, seconds, seed, settings hash) and run.json (request.llm_decoder: which LLM
decoder(s) ran; --no_fast_decode forces the reference one). Re-running skips segments whose wav exists
with unchanged settings. A segment that fails (e.g. empty text) is recorded in rejects.jsonl and the
others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from cosytune.cli.common import flag, print_summary, progress
from cosytune.cli.infer import (
    add_synthesis_flags,
    dtype_name,
    load_synthesizer,
    options_from_args,
    settings_from_args,
)

logger = logging.getLogger(__name__)

EPILOG = """examples:
  cosytune infer-batch --model_dir models/alice --spk_id alice --input lines.txt --out_dir out/book --seed 7
  cosytune infer-batch --model_dir base --input requests.jsonl --out_dir out/mix --join all.wav --gap_s 0.4
      (requests.jsonl lines: {"text": "...", "name": "intro", "prompt_wav": "ref.wav",
                              "prompt_text": "You are a helpful assistant.<|endofprompt|>...", "speed": 1.1})
  torchrun --nproc_per_node=4 -m cosytune infer-batch ... (same flags: each GPU takes its share of the segments,
      rank 0 writes batch.jsonl, run.json and the summary; see cosytune.infer.distributed)
"""

#: Per-line keys of a JSONL input (besides "text" and "name").
LINE_OPTIONS = ("spk_id", "prompt_wav", "prompt_text", "mode", "speed", "seed", "temperature", "top_p", "top_k",
                "win_size", "tau_r", "text_frontend", "prompt_strategy", "guide_sep")
MANIFEST = "batch.jsonl"
_LINE_TYPES: dict[str, tuple[type, ...]] = {
    "spk_id": (str,), "prompt_wav": (str,), "prompt_text": (str,), "mode": (str,), "prompt_strategy": (str,),
    "guide_sep": (str,), "speed": (int, float), "temperature": (int, float), "top_p": (int, float),
    "tau_r": (int, float), "seed": (int,), "top_k": (int,), "win_size": (int,), "text_frontend": (bool,),
}


def build_parser(p: argparse.ArgumentParser) -> None:
    add_synthesis_flags(p, batch=True)
    flag(p, "input", "--text_file", required=True, type=Path, help="segments: .txt (one per line) or .jsonl")
    flag(p, "out_dir", required=True, type=Path, help="where the wavs, batch.jsonl and run.json go")
    flag(p, "join", type=Path, default=None, help="also write all segments joined into this wav "
         "(relative paths are inside --out_dir)")
    flag(p, "gap_s", type=float, default=0.3, help="silence between joined segments in seconds (default: %(default)s)")
    flag(p, "force", action="store_true", help="re-synthesise segments that already exist")
    flag(p, "batch_size", type=int, default=8, help="segments decoded and rendered together (one LLM batch and "
         "one flow batch; 1 = one at a time). Each segment keeps its own seed and settings (default: %(default)s)")


def read_segments(path: Path) -> list[dict[str, Any]]:
    """Parse the batch input into ``[{"text", "name", options...}]``; every problem is reported at once.

    Raises:
        DataError: missing file, not UTF-8, bad JSON, unknown keys, missing text, duplicate names.
    """
    from cosytune.errors import DataError

    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise DataError(f"--input {path} does not exist") from e
    except UnicodeDecodeError as e:
        raise DataError(f"--input {path} is not valid UTF-8 ({e}); save it as UTF-8") from e
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    is_jsonl = path.suffix.lower() == ".jsonl"
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if not is_jsonl:
            rows.append({"text": line.strip(), "line": n})
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n}: expected an object, found {type(obj).__name__}")
            continue
        unknown = sorted(set(obj) - {"text", "name", *LINE_OPTIONS})
        if unknown:
            problems.append(f"line {n}: unknown key(s) {unknown}; allowed: text, name, {', '.join(LINE_OPTIONS)}")
        for key, types in _LINE_TYPES.items():
            value = obj.get(key)
            # bool is an int subclass: refuse true/false where a number is expected.
            if key in obj and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
                problems.append(f"line {n}: \"{key}\" must be {' or '.join(t.__name__ for t in types)}, "
                                f"got {value!r}")
        if not isinstance(obj.get("text"), str):
            problems.append(f"line {n}: \"text\" (a string) is required")
        if "name" in obj and (not isinstance(obj["name"], str) or not obj["name"] or "/" in obj["name"]
                              or obj["name"].startswith(".")):
            problems.append(f"line {n}: \"name\" must be a plain file stem, got {obj['name']!r}")
        obj["line"] = n
        rows.append(obj)
    for i, row in enumerate(rows):
        row.setdefault("name", f"seg_{i:04d}")
        # A relative prompt_wav that is not found from the working dir is looked up beside the input file.
        wav = row.get("prompt_wav")
        if isinstance(wav, str) and not Path(wav).is_absolute() and not Path(wav).exists() \
                and (path.parent / wav).exists():
            row["prompt_wav"] = str(path.parent / wav)
    seen: dict[str, int] = {}
    for row in rows:
        if row["name"] in seen:
            problems.append(f"line {row['line']}: name {row['name']!r} already used on line {seen[row['name']]}")
        seen.setdefault(row["name"], row["line"])
    if problems:
        raise DataError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    if not rows:
        raise DataError(f"{path} holds no segments; expected one text per line (or JSONL objects with \"text\")")
    return rows


#: The keys that say whose voice a segment speaks in.
VOICE_KEYS = ("mode", "spk_id", "prompt_text", "prompt_wav")


def line_voice(row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The voice of one segment. A line that names a voice (``spk_id`` or ``prompt_wav``) replaces the
    command line's voice as a whole (so ``--spk_id alice`` plus a line's own ``prompt_wav`` is that line's
    zero-shot voice, not a clash); a line that names none takes the command line's."""
    if "spk_id" in row or "prompt_wav" in row:
        return {k: row.get(k) for k in VOICE_KEYS}
    return {k: row.get(k, getattr(args, k, None)) for k in VOICE_KEYS}


def _settings_hash(row: dict[str, Any], args: argparse.Namespace, model_files: dict[str, Any]) -> str:
    keys = {k: row.get(k, getattr(args, k, None)) for k in ("text", *LINE_OPTIONS)}
    keys.update(line_voice(row, args))
    keys["model_files"] = {k: v.get("sha256") for k, v in model_files.items()}
    blob = json.dumps(keys, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _join(paths: list[Path], out: Path, gap_s: float) -> float:
    import numpy as np
    import soundfile as sf

    from cosytune.audio.io import write_wav_pcm16

    parts, sr = [], None
    for p in paths:
        data, rate = sf.read(str(p), dtype="int16")
        sr = sr or rate
        if parts and gap_s > 0:
            parts.append(np.zeros(round(gap_s * sr), dtype=np.int16))
        parts.append(data)
    audio = np.concatenate(parts) if parts else np.zeros(0, np.int16)
    write_wav_pcm16(out, audio, sr or 24000)
    return audio.shape[0] / (sr or 24000)


def run(args: argparse.Namespace) -> int:
    from cosytune.audio.io import write_wav_pcm16
    from cosytune.data.rejects import RejectLog
    from cosytune.errors import CosytuneError, UsageError
    from cosytune.fileio import write_jsonl
    from cosytune.infer.batch import BatchRequest, synthesize_batch
    from cosytune.infer.distributed import BatchRanks, output_is_valid
    from cosytune.infer.runinfo import redact_text, write_run_json

    if args.gap_s < 0:
        raise UsageError(f"--gap_s must be >= 0, got {args.gap_s}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    rows = read_segments(args.input)
    ranks = BatchRanks.from_env()  # under torchrun: this rank's share, its own GPU, rank 0 merges
    args.device = ranks.device(args.device)
    synth, load_s = load_synthesizer(args)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    previous = ranks.read_previous(manifest_path)
    rejects = RejectLog(out_dir / "rejects.jsonl", "infer-batch")
    done: list[dict[str, Any]] = []
    timings = {"load_s": load_s, "llm_s": 0.0, "flow_s": 0.0, "hift_s": 0.0, "audio_s": 0.0}
    skipped = 0
    decoders: set[str] = set()
    t0 = time.perf_counter()
    pending: list[tuple[dict[str, Any], Any, str]] = []  # (row, BatchRequest, settings digest)
    todo: list[tuple[dict[str, Any], str]] = []
    for row in rows:
        wav = out_dir / f"{row['name']}.wav"
        digest = _settings_hash(row, args, synth.model_files)
        old = previous.get(row["name"])
        if not args.force and old and old.get("settings_sha256") == digest and output_is_valid(wav, old):
            done.append(old)
            skipped += 1
            continue
        todo.append((row, digest))
    for row, digest in ranks.share(todo, weight=lambda item: len(item[0]["text"])):
        try:
            overrides = {k: row[k] for k in LINE_OPTIONS if k in row}
            options = options_from_args(args, synth, **overrides)
        except CosytuneError as e:
            rejects.add(f"{args.input}:{row['line']}", type(e).__name__, str(e))
            logger.error("segment %s (line %d) failed: %s", row["name"], row["line"], e)
            continue
        pending.append((row, BatchRequest(row["text"], **line_voice(row, args), options=options), digest))
    bar = progress(None, total=len(pending), desc="segments" + (f" (rank 0 of {ranks.world_size})" if ranks.distributed
                   else ""), enabled=not args.no_progress and ranks.is_main)

    def finished(row: dict[str, Any], digest: str, result: Any) -> None:
        bar.update(1)
        if isinstance(result, CosytuneError):
            rejects.add(f"{args.input}:{row['line']}", type(result).__name__, str(result))
            logger.error("segment %s (line %d) failed: %s", row["name"], row["line"], result)
            return
        wav = out_dir / f"{row['name']}.wav"
        write_wav_pcm16(wav, result.audio, result.sample_rate)
        if "llm_decoder" in result.info:
            decoders.add(result.info["llm_decoder"])
        for k in ("llm_s", "flow_s", "hift_s", "audio_s"):
            timings[k] += result.timings[k]
        done.append({"name": row["name"], "line": row["line"], "path": str(wav), "seconds": result.duration_s,
                     "seed": result.seed, "mode": result.info["mode"], "speech_tokens": len(result.tokens),
                     "text": redact_text(row["text"]), "settings_sha256": digest})
        # The manifest is rewritten after every segment, so an interrupted run resumes where it stopped.
        ranks.write_manifest(manifest_path, done, previous)

    # Work in slices of a few batches: each slice's segments are written (and resumable) before the next.
    step = max(1, args.batch_size) * 4
    for start in range(0, len(pending), step):
        part = pending[start: start + step]
        synthesize_batch(synth, [req for _, req, _ in part], batch_size=args.batch_size, fast=synth.fast_decode,
                         on_result=lambda i, res, part=part: finished(part[i][0], part[i][2], res),
                         on_stage=lambda what, start=start: bar.set_postfix_str(
                             f"segments {start + 1}-{min(start + step, len(pending))}, {what}"))
    bar.close()
    gathered = ranks.gather((done, rejects.rows, timings, sorted(decoders)))
    if gathered is None:  # another rank: rank 0 writes the manifest, rejects, run.json and the summary
        ranks.finish(manifest_path)
        logger.info("rank %d: %d segment(s) written", ranks.rank, len(done) - skipped)
        return 0
    if ranks.distributed:
        done = list({d["name"]: d for part in gathered for d in part[0]}.values())
        rejects.rows = [r for part in gathered for r in part[1]]
        for k in ("llm_s", "flow_s", "hift_s", "audio_s"):
            timings[k] = sum(part[2][k] for part in gathered)
        decoders = {d for part in gathered for d in part[3]}
    rejects.save()
    order = {r["name"]: i for i, r in enumerate(rows)}
    done.sort(key=lambda r: order.get(r["name"], len(order)))
    write_jsonl(manifest_path, done)
    ranks.finish(manifest_path)
    total = time.perf_counter() - t0
    timings["total_s"] = total
    timings["rtf"] = total / timings["audio_s"] if timings["audio_s"] else None
    joined = None
    join_note = "-"
    if args.join is not None and done and len(rejects):
        # A joined file with holes would pass for the whole text: write it only when every segment is there.
        join_note = (f"NOT WRITTEN: {len(rejects)} segment(s) failed (see {rejects.path}); fix them and run the "
                     "same command again (finished segments are kept)")
        logger.error("--join %s not written: %d segment(s) failed", args.join, len(rejects))
    elif args.join is not None and done:
        joined = args.join if args.join.is_absolute() else out_dir / args.join
        _join([Path(r["path"]) for r in done], joined, args.gap_s)
        join_note = str(joined)
    settings = settings_from_args(args)
    write_run_json(out_dir / "run.json", settings=settings, seed=[r["seed"] for r in done],
                   model_files=synth.model_files, outputs=[{k: r[k] for k in ("path", "seconds")} for r in done]
                   + ([{"path": str(joined), "joined": True}] if joined else []), timings=timings,
                   request={"segments": len(rows), "written": len(done) - skipped, "skipped": skipped,
                            "failed": len(rejects), "llm_decoder": sorted(decoders)}, device=str(synth.device), dtype=dtype_name(synth),
                   command="infer-batch")
    print_summary("infer-batch", [
        ("segments", len(rows)), ("written", len(done) - skipped), ("skipped (unchanged)", skipped),
        ("failed", f"{len(rejects)}" + (f" (see {rejects.path})" if len(rejects) else "")),
        ("audio", f"{sum(r['seconds'] for r in done):.1f} s"), ("joined", join_note),
        ("manifest", manifest_path),
    ])
    return 1 if len(rejects) else 0

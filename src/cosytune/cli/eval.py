"""Did the fine-tune help? Synthesise held-out sentences with every variant on the same seeds and score
each take: intelligibility (CER/WER by an ASR model), speaker similarity (Resemblyzer, CAM++), quality
(DNSMOS), failures and speed. Writes eval/scorecard.json, scorecard.csv, takes.csv and index.html.

Variants of a 'cosytune run' work dir (--run WORK): the base model zero-shot from a clip of your data,
the tuned speaker, each kept epoch checkpoint, the averaged weights, tuned LLM + base flow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cosytune.cli.common import flag, print_summary

EPILOG = """examples:
  cosytune eval --run work/dream --asr_model large-v3
  cosytune eval --run work/dream --takes 3 --texts my_sentences.txt --languages zh
  cosytune eval --model_dir models/dream --spk_id dream --reference data/wavs/a.wav \\
      --variants ep3=exp/llm/epoch_3_whole.pt avg=exp/llm/llm_avg.pt --base_model pretrained/Fun-CosyVoice3-0.5B
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    flag(g, "run", "--work", type=Path, default=None, help="a 'cosytune run' work dir: compare all its variants")
    flag(g, "model_dir", type=Path, default=None, help="a model dir (with --spk_id and --variants)")
    flag(p, "spk_id", default=None, help="with --model_dir: the tuned speaker of its spk2info.pt")
    flag(p, "variants", nargs="*", default=[], metavar="NAME=LLM_PT[+FLOW_PT]",
         help="with --model_dir: weight files to compare (NAME=model: the dir's own weights)")
    flag(p, "base_model", type=Path, default=None, help="with --model_dir: also score this base model zero-shot")
    flag(p, "reference", type=Path, default=None, help="reference clip of the speaker (default with --run: the "
         "training clip closest to 6 s)")
    flag(p, "data", type=Path, default=None, help="with --model_dir: the transcribe out_dir or Kaldi dir of the "
         "training data (speaking rate, centroid, overlap check)")
    flag(p, "out", type=Path, default=None, help="report folder (default: WORK/eval or MODEL_DIR/eval)")
    flag(p, "texts", type=Path, default=None, help="your own sentences, one per line (added to the shipped ones)")
    flag(p, "languages", nargs="*", default=[], choices=["en", "zh"],
         help="shipped sentence lists (default: the language of the training text)")
    flag(p, "max_sentences", type=int, default=0, help="first N shipped sentences per language (0: all)")
    flag(p, "takes", type=int, default=2, help="takes per sentence, fixed seeds (default %(default)s)")
    flag(p, "seed", type=int, default=1234, help="first seed (default %(default)s)")
    flag(p, "no_checkpoints", action="store_true", help="with --run: leave out the epoch checkpoints")
    flag(p, "asr_backend", choices=["faster-whisper", "openai-whisper", "none"], default="faster-whisper")
    flag(p, "asr_model", default=None, help="Whisper model for CER/WER (default with --run: the one that "
         "transcribed the data; none: intelligibility is skipped and the scorecard says so)")
    flag(p, "device", choices=["cpu", "cuda", "auto"], default="cpu")


def _custom_variants(args: argparse.Namespace):
    from cosytune.errors import UsageError
    from cosytune.evaluation.scorecard import Variant
    from cosytune.text.special import DEFAULT_INSTRUCT

    if not args.spk_id:
        raise UsageError("--model_dir needs --spk_id: the tuned speaker to evaluate")
    out = []
    for spec in args.variants or ["tuned=model"]:
        name, sep, files = spec.partition("=")
        if not sep or not name or not files:
            raise UsageError(f"--variants {spec!r}: expected NAME=LLM_PT[+FLOW_PT] or NAME=model")
        llm, _, flow = files.partition("+")
        for f in (llm, flow):
            if f and f != "model" and not Path(f).is_file():
                raise UsageError(f"--variants {spec!r}: {f} is not a file")
        out.append(Variant(name, args.model_dir, "tuned" if llm == "model" else "custom", spk_id=args.spk_id,
                           llm_ckpt=Path(llm) if llm and llm != "model" else None,
                           flow_ckpt=Path(flow) if flow else None))
    if args.base_model is not None:
        if args.reference is None:
            raise UsageError("--base_model needs --reference: the clip the base model clones zero-shot")
        out.insert(0, Variant("base zero-shot", args.base_model, "baseline", prompt_wav=args.reference,
                              prompt_text=DEFAULT_INSTRUCT + (args.reference_text or "")))
    return out


def run(args: argparse.Namespace) -> int:
    from cosytune.errors import UsageError
    from cosytune.evaluation.api import EvalSettings, evaluate, run_variants, training_reference
    from cosytune.evaluation.scorecard import Reference

    settings = EvalSettings(languages=tuple(args.languages), texts=args.texts, max_sentences=args.max_sentences,
                            takes=args.takes, seed=args.seed, asr_backend=args.asr_backend,
                            asr_model=None if (args.asr_model or "").lower() == "none" else args.asr_model,
                            device=args.device)
    labelled_with = None
    if args.run is not None:
        variants, ref, cfg = run_variants(args.run, checkpoints=not args.no_checkpoints)
        if args.reference is not None:
            ref.clip = args.reference
        if cfg.get("backend") in ("faster-whisper", "openai-whisper", "auto") and not cfg.get("transcripts"):
            labelled_with = cfg.get("whisper_model")
        out = args.out or Path(args.run) / "eval"
        campplus = Path(cfg.get("base_model") or "") / "campplus.onnx"
    elif args.model_dir is not None:
        args.reference_text = None
        if args.data is not None:
            ref = training_reference(args.data, clip=args.reference)
        elif args.reference is not None:
            ref = Reference(clip=args.reference)
        else:
            raise UsageError("--model_dir needs --reference (a clip of the speaker) or --data (the training data)")
        args.reference = ref.clip
        args.reference_text = getattr(ref, "clip_text", "")
        variants = _custom_variants(args)
        out = args.out or args.model_dir / "eval"
        campplus = args.model_dir / "campplus.onnx"
    else:
        raise UsageError("give --run WORK (a 'cosytune run' work dir) or --model_dir DIR --spk_id ID")
    if args.asr_model and args.asr_model.lower() == "none":
        labelled_with = None
    # The rule of --select scorecard names the best of the tuned variants (the baseline is for comparison).
    candidates = [v.name for v in variants if v.role != "baseline"]
    res = evaluate(variants, ref, out, settings, labelled_with=labelled_with, campplus_onnx=campplus,
                   candidates=candidates, progress=not args.no_progress)
    print()
    print("verdict: " + res.verdict)
    print_summary("eval", [
        ("variants", ", ".join(v.name for v in variants)),
        ("takes", f"{len(res.rows)} in {res.seconds:.0f} s ({res.card['takes_per_minute']:.1f} per minute)"),
        ("intelligibility", res.card["asr_status"]),
        *([("best by the rule", f"{res.selection.winner} ({res.selection.why})")] if res.selection else []),
        ("report", res.paths["html"]),
        ("tables", f"{res.paths['json']}, {res.paths['csv']}, {res.paths['takes']}"),
    ])
    return 0

"""Throughput of ``cosytune eval``: takes scored per minute (issue #16's figure).

Two numbers:
  * **scoring only**: real speech (the shipped sample's clips) through the scorers ``cosytune eval`` runs on
    every take: Resemblyzer similarity (reference + centroid), CAM++ similarity, DNSMOS and, with
    ``--asr_model``, Whisper ASR + CER/WER;
  * **end to end**: :func:`cosytune.evaluation.api.evaluate` on a model dir (synthesis + scoring + report), by
    default a random-weight model dir of ``--preset`` (tiny: the machinery; full: the real model's cost).

Everything goes through the library's public entry points; the model loads are timed apart.

CPU:   python benchmarks/bench_eval.py --device cpu --clips 16 --sentences 2 --takes 2
GPU:   python benchmarks/bench_eval.py --device cuda --preset full --clips 64 --sentences 8 --takes 2 \\
           --asr_model /path/to/faster-whisper-large-v3 --out bench_eval.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from cosytune.fileio import write_json


def _sample() -> Path:
    return Path(str(files("cosytune") / "assets" / "sample_speaker"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--preset", choices=["tiny", "full"], default="tiny", help="random model dir for the end-to-end "
                    "figure (ignored with --model_dir)")
    ap.add_argument("--model_dir", type=Path, default=None, help="a real model dir (zero-shot from a sample clip)")
    ap.add_argument("--clips", type=int, default=16, help="clips scored for the scoring-only figure")
    ap.add_argument("--sentences", type=int, default=2, help="shipped English sentences for the end-to-end figure "
                    "(0: skip it)")
    ap.add_argument("--takes", type=int, default=2)
    ap.add_argument("--asr_model", default=None, help="Whisper model (dir or cached name) for CER/WER")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)

    from cosytune.audio.io import load_audio, to_mono
    from cosytune.evaluation.api import EvalSettings, evaluate
    from cosytune.evaluation.models import to_16k
    from cosytune.evaluation.scorecard import Reference, Scorers, Variant, embed_centroid
    from cosytune.evaluation.textmetrics import score_text

    sample = _sample()
    lines = [ln.split("|", 1) for ln in (sample / "transcripts.txt").read_text().splitlines() if "|" in ln]
    clips = [(sample / "audio" / n, t) for n, t in lines]
    res: dict[str, Any] = {"device": args.device, "asr_model": args.asr_model}
    if args.device.startswith("cuda"):
        import torch

        res["gpu"] = torch.cuda.get_device_name(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        if args.model_dir is None:
            from cosytune.modeldir.presets import write_model_dir

            t0 = time.perf_counter()
            model_dir = write_model_dir(tmp_p / "model", preset=args.preset, seed=0)
            res["model"] = f"random {args.preset} ({time.perf_counter() - t0:.0f} s to write)"
        else:
            model_dir = args.model_dir
            res["model"] = str(model_dir)

        t0 = time.perf_counter()
        scorers = Scorers.load(device=args.device, asr_backend="faster-whisper", asr_model=args.asr_model,
                               campplus_onnx=model_dir / "campplus.onnx")
        res["scorers_load_s"] = time.perf_counter() - t0
        res["asr_status"] = scorers.asr_status

        # -- scoring only, on real speech ------------------------------------------------------------------
        audio = []
        for p, text in clips[:args.clips] if args.clips <= len(clips) else (clips * (args.clips // len(clips) + 1))[:args.clips]:
            a, r = load_audio(p)
            audio.append((to_16k(to_mono(a), r), text))
        ref = audio[0][0]
        ref_emb = scorers.encoder.embed(ref)
        centroid = embed_centroid(scorers.encoder, [p for p, _ in clips[:10]])
        cam_ref = scorers.campplus.embed(ref) if scorers.campplus else None
        scorers.dnsmos.score(ref)  # warm-up
        _sync(args.device)
        t0 = time.perf_counter()
        per_model = {"resemblyzer": 0.0, "campplus": 0.0, "dnsmos": 0.0, "asr": 0.0}
        seconds_audio = 0.0
        for a16, text in audio:
            seconds_audio += a16.size / 16000
            t = time.perf_counter()
            e = scorers.encoder.embed(a16)
            float(e @ ref_emb), float(e @ centroid)
            per_model["resemblyzer"] += time.perf_counter() - t
            if scorers.campplus is not None and cam_ref is not None:
                t = time.perf_counter()
                scorers.campplus.embed(a16)
                per_model["campplus"] += time.perf_counter() - t
            t = time.perf_counter()
            scorers.dnsmos.score(a16)
            per_model["dnsmos"] += time.perf_counter() - t
            if scorers.asr is not None:
                t = time.perf_counter()
                score_text(text, scorers.transcribe(a16, "en"), scorers.normalize)
                per_model["asr"] += time.perf_counter() - t
        _sync(args.device)
        el = time.perf_counter() - t0
        res["scoring"] = {"clips": len(audio), "audio_s": seconds_audio, "seconds": el,
                          "takes_per_minute": 60 * len(audio) / el,
                          "ms_per_clip": {k: 1000 * v / len(audio) for k, v in per_model.items()}}

        # -- end to end -------------------------------------------------------------------------------------
        if args.sentences > 0:
            from cosytune.text.special import DEFAULT_INSTRUCT

            pclip, ptext = clips[0]
            variants = [Variant("zero-shot", model_dir, "baseline", prompt_wav=pclip,
                                prompt_text=DEFAULT_INSTRUCT + ptext)]
            st = EvalSettings(languages=("en",), max_sentences=args.sentences, takes=args.takes,
                              device=args.device)
            r = evaluate(variants, Reference(clip=pclip, training_clips=[p for p, _ in clips[:10]]), tmp_p / "eval",
                         st, progress=False, scorers=scorers)
            res["end_to_end"] = {"takes": len(r.rows), "seconds": r.seconds,
                                 "takes_per_minute": r.card["takes_per_minute"],
                                 "synthesis_s": sum(t["synth_s"] for t in r.rows)}
    if args.out:
        write_json(args.out, res)
    s = res["scoring"]
    print(f"device          {args.device}{' (' + res['gpu'] + ')' if 'gpu' in res else ''}")
    print(f"scorers load    {res['scorers_load_s']:.1f} s   ({res['asr_status']})")
    print(f"scoring only    {s['takes_per_minute']:.1f} takes/min  ({s['clips']} real clips, {s['audio_s']:.0f} s "
          "of audio; ms/clip " + ", ".join(f"{k} {v:.0f}" for k, v in s["ms_per_clip"].items()) + ")")
    if "end_to_end" in res:
        e = res["end_to_end"]
        print(f"end to end      {e['takes_per_minute']:.1f} takes/min  ({e['takes']} takes, {res['model']}, "
              f"synthesis {e['synthesis_s']:.0f} s of {e['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()

"""Synthesise a held-out sentence set with every variant on the same seeds, and score every take.

A *variant* is one way to produce the voice: the base model zero-shot from a reference clip (the "do
nothing" baseline), the tuned SFT speaker, each kept epoch checkpoint, the averaged weights, the tuned LLM
with the base flow. Every variant speaks every sentence ``takes`` times with the seeds
``seed + 1000 * take + sentence index``, so variants are compared on the same draws.

Per take: failure checks (exception, empty, too short, silent, clipped, duration per character far from
the training data's), RTF, Resemblyzer similarity to the reference clip and to the centroid of the training
clips, CAM++ similarity to the reference clip, DNSMOS (SIG/BAK/OVRL/P.808) and, when an ASR model is
available, CER/WER with insertion/deletion rates and a repeated-n-gram score.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cosytune.errors import CosytuneError, UsageError
from cosytune.evaluation.models import RATE, CamPlusSimilarity, Dnsmos, VoiceEncoder, cosine, to_16k
from cosytune.evaluation.sentences import Sentence
from cosytune.evaluation.textmetrics import score_text

logger = logging.getLogger(__name__)

#: Metrics of a take, the direction that is better, and how they are shown.
METRICS: dict[str, tuple[str, str]] = {
    "error_rate": ("lower", "CER/WER"),
    "insertion_rate": ("lower", "insertions"),
    "deletion_rate": ("lower", "deletions"),
    "repeat_score": ("lower", "repeated n-grams"),
    "sim_ref": ("higher", "SIM to reference (Resemblyzer)"),
    "sim_centroid": ("higher", "SIM to training centroid (Resemblyzer)"),
    "sim_campplus": ("higher", "SIM to reference (CAM++)"),
    "sig": ("higher", "DNSMOS SIG"),
    "bak": ("higher", "DNSMOS BAK"),
    "ovrl": ("higher", "DNSMOS OVRL"),
    "p808": ("higher", "DNSMOS P.808"),
    "dur_ratio": ("closer to 1", "duration per char / training"),
    "rtf": ("lower", "RTF"),
}

FAILURES = ("exception", "empty", "too_short", "silent", "clipped", "too_fast", "too_slow")


@dataclass(frozen=True)
class Variant:
    """One way to synthesise the voice."""

    name: str
    model_dir: Path
    role: str
    """``baseline``, ``tuned``, ``checkpoint``, ``average``, ``base_flow`` or ``custom``."""
    spk_id: str | None = None
    prompt_wav: Path | None = None
    prompt_text: str | None = None
    llm_ckpt: Path | None = None
    flow_ckpt: Path | None = None
    spk2info: dict | None = None
    """Speaker entries to add to the model dir's table (an SFT speaker made from spk2embedding.pt)."""
    note: str = ""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "model_dir": str(self.model_dir), "spk_id": self.spk_id,
                "prompt_wav": str(self.prompt_wav) if self.prompt_wav else None,
                "llm_ckpt": str(self.llm_ckpt) if self.llm_ckpt else None,
                "flow_ckpt": str(self.flow_ckpt) if self.flow_ckpt else None, "note": self.note}


@dataclass
class Reference:
    """What the takes are compared with: the reference clip and the training clips."""

    clip: Path
    training_clips: list[Path] = field(default_factory=list)
    sec_per_unit: float | None = None
    """Median seconds per speakable unit of the training data (None: unknown)."""
    training_texts: list[str] = field(default_factory=list)


@dataclass
class Scorers:
    """The loaded scoring models (load once, reuse for every take)."""

    encoder: VoiceEncoder
    dnsmos: Dnsmos
    asr: Any = None
    asr_status: str = "ASR unavailable: intelligibility skipped"
    asr_info: dict = field(default_factory=dict)
    asr_cfg: Any = None
    campplus: CamPlusSimilarity | None = None
    normalize: Callable[[str], str] | None = None

    @classmethod
    def load(cls, *, device: str = "cpu", asr_backend: str | None = None, asr_model: str | None = None,
             campplus_onnx: Path | None = None, labelled_with: str | None = None) -> Scorers:
        """Load the scorers. ASR loads only when a backend and model are given; a model that cannot load is
        recorded (``asr_status``) and intelligibility is skipped, never silently."""
        enc = VoiceEncoder("cuda" if device.startswith("cuda") else "cpu")
        dns = Dnsmos(device if device.startswith("cuda") else "cpu")
        cam = CamPlusSimilarity(campplus_onnx, "cuda" if device.startswith("cuda") else "cpu") \
            if campplus_onnx and Path(campplus_onnx).exists() else None
        s = cls(enc, dns, campplus=cam)
        if asr_backend and asr_backend != "none" and asr_model:
            from cosytune.data.transcribe import TranscribeConfig, build_asr_backend

            try:
                cfg = TranscribeConfig(backend=asr_backend, whisper_model=asr_model,
                                       device="cuda" if device.startswith("cuda") else "cpu",
                                       compute_type="int8" if not device.startswith("cuda") else "default",
                                       beam_size=1, vad_filter=False, initial_prompt=None, max_new_tokens=128)
                s.asr = build_asr_backend(asr_backend, cfg)
                s.asr_cfg = cfg
                same = labelled_with is not None and str(labelled_with) == str(asr_model)
                s.asr_status = f"ASR: {asr_backend} {asr_model}"
                s.asr_info = {"backend": asr_backend, "model": asr_model, "same_as_labeller": same}
                if same:
                    s.asr_status += " (the same model that labelled the training data: errors it shares are unseen)"
            except (CosytuneError, ImportError) as e:
                s.asr_status = f"ASR unavailable ({e}): intelligibility skipped"
        elif not asr_model:
            s.asr_status = "ASR unavailable (no --asr_model given): intelligibility skipped"
        if s.asr is not None:
            from cosytune.text.normalize import TextNormalizer

            tn = TextNormalizer()
            s.normalize = lambda t: " ".join(tn.normalize(t)) if t.strip() else ""
        return s

    def transcribe(self, audio16: np.ndarray, lang: str) -> str:
        import dataclasses

        self.asr.cfg = dataclasses.replace(self.asr_cfg, language=lang)
        return self.asr.transcribe(audio16).text


def clip_failures(audio: np.ndarray, sample_rate: int) -> list[str]:
    """Signal-level failures of a take: empty, too short (< 0.3 s), silent (peak < -40 dBFS), clipped
    (> 0.1 % of samples at full scale)."""
    if audio.size == 0:
        return ["empty"]
    out = []
    if audio.size < 0.3 * sample_rate:
        out.append("too_short")
    peak = float(np.max(np.abs(audio)))
    if peak < 0.01:
        out.append("silent")
    if float(np.mean(np.abs(audio) >= 0.999)) > 0.001:
        out.append("clipped")
    return out


def embed_centroid(encoder: VoiceEncoder, clips: Sequence[Path], limit: int = 30) -> np.ndarray | None:
    """Normalised mean Resemblyzer embedding of up to ``limit`` clips (evenly spread)."""
    from cosytune.audio.io import load_audio, to_mono

    if not clips:
        return None
    step = max(1, len(clips) // limit)
    embs = []
    for p in list(clips)[::step][:limit]:
        a, r = load_audio(p)
        embs.append(encoder.embed(to_16k(to_mono(a), r)))
    m = np.mean(embs, axis=0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def take_seed(seed: int, sentence_index: int, take: int) -> int:
    return seed + 1000 * take + sentence_index


def run_takes(variants: Sequence[Variant], sentences: Sequence[Sentence], ref: Reference, scorers: Scorers, *,
              out_dir: Path, takes: int = 2, seed: int = 1234, device: str = "cpu",
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Synthesise and score every (variant, sentence, take); returns one row per take.

    Takes are written as 16-bit wavs to ``out_dir/takes/<variant>/<sentence>_t<k>.wav``.
    """
    from cosytune.audio.io import load_audio, to_mono, write_wav_pcm16
    from cosytune.infer.synthesizer import SynthesisOptions, Synthesizer

    if takes < 1:
        raise UsageError(f"--takes must be >= 1; got {takes}")
    a, r = load_audio(ref.clip)
    ref16 = to_16k(to_mono(a), r)
    ref_emb = scorers.encoder.embed(ref16)
    centroid = embed_centroid(scorers.encoder, ref.training_clips)
    ref_cam = scorers.campplus.embed(ref16) if scorers.campplus else None
    from cosytune.data.transcribe import speakable_units

    rows: list[dict[str, Any]] = []
    total = len(variants) * len(sentences) * takes
    done = 0
    for v in variants:
        t0 = time.perf_counter()
        # One take at a time: each shape's CUDA graphs are captured at first use (a few seconds over a
        # variant's takes) instead of the ~25 s warm-up of every common shape a server pays at load.
        synth = Synthesizer.from_dir(v.model_dir, device=device, llm_ckpt=v.llm_ckpt, flow_ckpt=v.flow_ckpt,
                                     hash_files=False, warmup=False)
        if v.spk2info:
            synth.spk2info.update(v.spk2info)
        speaker = synth.speaker_from_wav(v.prompt_wav) if v.prompt_wav else None
        load_s = time.perf_counter() - t0
        logger.info("variant %s loaded in %.1f s", v.name, load_s)
        vdir = out_dir / "takes" / _safe(v.name)
        vdir.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(sentences):
            for k in range(takes):
                sd = take_seed(seed, i, k)
                row: dict[str, Any] = {"variant": v.name, "sentence": s.id, "lang": s.lang, "take": k, "seed": sd,
                                       "text": s.text, "failures": [], "wav": None}
                t1 = time.perf_counter()
                try:
                    res = synth.synthesize(s.text, spk_id=v.spk_id if speaker is None else None, speaker=speaker,
                                           prompt_text=v.prompt_text if speaker is not None else None,
                                           mode="zero_shot" if speaker is not None else None,
                                           options=SynthesisOptions(seed=sd))
                    audio, sr = res.audio, res.sample_rate
                    row["rtf"] = float(res.timings.get("rtf", math.nan))
                except (CosytuneError, RuntimeError, ValueError) as e:
                    row["failures"] = ["exception"]
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    audio, sr = np.zeros(0, np.float32), synth.sample_rate
                row["synth_s"] = time.perf_counter() - t1
                row["duration_s"] = audio.size / sr
                if "exception" not in row["failures"]:
                    row["failures"] = clip_failures(audio, sr)
                if audio.size:
                    wav = vdir / f"{s.id}_t{k}.wav"
                    write_wav_pcm16(wav, np.clip(audio, -1, 1), sr)
                    row["wav"] = wav.relative_to(out_dir).as_posix()
                    _score_audio(row, to_16k(audio, sr), s, ref, scorers, ref_emb, centroid, ref_cam,
                                 speakable_units)
                elif scorers.asr is not None:
                    row.update(error_rate=1.0, deletion_rate=1.0, insertion_rate=0.0, substitution_rate=0.0,
                               repeat_score=0.0)
                rows.append(row)
                done += 1
                if progress:
                    progress(f"{done}/{total} {v.name} {s.id} take {k}")
        del synth
    return rows


def _score_audio(row: dict, a16: np.ndarray, s: Sentence, ref: Reference, scorers: Scorers, ref_emb: np.ndarray,
                 centroid: np.ndarray | None, ref_cam: np.ndarray | None, speakable_units: Callable) -> None:
    emb = scorers.encoder.embed(a16)
    row["sim_ref"] = cosine(emb, ref_emb)
    if centroid is not None:
        row["sim_centroid"] = cosine(emb, centroid)
    if ref_cam is not None and scorers.campplus is not None and a16.size >= RATE // 4:
        row["sim_campplus"] = cosine(scorers.campplus.embed(a16), ref_cam)
    row.update(scorers.dnsmos.score(a16))
    units = speakable_units(s.text)
    if ref.sec_per_unit and units > 0:
        ratio = (a16.size / RATE / units) / ref.sec_per_unit
        row["dur_ratio"] = ratio
        if ratio < 0.5:
            row["failures"].append("too_fast")
        elif ratio > 2.0:
            row["failures"].append("too_slow")
    if scorers.asr is not None:
        hyp = scorers.transcribe(a16, s.lang)
        it = score_text(s.text, hyp, scorers.normalize)
        row.update(asr_text=hyp, error_rate=it.error_rate, substitution_rate=it.substitution_rate,
                   deletion_rate=it.deletion_rate, insertion_rate=it.insertion_rate, repeat_score=it.repeat_score)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "variant"


# ------------------------------------------------------------------------------------------- summaries
def mean_ci(xs: Sequence[float]) -> tuple[float, float, int]:
    """Mean, 95 % confidence half-width (normal approximation), count; NaN-free input."""
    vals = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not vals:
        return math.nan, math.nan, 0
    m = float(np.mean(vals))
    ci = 1.96 * float(np.std(vals, ddof=1)) / math.sqrt(len(vals)) if len(vals) > 1 else math.nan
    return m, ci, len(vals)


def summarize(rows: Sequence[dict[str, Any]], variants: Sequence[Variant]) -> dict[str, dict[str, Any]]:
    """Per variant: mean ± CI of every metric, failure rates, and the seed-to-seed spread (mean over
    sentences of the standard deviation across takes)."""
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        vr = [r for r in rows if r["variant"] == v.name]
        summ: dict[str, Any] = {"role": v.role, "takes": len(vr)}
        for m in METRICS:
            mean, ci, n = mean_ci([r.get(m) for r in vr])
            summ[m] = {"mean": mean, "ci95": ci, "n": n}
        failed = [r for r in vr if r["failures"]]
        summ["failure_rate"] = len(failed) / len(vr) if vr else math.nan
        summ["failures"] = {f: sum(f in r["failures"] for r in vr) for f in FAILURES}
        spread: dict[str, float] = {}
        for m in ("error_rate", "sim_centroid", "sim_ref", "ovrl"):
            per = []
            for sid in {r["sentence"] for r in vr}:
                xs = [r[m] for r in vr if r["sentence"] == sid and r.get(m) is not None]
                if len(xs) > 1:
                    per.append(float(np.std(xs, ddof=1)))
            spread[m] = float(np.mean(per)) if per else math.nan
        summ["seed_spread"] = spread
        out[v.name] = summ
    return out


def metric(summary: dict[str, Any], name: str) -> float:
    """Mean of one metric in a variant's summary (NaN when absent)."""
    if name == "failure_rate":
        return float(summary.get("failure_rate", math.nan))
    return float(summary.get(name, {}).get("mean", math.nan))


def config_dict(**kw: Any) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in kw.items()}


def variant_list(variants: Sequence[Variant]) -> list[dict[str, Any]]:
    return [v.describe() for v in variants]


"""The library entry points: :func:`evaluate` (``cosytune eval``), :func:`run_variants` (what a ``cosytune
run`` work dir offers to compare), and :func:`select_weights` (``--select scorecard`` of ``average`` and
``run``)."""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosytune.errors import DataError, UsageError
from cosytune.evaluation.scorecard import Reference, Scorers, Variant, run_takes, summarize
from cosytune.evaluation.select import Selection, SelectionRule, select
from cosytune.evaluation.sentences import SHIPPED_LANGUAGES, build_sentence_set
from cosytune.fileio import read_jsonl, write_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """How ``cosytune eval`` samples and scores."""

    languages: tuple[str, ...] = ()
    """Shipped sentence lists to use (en, zh); empty: the language of the training text."""
    texts: Path | None = None
    """Your own sentences (one per line), added to the shipped ones."""
    max_sentences: int = 0
    """Only the first N shipped sentences per language (0: all)."""
    takes: int = 2
    """Takes per sentence (seeds seed + 1000·take + sentence index, the same for every variant)."""
    seed: int = 1234
    asr_backend: str = "faster-whisper"
    """faster-whisper, openai-whisper or none."""
    asr_model: str | None = None
    """Whisper model for CER/WER (a name in the local cache or a dir); none: the model that transcribed the
    data when the work dir records one, else intelligibility is skipped (and said so)."""
    device: str = "cpu"
    rule: SelectionRule = field(default_factory=SelectionRule)


@dataclass
class EvalResult:
    card: dict[str, Any]
    rows: list[dict[str, Any]]
    paths: dict[str, Path]
    selection: Selection | None
    seconds: float

    @property
    def verdict(self) -> str:
        return self.card["verdict"]


# ------------------------------------------------------------------------------------------ work dirs
def read_run_yaml(work: Path) -> dict[str, Any]:
    import yaml

    p = Path(work) / "run.yaml"
    if not p.is_file():
        raise DataError(f"{work} has no run.yaml: pass the work dir of a 'cosytune run' (or use --model_dir)")
    return yaml.safe_load(p.read_text(encoding="utf-8")) or {}


def training_reference(data_dir: Path, model_dir_for_clip: Path | None = None, clip: Path | None = None) -> Reference:
    """The reference clip (given, else the training clip closest to 6 s), all training clips, their speaking
    rate and transcripts, from a transcribe out_dir (``metadata.jsonl``) or a Kaldi dir."""
    from cosytune.data.transcribe import speakable_units

    data_dir = Path(data_dir)
    rows: list[dict[str, Any]] = []
    meta = data_dir / "metadata.jsonl"
    if meta.is_file():
        for r in read_jsonl(meta):
            wav = Path(r.get("wav") or r.get("path") or "")
            if not wav.is_absolute():
                wav = data_dir / wav
            rows.append({"wav": wav, "text": r.get("text", ""), "duration_s": float(r.get("duration_s") or 0),
                         "split": r.get("split", "train")})
    else:
        import soundfile as sf

        from cosytune.data.kaldi import read_kaldi_entries

        for sub in ([data_dir] if (data_dir / "wav.scp").is_file() else [data_dir / "train", data_dir / "dev"]):
            if (sub / "wav.scp").is_file():
                for e in read_kaldi_entries(sub):
                    info = sf.info(e.wav)
                    rows.append({"wav": Path(e.wav), "text": e.text, "duration_s": info.frames / info.samplerate,
                                 "split": sub.name})
    if not rows and clip is None:
        raise DataError(f"no training clips found in {data_dir} (expected metadata.jsonl or a Kaldi wav.scp)")
    train = [r for r in rows if r["split"] != "dev"] or rows
    rates = [r["duration_s"] / speakable_units(r["text"]) for r in rows
             if r["text"] and r["duration_s"] > 0 and speakable_units(r["text"]) > 0]
    if clip is None:
        usable = [r for r in train if r["wav"].is_file()]
        if not usable:
            raise DataError(f"the training clips listed in {data_dir} are missing; pass --reference WAV")
        pick = min(usable, key=lambda r: (abs(r["duration_s"] - 6.0), str(r["wav"])))
        clip, clip_text = pick["wav"], pick["text"]
    else:
        clip_text = next((r["text"] for r in rows if r["wav"] == Path(clip)), "")
    ref = Reference(clip=Path(clip), training_clips=[r["wav"] for r in train if r["wav"].is_file()],
                    sec_per_unit=statistics.median(rates) if rates else None,
                    training_texts=[r["text"] for r in rows if r["text"]])
    ref.clip_text = clip_text  # type: ignore[attr-defined]
    return ref


def run_variants(work: Path, *, checkpoints: bool = True) -> tuple[list[Variant], Reference, dict[str, Any]]:
    """The variants a ``cosytune run`` work dir offers: base zero-shot, tuned, each kept epoch checkpoint,
    the averaged weights (when they differ from the tuned model's), tuned LLM + base flow."""
    from cosytune.fileio import sha256_file
    from cosytune.text.special import DEFAULT_INSTRUCT

    work = Path(work).resolve()
    cfg = read_run_yaml(work)
    speaker, base = cfg.get("speaker"), Path(cfg.get("base_model") or "")
    model_dir = work / "models" / str(speaker)
    if not (model_dir / "llm.pt").is_file():
        raise DataError(f"{model_dir} holds no tuned model yet: finish 'cosytune run' (the assemble stage) first")
    ref = training_reference(work / "data")
    prompt_text = DEFAULT_INSTRUCT + getattr(ref, "clip_text", "")
    # The tuned model dir is assembled from exp/llm/llm_avg.pt: "tuned" is the averaged model.
    selection = work / "exp" / "llm" / "llm_avg.selection.json"
    note = ("LLM picked by --select scorecard (exp/llm/llm_avg.selection.json)" if selection.is_file()
            else "LLM = exp/llm/llm_avg.pt, the average of the best checkpoints by CV loss")
    variants = [Variant("base zero-shot", base, "baseline", prompt_wav=ref.clip, prompt_text=prompt_text,
                        note=f"reference clip {ref.clip.name}"),
                Variant("tuned", model_dir, "tuned", spk_id=str(speaker), note=note)]
    if checkpoints:
        from cosytune.train.checkpoint import list_checkpoints

        for c in list_checkpoints(work / "exp" / "llm"):
            variants.append(Variant(f"llm {c.name}", model_dir, "checkpoint", spk_id=str(speaker), llm_ckpt=c.path))
    if (model_dir / "flow.pt").is_file() and not (model_dir / "flow.pt").samefile(base / "flow.pt") \
            and sha256_file(model_dir / "flow.pt") != sha256_file(base / "flow.pt"):
        variants.append(Variant("tuned llm + base flow", model_dir, "base_flow", spk_id=str(speaker),
                                flow_ckpt=base / "flow.pt"))
    return variants, ref, cfg


# -------------------------------------------------------------------------------------------- evaluate
def _clean(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def evaluate(variants: Sequence[Variant], ref: Reference, out_dir: Path, settings: EvalSettings, *,
             candidates: Sequence[str] = (), labelled_with: str | None = None, campplus_onnx: Path | None = None,
             progress: bool = True, scorers: Scorers | None = None) -> EvalResult:
    """Synthesise and score every variant, write the report into ``out_dir``, pick among ``candidates``.

    Raises:
        UsageError / DataError: bad settings, no sentences, unreadable reference.
    """
    from cosytune.console import progress as bar
    from cosytune.data.transcribe import guess_language
    from cosytune.evaluation.report import verdict, write_all

    t0 = time.perf_counter()
    if settings.device == "auto":
        import dataclasses

        import torch

        settings = dataclasses.replace(settings, device="cuda" if torch.cuda.is_available() else "cpu")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise UsageError(f"variant names must be unique; got {names}")
    langs = tuple(settings.languages)
    for lang in langs:
        if lang not in SHIPPED_LANGUAGES:
            raise UsageError(f"--languages: {lang!r} has no shipped list; choose from {', '.join(SHIPPED_LANGUAGES)}")
    if not langs and settings.texts is None:
        votes = [guess_language(t) for t in ref.training_texts]
        lang = "zh" if votes and votes.count("zh") > len(votes) / 2 else "en"
        langs = (lang,)
    sset = build_sentence_set(langs, texts_file=settings.texts, training_texts=ref.training_texts,
                              max_per_language=settings.max_sentences)
    asr_model = settings.asr_model or labelled_with
    if scorers is None:
        scorers = Scorers.load(device=settings.device, asr_backend=settings.asr_backend, asr_model=asr_model,
                               campplus_onnx=campplus_onnx, labelled_with=labelled_with)
    total = len(variants) * len(sset.sentences) * settings.takes
    pbar = bar(total=total, desc="eval", enabled=progress)
    rows = run_takes(variants, sset.sentences, ref, scorers, out_dir=out_dir, takes=settings.takes,
                     seed=settings.seed, device=settings.device, progress=lambda _msg: pbar.update(1))
    pbar.close()
    summaries = summarize(rows, variants)
    sel = select(summaries, list(candidates), settings.rule) if candidates else None
    roles = {v.role: v.name for v in reversed(variants)}
    card: dict[str, Any] = {
        "config": {"takes": settings.takes, "seed": settings.seed, "languages": list(langs),
                   "texts": str(settings.texts) if settings.texts else None, "device": settings.device},
        "asr_status": scorers.asr_status, "asr": scorers.asr_info,
        "reference_clip": str(ref.clip), "training_clips": len(ref.training_clips),
        "sec_per_unit": ref.sec_per_unit,
        "sentences": [{"id": s.id, "text": s.text, "lang": s.lang, "source": s.source} for s in sset.sentences],
        "dropped_sentences": [s.text for s in sset.dropped],
        "variants": [v.describe() for v in variants],
        "summaries": summaries, "rule": settings.rule.describe(),
        "selection": sel.to_dict() if sel else None,
    }
    card["verdict"] = verdict(summaries, scorers.asr_status, card["selection"], baseline=roles.get("baseline"),
                              tuned=roles.get("tuned") or roles.get("average"), base_flow=roles.get("base_flow"))
    seconds = time.perf_counter() - t0
    card["seconds"] = seconds
    card["takes_per_minute"] = 60 * len(rows) / seconds if seconds > 0 else None
    paths = write_all(_clean(card), _clean(rows), Path(out_dir))
    return EvalResult(card, rows, paths, sel, seconds)


# ------------------------------------------------------------------------------------------ selection
def select_weights(run_dir: Path, dst: Path, *, model_dir: Path, spk_id: str | None = None,
                   spk2info: dict | None = None, kind: str = "llm", num: int = 5, settings: EvalSettings,
                   ref: Reference, base_weights: Path | None = None, out_dir: Path | None = None,
                   fixed: dict[str, Path] | None = None, labelled_with: str | None = None,
                   progress: bool = True) -> tuple[EvalResult, dict[str, Any]]:
    """``--select scorecard``: score the average of the ``num`` best checkpoints, each checkpoint (and, for
    the flow, the base flow), pick by the rule, write the winner's weights to ``dst`` and the reasons to
    ``dst``'s ``.selection.json``. ``fixed`` holds the other network's weights (``{"llm_ckpt": path}`` while
    the flow is selected).

    Returns:
        The evaluation and the selection record.
    """
    from cosytune.train.average import average_checkpoints
    from cosytune.train.checkpoint import list_checkpoints

    run_dir, dst = Path(run_dir), Path(dst)
    cks = list_checkpoints(run_dir)
    if not cks:
        raise DataError(f"no checkpoints (epoch_*.pt with a .yaml) in {run_dir}; train first or check the path")
    out_dir = Path(out_dir) if out_dir else dst.parent / f"{dst.stem}_scorecard"
    out_dir.mkdir(parents=True, exist_ok=True)
    avg = out_dir / f"{kind}_average_of_{num}.pt"
    res_avg = average_checkpoints(run_dir, avg, num, True)
    key = "llm_ckpt" if kind == "llm" else "flow_ckpt"
    common: dict[str, Any] = {"spk_id": spk_id, "spk2info": spk2info, **(fixed or {})}
    variants = [Variant(f"average of {len(res_avg.sources)}", model_dir, "average", **common, **{key: avg})]
    variants += [Variant(c.name, model_dir, "checkpoint", **common, **{key: c.path}) for c in cks]
    if base_weights is not None:
        variants.append(Variant(f"base {kind}", model_dir, "base_flow" if kind == "flow" else "baseline", **common,
                                **{key: base_weights}))
    names = [v.name for v in variants]
    result = evaluate(variants, ref, out_dir, settings, candidates=names, progress=progress,
                      labelled_with=labelled_with, campplus_onnx=Path(model_dir) / "campplus.onnx")
    assert result.selection is not None
    winner = next(v for v in variants if v.name == result.selection.winner)
    src = getattr(winner, key)
    if src is None:
        raise DataError("selection produced no weights")  # unreachable: every candidate has weights
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    record = {"kind": kind, "winner": winner.name, "weights": str(src), "written": str(dst),
              "why": result.selection.reasons, "eliminated": result.selection.eliminated,
              "rule": result.selection.rule, "scorecard": str(result.paths["html"]),
              "averaged": [c.name for c in res_avg.sources], "asr_status": result.card["asr_status"]}
    write_json(dst.with_suffix(".selection.json"), record)
    return result, record


def select_for_run(work: Path, base_model: Path, speaker: str, kind: str, *, num: int, settings: EvalSettings,
                   spk2embedding_pt: Path, labelled_with: str | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """``cosytune run --select scorecard``'s average stage: pick ``exp/<kind>``'s weights by the scorecard and
    write them to ``exp/<kind>/<kind>_avg.pt`` (what the assemble stage packages).

    The speaker is the SFT entry made from the training embeddings (what assemble will write), on the base
    model dir; the flow is selected with the LLM already selected, and the base flow is a candidate.
    """
    from cosytune.modeldir.package import load_spk2embedding, spk2info_from_embeddings

    work = Path(work)
    run_dir = work / "exp" / kind
    spk2info = spk2info_from_embeddings(load_spk2embedding(Path(spk2embedding_pt)), [speaker])
    ref = training_reference(work / "data")
    fixed = {"llm_ckpt": work / "exp" / "llm" / "llm_avg.pt"} if kind == "flow" else None
    _, record = select_weights(run_dir, run_dir / f"{kind}_avg.pt", model_dir=base_model, spk_id=speaker,
                               spk2info=spk2info, kind=kind, num=num, settings=settings, ref=ref,
                               base_weights=Path(base_model) / "flow.pt" if kind == "flow" else None,
                               out_dir=work / "eval" / f"select_{kind}", fixed=fixed,
                               labelled_with=labelled_with, progress=progress)
    return record

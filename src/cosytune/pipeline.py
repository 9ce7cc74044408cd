"""``cosytune run``: every stage from a folder of recordings to a tuned speaker model dir.

Work dir layout (made for people to find things)::

    WORK/
      run.yaml                 the resolved settings of this run
      state.json               per stage: its key, what it read, when it finished; a cache of file hashes
      data/wavs/               24 kHz mono wavs, prepared.jsonl, rejects.jsonl   (prepare-audio)
      data/train/, data/dev/   Kaldi dirs, metadata, review.tsv, embeddings, tokens, parquet/
      exp/llm/, exp/flow/      training runs (checkpoints, TensorBoard, train_config.yaml)
      models/<speaker>/        the tuned model dir (base files linked + llm.pt [+ flow.pt] + spk2info.pt)
      out/tuned/               sample synthesis (+ run.json); out/tuned_llm_base_flow/ with --train_flow

Each stage is one :class:`Stage`: its ``inputs`` (settings, the files it reads, the stages it comes after),
its ``outputs`` and its ``run``, which calls the same library function as the standalone command
(:mod:`cosytune.steps`, :func:`cosytune.train.api.run_training`, :func:`cosytune.infer.single.synthesize_to_file`),
so its progress bar and summary are shown and its errors reach the user unchanged.

The skip rule: a stage's key is the hash of its settings, the content hashes of every file it reads
(including what earlier stages wrote) and the run ids of the stages it comes after. It is skipped when
the key equals the one recorded when it last finished and its outputs exist. Otherwise it runs — and
since it then gets a new run id, so does everything after it. A stage that runs with a key other than
the one an interrupted attempt started with starts fresh (training clears its run dir, extraction
recomputes every utterance); with the same key it continues where it stopped. ``--force STAGE`` redoes
that stage from scratch and what comes after it. File hashes are cached by (path, size, mtime_ns) in
state.json, so large files are hashed once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from cosytune.errors import ConfigError, DataError, UsageError
from cosytune.fileio import exclusive_lock, read_jsonl, sha256_file, sha256_json, write_json

logger = logging.getLogger(__name__)

SAMPLE_SEED = 1986
"""Seed of the sample synthesis, so re-runs of the same model give the same sample."""


@dataclass(frozen=True)
class RunConfig:
    """Settings of one ``cosytune run`` (its flags are generated from these fields and their docs)."""

    audio: Path
    """Folder of recordings of one speaker."""
    speaker: str
    """Speaker name, used as spk_id (letters, digits, '.', '_', '-')."""
    base_model: Path
    """Base model dir, e.g. Fun-CosyVoice3-0.5B."""
    work: Path
    """Work dir (data/, exp/, models/, out/)."""
    transcripts: Path | None = None
    """A 'name|text' file with your own transcripts instead of ASR."""
    backend: Literal["auto", "transcripts", "faster-whisper", "openai-whisper"] = "auto"
    """Where the text comes from; auto: --transcripts if given, else faster-whisper."""
    whisper_model: str = "large-v3"
    """faster-whisper model name or local dir."""
    language: str | None = None
    """Language code for ASR (none: detect)."""
    compute_type: str = "default"
    """faster-whisper compute type (e.g. float16, int8_float16)."""
    vad_filter: bool = True
    """faster-whisper's voice-activity filter."""
    initial_prompt: str | None = "auto"
    """faster-whisper initial prompt (auto: a punctuation hint for Chinese; none: no prompt)."""
    review: bool = False
    """Stop after transcription so you can check data/review.tsv; then run 'cosytune apply-review --dir
    WORK/data' and the same command without --review."""
    train_flow: bool = False
    """Also fine-tune the flow (on small data it tends to hurt clarity)."""
    llm_epochs: int = 0
    """Max LLM epochs (0: scaled to the data size)."""
    flow_epochs: int = 0
    """Max flow epochs (0: scaled to the data size)."""
    num_average: int = 5
    """Checkpoints to average (lowest CV loss)."""
    select: Literal["cv_loss", "scorecard"] = "cv_loss"
    """How the weights are picked: cv_loss averages the num_average best checkpoints by CV loss; scorecard
    also synthesises held-out sentences with that average and with each checkpoint (and the base flow) and
    keeps the best by the rule of 'cosytune eval' (exp/<llm|flow>/*_avg.selection.json says why)."""
    select_sentences: int = 0
    """With --select scorecard: shipped sentences per language to score (0: all)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for ASR, training and the sample."""
    num_workers: int = 0
    """Data-loading workers for training."""
    sample_text: str | None = None
    """Text of the sample synthesis at the end (none: a sentence in the language of your transcripts)."""
    sample_seed: int = SAMPLE_SEED
    """Seed of the sample synthesis."""
    train_overrides: tuple[str, ...] = ()
    """Training overrides (key=value)."""


#: The sample sentence of the last stage, by the language most of the training text is in.
SAMPLE_TEXTS = {
    "en": "Hello! This is my new voice, made with cosytune.",
    "zh": "你好！这是我用 cosytune 做出来的新声音。",
}


def data_language(texts: Iterable[str]) -> str:
    """``zh`` when most characters of the texts are CJK ideographs, else ``en``."""
    cjk = other = 0
    for t in texts:
        for ch in t:
            if "\u4e00" <= ch <= "\u9fff":
                cjk += 1
            elif ch.isalpha():
                other += 1
    return "zh" if cjk > other / 3 else "en"  # a CJK character carries about as much as 3 Latin letters


@dataclass
class StageResult:
    name: str
    status: str  # "done" | "skipped" | "not requested"
    seconds: float = 0.0
    note: str = ""


@dataclass
class RunResult:
    stages: list[StageResult] = field(default_factory=list)
    model_dir: Path | None = None
    listen: list[Path] = field(default_factory=list)
    review: Path | None = None  # set when the run stopped for the transcripts to be reviewed


@dataclass(frozen=True)
class Inputs:
    """What a stage's result depends on."""

    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # label → file it reads
    after: tuple[str, ...] = ()  # stages whose results it reads


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline. ``run(runner, ctx)`` returns a note for the summary (or raises)."""

    name: str
    inputs: Callable[[Runner], Inputs]
    outputs: Callable[[Runner], list[Path]]
    run: Callable[[Runner, StageContext], str]


@dataclass(frozen=True)
class StageContext:
    key: str
    fresh: bool  # do not continue partial results of an earlier attempt
    forced: bool


class NotRequested(Exception):
    """Raised by a stage's run when the settings leave it out (e.g. flow training without --train_flow)."""


def scaled_epochs(minutes: float) -> int:
    """Epochs for speaker SFT scaled to the usable minutes: about 150 minutes of audio seen in
    total, at least 10 and at most 40 epochs (10 min → 15 epochs). Early stopping on the CV loss
    ends runs sooner when they stop improving."""
    if minutes <= 0:
        return 10
    return int(min(40, max(10, math.ceil(150 / minutes))))


class FileHashes:
    """Content hashes of files, cached by (resolved path, size, mtime_ns)."""

    def __init__(self, cache: dict | None = None) -> None:
        self.cache: dict[str, list] = dict(cache or {})

    def digest(self, path: Path) -> str:
        p = Path(path).resolve()
        try:
            st = p.stat()
        except OSError:
            return "missing"
        if not p.is_file():
            return "missing"
        hit = self.cache.get(str(p))
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = sha256_file(p)
        self.cache[str(p)] = [st.st_size, st.st_mtime_ns, h]
        return h

    def pruned(self) -> dict[str, list]:
        """The cache without entries of files that no longer exist."""
        return {k: v for k, v in self.cache.items() if os.path.isfile(k)}


def tree(root: Path, label: str, pattern: str = "*", exclude: Iterable[str] = ()) -> dict[str, Path]:
    """Every file under ``root`` matching ``pattern`` as {label/relative path: path} (one file: {label: root})."""
    root = Path(root)
    if root.is_file():
        return {label: root}
    skip = tuple(exclude)
    return {f"{label}/{p.relative_to(root).as_posix()}": p for p in sorted(root.rglob(pattern))
            if p.is_file() and not p.name.endswith(skip)}


def _explain(old: dict[str, str] | None, new: dict[str, str]) -> str:
    """Which recorded inputs differ, for the stage's note."""
    if not old:
        return ""
    settings, changed, after = [], [], []
    for k in sorted(set(old) | set(new)):
        if old.get(k) == new.get(k):
            continue
        if k.startswith("after:"):
            after.append(k[len("after:"):])
        elif k.startswith("setting:"):
            settings.append(f"{k[len('setting:'):]} changed")
        elif k not in old:
            changed.append(f"{k} added")
        elif k not in new:
            changed.append(f"{k} removed")
        else:
            changed.append(f"{k} changed")
    if len(changed) > 4:
        changed = changed[:3] + [f"{len(changed) - 3} more files changed"]
    changed = settings + changed
    parts = [", ".join(changed)] if changed else []
    if after:
        parts.append("after " + ", ".join(after) + " re-ran")
    return "; ".join(parts)


class Runner:
    """Runs the stages of one work dir; see the module docstring."""

    def __init__(self, cfg: RunConfig, progress: bool = True) -> None:
        self.cfg = replace(cfg, audio=cfg.audio.resolve(), base_model=cfg.base_model.resolve(),
                           work=cfg.work.resolve(), transcripts=cfg.transcripts.resolve() if cfg.transcripts else None)
        self.w = self.cfg.work
        self.progress = progress
        self.state_path = self.w / "state.json"
        self.state: dict = {}
        if self.state_path.exists():
            try:
                self.state = json.loads(self.state_path.read_text(encoding="utf-8"))
            except ValueError:
                logger.warning("%s is unreadable; every stage will be checked again", self.state_path)
        self.hashes = FileHashes(self.state.get("_file_hashes"))

    # paths ---------------------------------------------------------------------------------------
    @property
    def wavs(self) -> Path:
        return self.w / "data" / "wavs"

    @property
    def data(self) -> Path:
        return self.w / "data"

    def split(self, name: str) -> Path:
        return self.data / name

    @property
    def splits(self) -> tuple[Path, Path]:
        return self.split("train"), self.split("dev")

    @property
    def model_dir(self) -> Path:
        return self.w / "models" / self.cfg.speaker

    def run_dir(self, kind: str) -> Path:
        return self.w / "exp" / kind

    # helpers -------------------------------------------------------------------------------------
    def work_files(self, names: Iterable[str], dirs: Iterable[Path] | None = None) -> dict[str, Path]:
        """{work-relative label: path} of ``names`` in each of ``dirs`` (default: train and dev)."""
        return {(d / n).relative_to(self.w).as_posix(): d / n for d in (dirs or self.splits) for n in names}

    def prepared_wavs(self) -> dict[str, Path]:
        return tree(self.wavs, "data/wavs", "*.wav")

    def _usable_minutes(self) -> float:
        meta = self.data / "metadata.jsonl"
        if not meta.exists():
            return 0.0
        rows = read_jsonl(meta)
        return sum(float(r.get("duration", r.get("duration_s", 0.0)) or 0.0) for r in rows) / 60

    def sample_text(self) -> str:
        """``--sample_text``, else a sentence in the language of the training transcripts."""
        if self.cfg.sample_text:
            return self.cfg.sample_text
        meta = self.data / "metadata.jsonl"
        texts = [str(r.get("text", "")) for r in read_jsonl(meta)] if meta.exists() else []
        return SAMPLE_TEXTS[data_language(texts)]

    def epochs(self, given: int) -> int:
        return given if given > 0 else scaled_epochs(self._usable_minutes())

    def _save_state(self) -> None:
        self.state["_file_hashes"] = self.hashes.pruned()
        write_json(self.state_path, self.state)

    # the skip rule -------------------------------------------------------------------------------
    def digests(self, stage: Stage) -> dict[str, str]:
        """{input label: digest} of everything ``stage`` depends on (recorded, and compared to explain re-runs)."""
        spec = stage.inputs(self)
        d = {f"setting:{k}": json.dumps(v, sort_keys=True, default=str) for k, v in spec.settings.items()}
        d.update({label: self.hashes.digest(p) for label, p in spec.files.items()})
        d.update({f"after:{s}": self.state.get(s, {}).get("run", "not run") for s in spec.after})
        return d

    def stage_key(self, stage: Stage) -> tuple[str, dict[str, str]]:
        d = self.digests(stage)
        return sha256_json(d), d

    def run(self, start: str | None = None, until: str | None = None, force: tuple[str, ...] = ()) -> RunResult:
        for s in (start, until, *force):
            if s is not None and s not in STAGES:
                raise UsageError(f"unknown stage {s!r}; stages are: {', '.join(STAGES)}")
        if not self.cfg.audio.is_dir():
            raise DataError(f"--audio {self.cfg.audio} is not a folder; point it at your recordings")
        if not self.cfg.base_model.is_dir():
            raise DataError(f"--base_model {self.cfg.base_model} is not a folder; point it at Fun-CosyVoice3-0.5B "
                            "(or make a test model with 'cosytune init-model --preset tiny --out DIR')")
        if self.w == self.cfg.audio or self.cfg.audio in self.w.parents:
            raise UsageError(f"--work {self.w} is inside --audio {self.cfg.audio}: the next run would read the work "
                             "dir's own wavs back as recordings. Put the work dir outside the recordings folder")
        transcribe_config(self.cfg)  # a bad --speaker (or other transcribe setting) fails now, not stages later
        i0 = STAGES.index(start) if start else 0
        i1 = STAGES.index(until) if until else len(STAGES) - 1
        if self.cfg.review:
            i1 = min(i1, STAGES.index("transcribe"))
        result = RunResult()
        with exclusive_lock(self.w, "work dir"):
            from cosytune.config.loading import dump_config

            dump_config(self.cfg, self.w / "run.yaml")
            for stage in PIPELINE[i0:i1 + 1]:
                result.stages.append(self._run_one(stage, stage.name in force))
        if (self.model_dir / "llm.pt").exists():
            result.model_dir = self.model_dir
        result.listen = sorted((self.w / "out").rglob("*.wav")) if (self.w / "out").exists() else []
        if self.cfg.review:
            result.review = self.data / "review.tsv"
        return result

    def _run_one(self, stage: Stage, forced: bool) -> StageResult:
        name = stage.name
        key, digests = self.stage_key(stage)
        rec = self.state.get(name, {})
        outputs_ok = _outputs_intact(stage.outputs(self), rec.get("outputs"))
        if not forced and rec.get("key") == key and outputs_ok:
            logger.info("[%s] up to date, skipped", name)
            return StageResult(name, "skipped", note="unchanged since " + rec.get("done_at", "?"))
        running = self.state.setdefault("_running", {})
        resumed = running.get(name) == key and not forced
        if forced:
            why = "forced"
        elif resumed:
            why = "continued an interrupted run"
        elif rec.get("key") == key:
            why = "outputs were missing or changed since they were written"
        else:
            why = _explain(rec.get("inputs"), digests)
        logger.info("[%s] running%s", name, f" ({why})" if why else "")
        running[name] = key
        self._save_state()
        t0 = time.time()
        status = "done"
        try:
            note = stage.run(self, StageContext(key, fresh=not resumed, forced=forced))
        except NotRequested as e:
            status, note = "not requested", str(e)
        # A stage's outputs are part of later stages' inputs: hash them as they are now.
        key, digests = self.stage_key(stage)
        self.state[name] = {"key": key, "run": uuid.uuid4().hex, "done_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "inputs": digests, "outputs": _identities(stage.outputs(self))}
        running.pop(name, None)
        self._save_state()
        notes = "; ".join(n for n in (note, "" if status != "done" else why) if n)
        return StageResult(name, status, time.time() - t0, notes)


def _identities(paths: Iterable[Path]) -> dict[str, list[int] | None]:
    """(size, mtime_ns) of each output as written: any later truncation or replacement changes it."""
    out: dict[str, list[int] | None] = {}
    for p in paths:
        try:
            st = p.stat()
            out[str(p)] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[str(p)] = None
    return out


def _outputs_intact(paths: list[Path], recorded: dict | None) -> bool:
    """Every output exists and, where its identity was recorded, is still the file the stage wrote."""
    now = _identities(paths)
    if any(v is None for v in now.values()):
        return False
    return recorded is None or all(recorded.get(k, v) == v for k, v in now.items())


# stages --------------------------------------------------------------------------------------------

def _prepare_inputs(r: Runner) -> Inputs:
    return Inputs(files=tree(r.cfg.audio, "audio"))


def _prepare_run(r: Runner, ctx: StageContext) -> str:
    from cosytune.data.prepare_audio import PrepareAudioConfig
    from cosytune.steps import run_prepare_audio

    if ctx.forced and r.wavs.exists():
        shutil.rmtree(r.wavs)
    run_prepare_audio(r.cfg.audio, r.wavs, PrepareAudioConfig(), show_progress=r.progress)
    return ""


def _backend(r: Runner) -> str:
    c = r.cfg
    return c.backend if c.backend != "auto" else ("transcripts" if c.transcripts else "faster-whisper")


def _transcribe_inputs(r: Runner) -> Inputs:
    c = r.cfg
    files = {**r.prepared_wavs(), **r.work_files(["prepared.jsonl", "rejects.jsonl"], [r.wavs])}
    if c.transcripts:
        files.update(tree(c.transcripts, c.transcripts.name))
    asr = _backend(r) != "transcripts"
    return Inputs(settings={"backend": _backend(r), "speaker": c.speaker, "language": c.language,
                            "whisper_model": c.whisper_model if asr else None,
                            "asr_options": [c.compute_type, c.vad_filter, c.initial_prompt] if asr else None},
                  files=files, after=("prepare-audio",))


def transcribe_config(cfg: RunConfig) -> Any:
    """The :class:`TranscribeConfig` a run uses (built at the start too, so a bad --speaker fails at once)."""
    from cosytune.data.transcribe import TranscribeConfig

    backend = cfg.backend if cfg.backend != "auto" else ("transcripts" if cfg.transcripts else "faster-whisper")
    kw: dict[str, Any] = {"backend": backend, "speaker": cfg.speaker, "transcripts": cfg.transcripts,
                          "language": cfg.language}
    if backend != "transcripts":
        kw.update(whisper_model=cfg.whisper_model, device=cfg.device, compute_type=cfg.compute_type,
                  vad_filter=cfg.vad_filter, initial_prompt=cfg.initial_prompt)
    try:
        return TranscribeConfig(**kw)
    except ValueError as e:  # its own checks (e.g. a --speaker with a space): a usage problem, said at once
        raise ConfigError(str(e).split("; "), source="cosytune run") from e


def _transcribe_run(r: Runner, ctx: StageContext) -> str:
    from cosytune.steps import run_transcribe

    run_transcribe(r.wavs, r.data, transcribe_config(r.cfg), show_progress=r.progress)
    return ""


def _onnx_inputs(onnx: str, kaldi: list[str]) -> Callable[[Runner], Inputs]:
    def inputs(r: Runner) -> Inputs:
        return Inputs(files={**r.work_files(kaldi), **r.prepared_wavs(), f"base/{onnx}": r.cfg.base_model / onnx},
                      after=("transcribe",))
    return inputs


def _embedding_run(r: Runner, ctx: StageContext) -> str:
    from cosytune.steps import run_extract_embedding

    for d in r.splits:
        run_extract_embedding(d, r.cfg.base_model / "campplus.onnx", force=ctx.fresh, show_progress=r.progress)
    return ""


def _speech_token_run(r: Runner, ctx: StageContext) -> str:
    from cosytune.steps import run_extract_speech_token

    for d in r.splits:
        run_extract_speech_token(d, r.cfg.base_model / "speech_tokenizer_v3.onnx", force=ctx.fresh,
                                 show_progress=r.progress)
    return ""


FEATURES = ("utt2embedding.pt", "spk2embedding.pt", "utt2speech_token.pt")


def _parquet_inputs(r: Runner) -> Inputs:
    names = ["wav.scp", "text", "utt2spk", "instruct", "rejects.jsonl", *FEATURES]
    return Inputs(files={**r.work_files(names), **r.prepared_wavs()},
                  after=("extract-embedding", "extract-speech-token"))


def _parquet_run(r: Runner, ctx: StageContext) -> str:
    from cosytune.steps import run_make_parquet

    for d in r.splits:
        run_make_parquet(d, d / "parquet", force=ctx.fresh, show_progress=r.progress)
    return ""


def _train_inputs(kind: str) -> Callable[[Runner], Inputs]:
    def inputs(r: Runner) -> Inputs:
        c = r.cfg
        if kind == "flow" and not c.train_flow:
            return Inputs(settings={"requested": False})
        base = c.base_model
        files: dict[str, Path] = {}
        for d in r.splits:
            files.update(tree(d / "parquet", f"{d.relative_to(r.w).as_posix()}/parquet"))
        files.update({f"base/{n}": base / n for n in ("cosyvoice3.yaml", f"{kind}.pt")})
        files.update(tree(base / "CosyVoice-BlankEN", "base/CosyVoice-BlankEN"))
        epochs = r.epochs(c.llm_epochs if kind == "llm" else c.flow_epochs)
        return Inputs(settings={"model": kind, "max_epoch": epochs, "overrides": list(c.train_overrides)},
                      files=files, after=("make-parquet",))
    return inputs


def _train_run(kind: str) -> Callable[[Runner, StageContext], str]:
    def run(r: Runner, ctx: StageContext) -> str:
        from cosytune.train.api import TrainRequest, run_training

        c = r.cfg
        if kind == "flow" and not c.train_flow:
            raise NotRequested("add --train_flow; small-data flow training often hurts clarity")
        tr, dv = r.splits
        epochs = r.epochs(c.llm_epochs if kind == "llm" else c.flow_epochs)
        out = run_training(TrainRequest(
            model=kind, train_data=tr / "parquet" / "data.list", cv_data=dv / "parquet" / "data.list",
            run_dir=r.run_dir(kind), base_model_dir=c.base_model, onnx_path=c.base_model,
            overrides=c.train_overrides, max_epoch=epochs, device=c.device, num_workers=c.num_workers,
            inputs_key=ctx.key, restart=ctx.fresh,
        ))
        return f"{epochs} epochs max" + (f"; cleared the earlier run ({out.cleared})" if out.cleared else "")
    return run


def _train_outputs(kind: str) -> Callable[[Runner], list[Path]]:
    def outputs(r: Runner) -> list[Path]:
        from cosytune.train.api import CONFIG_NAME

        if kind == "flow" and not r.cfg.train_flow:
            return []
        return [r.run_dir(kind) / CONFIG_NAME]
    return outputs


def _kinds(r: Runner) -> tuple[str, ...]:
    return ("llm", "flow") if r.cfg.train_flow else ("llm",)


def _average_inputs(r: Runner) -> Inputs:
    files: dict[str, Path] = {}
    for kind in _kinds(r):
        label = r.run_dir(kind).relative_to(r.w).as_posix()
        files.update(tree(r.run_dir(kind), label, "epoch_*", exclude=(".state.pt",)))
    if r.cfg.select == "scorecard":  # the speaker embedding feeds the candidates' synthesis
        files.update(r.work_files(["spk2embedding.pt"], [r.split("train")]))
        return Inputs(settings={"num": r.cfg.num_average, "kinds": list(_kinds(r)), "select": "scorecard",
                                "select_sentences": r.cfg.select_sentences}, files=files,
                      after=("train-llm", "train-flow", "extract-embedding"))
    return Inputs(settings={"num": r.cfg.num_average, "kinds": list(_kinds(r))}, files=files,
                  after=("train-llm", "train-flow"))


def _average_run(r: Runner, ctx: StageContext) -> str:
    from cosytune.steps import run_average

    if r.cfg.select == "scorecard":
        return _select_by_scorecard(r)
    for kind in _kinds(r):
        run = r.run_dir(kind)
        run_average(run, run / f"{kind}_avg.pt", num=r.cfg.num_average, val_best=True)
    return ""


def _select_by_scorecard(r: Runner) -> str:
    """``--select scorecard``: the scorecard picks each network's weights (see cosytune.evaluation.api)."""
    from cosytune.evaluation.api import EvalSettings, select_for_run

    c = r.cfg
    whisper = c.whisper_model if _backend(r) in ("faster-whisper", "openai-whisper") else None
    settings = EvalSettings(max_sentences=c.select_sentences, device=c.device, asr_model=whisper)
    notes = []
    for kind in _kinds(r):
        rec = select_for_run(r.w, c.base_model, c.speaker, kind, num=c.num_average, settings=settings,
                             spk2embedding_pt=r.split("train") / "spk2embedding.pt", labelled_with=whisper,
                             progress=r.progress)
        notes.append(f"{kind}: scorecard picked {rec['winner']} ({'; '.join(rec['why'])})")
    return "; ".join(notes)


def _avg_files(r: Runner) -> dict[str, Path]:
    return {f"exp/{k}/{k}_avg.pt": r.run_dir(k) / f"{k}_avg.pt" for k in _kinds(r)}


def _base_files(r: Runner) -> dict[str, Path]:
    """The base model files a model dir is assembled from."""
    from cosytune.modeldir.package import BASE_DIRS, BASE_FILES

    out = {f"base/{n}": r.cfg.base_model / n for n in BASE_FILES}
    for d in BASE_DIRS:
        out.update(tree(r.cfg.base_model / d, f"base/{d}"))
    return out


def _assemble_inputs(r: Runner) -> Inputs:
    return Inputs(settings={"speaker": r.cfg.speaker, "train_flow": r.cfg.train_flow},
                  files={**_avg_files(r), **r.work_files(["spk2embedding.pt"], [r.split("train")]),
                         **_base_files(r)},
                  after=("average", "extract-embedding"))


def _assemble_run(r: Runner, ctx: StageContext) -> str:
    from cosytune.steps import run_assemble

    c = r.cfg
    run_assemble(c.base_model, r.model_dir, r.run_dir("llm") / "llm_avg.pt",
                 flow_pt=r.run_dir("flow") / "flow_avg.pt" if c.train_flow else None,
                 spk2embedding_pt=r.split("train") / "spk2embedding.pt", spk_ids=[c.speaker], overwrite=True)
    return ""


def _synthesize_inputs(r: Runner) -> Inputs:
    c = r.cfg
    files = tree(r.model_dir, f"models/{c.speaker}")
    if c.train_flow:
        files["base/flow.pt"] = c.base_model / "flow.pt"
    return Inputs(settings={"text": r.sample_text(), "seed": c.sample_seed, "speaker": c.speaker,
                            "train_flow": c.train_flow},
                  files=files, after=("assemble",))


def _synthesize_run(r: Runner, ctx: StageContext) -> str:
    from cosytune.infer.single import SegmentRequest, synthesize_to_file
    from cosytune.infer.synthesizer import SynthesisOptions, Synthesizer

    c = r.cfg
    out = r.w / "out"
    # One folder per variant: each keeps its own run.json beside the wav.
    variants = [(out / "tuned" / "sample.wav", None)]
    if c.train_flow:
        variants.append((out / "tuned_llm_base_flow" / "sample.wav", c.base_model / "flow.pt"))
    text = r.sample_text()
    for wav, flow_ckpt in variants:
        t0 = time.perf_counter()
        # one sentence: capture only the shapes it uses, not every common one (Synthesizer.warmup)
        synth = Synthesizer.from_dir(r.model_dir, device=c.device, flow_ckpt=flow_ckpt, warmup=False)
        load_s = time.perf_counter() - t0
        req = SegmentRequest(text=text, out_wav=wav, spk_id=c.speaker,
                             options=SynthesisOptions(seed=c.sample_seed))
        settings = {"command": "run", "model_dir": r.model_dir, "spk_id": c.speaker, "text": text,
                    "seed": c.sample_seed, "device": c.device, "flow_ckpt": flow_ckpt, "out_wav": wav}
        synthesize_to_file(synth, req, settings=settings, load_s=load_s)
    return ""


PIPELINE: tuple[Stage, ...] = (
    Stage("prepare-audio", _prepare_inputs, lambda r: [r.wavs / "prepared.jsonl"], _prepare_run),
    Stage("transcribe", _transcribe_inputs,
          lambda r: [r.split("train") / "wav.scp", r.split("dev") / "wav.scp", r.data / "metadata.jsonl"],
          _transcribe_run),
    Stage("extract-embedding", _onnx_inputs("campplus.onnx", ["wav.scp", "utt2spk"]),
          lambda r: [r.split("train") / "spk2embedding.pt", r.split("dev") / "utt2embedding.pt"], _embedding_run),
    Stage("extract-speech-token", _onnx_inputs("speech_tokenizer_v3.onnx", ["wav.scp"]),
          lambda r: [d / "utt2speech_token.pt" for d in r.splits], _speech_token_run),
    Stage("make-parquet", _parquet_inputs, lambda r: [d / "parquet" / "data.list" for d in r.splits], _parquet_run),
    Stage("train-llm", _train_inputs("llm"), _train_outputs("llm"), _train_run("llm")),
    Stage("train-flow", _train_inputs("flow"), _train_outputs("flow"), _train_run("flow")),
    Stage("average", _average_inputs, lambda r: list(_avg_files(r).values()), _average_run),
    Stage("assemble", _assemble_inputs, lambda r: [r.model_dir / "llm.pt", r.model_dir / "spk2info.pt"],
          _assemble_run),
    Stage("synthesize", _synthesize_inputs, lambda r: [r.w / "out" / "tuned" / "sample.wav"], _synthesize_run),
)

STAGES: tuple[str, ...] = tuple(s.name for s in PIPELINE)

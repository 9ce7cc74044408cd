"""``cosytune run``: every stage from a folder of recordings to a tuned speaker model dir.

Work dir layout (made for people to find things)::

    WORK/
      run.yaml                 the resolved settings of this run
      state.json               per stage: the hash of its inputs + settings, and when it finished
      data/wavs/               24 kHz mono wavs, prepared.jsonl, rejects.jsonl   (prepare-audio)
      data/train/, data/dev/   Kaldi dirs, metadata, review.tsv, embeddings, tokens, parquet/
      exp/llm/, exp/flow/      training runs (checkpoints, TensorBoard, config.yaml)
      models/<speaker>/        the tuned model dir (base files linked + llm.pt [+ flow.pt] + spk2info.pt)
      out/tuned/               sample synthesis (+ run.json); out/tuned_llm_base_flow/ with --train_flow

A stage is skipped when its recorded hash equals the hash of its current inputs (content hashes of
the files earlier stages produced, size+mtime fingerprints of the raw audio and base model) and
settings, and its outputs exist. Every stage is itself resumable, so an interrupted run — even in
the middle of training — continues where it stopped when started again. ``--from``, ``--until``
and ``--force`` select stages.

Each stage runs the same code as the standalone command (through :func:`cosytune.cli.main.main`),
so its progress bar and summary are shown as they would be on their own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cosytune.errors import CosytuneError, DataError, UsageError
from cosytune.fileio import read_jsonl, sha256_file, sha256_json, write_json

logger = logging.getLogger(__name__)

STAGES = (
    "prepare-audio", "transcribe", "extract-embedding", "extract-speech-token", "make-parquet",
    "train-llm", "train-flow", "average", "assemble", "synthesize",
)


@dataclass(frozen=True)
class RunConfig:
    """Settings of one ``cosytune run``."""

    audio: Path
    speaker: str
    base_model: Path
    work: Path
    transcripts: Path | None = None
    backend: str = "auto"  # auto: transcripts if given/side files exist, else faster-whisper
    whisper_model: str = "large-v3"
    language: str | None = None
    train_flow: bool = False
    llm_epochs: int = 0  # 0: scaled to the data size
    flow_epochs: int = 0
    num_average: int = 5
    device: str = "auto"
    sample_text: str = "Hello! This is my new voice, made with cosytune."
    train_overrides: tuple[str, ...] = ()
    num_workers: int = 0


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


def scaled_epochs(minutes: float) -> int:
    """Epochs for speaker SFT scaled to the usable minutes: about 150 minutes of audio seen in
    total, at least 10 and at most 40 epochs (10 min → 15 epochs). Early stopping on the CV loss
    ends runs sooner when they stop improving."""
    if minutes <= 0:
        return 10
    return int(min(40, max(10, math.ceil(150 / minutes))))


def _fingerprint_tree(root: Path) -> list:
    if root.is_file():
        st = root.stat()
        return [[root.name, st.st_size, int(st.st_mtime)]]
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out.append([str(p.relative_to(root)), st.st_size, int(st.st_mtime)])
    return out


def _hash_files(paths: list[Path]) -> dict[str, str | None]:
    return {str(p): (sha256_file(p) if p.is_file() else None) for p in paths}


class Runner:
    """Runs the stages of one work dir; see the module docstring."""

    def __init__(self, cfg: RunConfig, progress: bool = True,
                 cli: Callable[[list[str]], int] | None = None) -> None:
        self.cfg = cfg
        self.w = cfg.work
        self.progress = progress
        if cli is None:
            from cosytune.cli.main import main as cli
        self.cli = cli
        self.state_path = self.w / "state.json"
        self.state: dict = {}
        if self.state_path.exists():
            import json

            try:
                self.state = json.loads(self.state_path.read_text(encoding="utf-8"))
            except ValueError:
                logger.warning("%s is unreadable; every stage will be checked again", self.state_path)

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
    def model_dir(self) -> Path:
        return self.w / "models" / self.cfg.speaker

    # helpers -------------------------------------------------------------------------------------
    def _call(self, stage: str, argv: list[str]) -> None:
        if not self.progress:
            argv = argv + ["--no_progress"]
        logger.info("[%s] cosytune %s", stage, " ".join(argv))
        rc = self.cli(argv)
        if rc != 0:
            raise CosytuneError(
                f"stage {stage} failed (exit {rc}); fix the problem above and run the same command again — "
                "finished stages are skipped"
            )

    def _usable_minutes(self) -> float:
        meta = self.data / "metadata.jsonl"
        if not meta.exists():
            return 0.0
        rows = read_jsonl(meta)
        return sum(float(r.get("duration", r.get("duration_s", 0.0)) or 0.0) for r in rows) / 60

    def _epochs(self, given: int) -> int:
        return given if given > 0 else scaled_epochs(self._usable_minutes())

    # stages --------------------------------------------------------------------------------------
    def stage_inputs(self, name: str) -> dict:
        """What a stage's skip decision depends on (settings + input hashes)."""
        c, base = self.cfg, self.cfg.base_model
        tr, dv = self.split("train"), self.split("dev")
        if name == "prepare-audio":
            return {"audio": _fingerprint_tree(c.audio)}
        if name == "transcribe":
            return {"prepared": _hash_files([self.wavs / "prepared.jsonl"]), "backend": c.backend,
                    "transcripts": _fingerprint_tree(c.transcripts) if c.transcripts else None,
                    "speaker": c.speaker, "whisper": c.whisper_model, "language": c.language}
        kaldi = _hash_files([d / f for d in (tr, dv) for f in ("wav.scp", "text", "utt2spk", "instruct")])
        if name == "extract-embedding":
            return {"kaldi": kaldi, "onnx": _fingerprint_tree(base / "campplus.onnx")}
        if name == "extract-speech-token":
            return {"kaldi": kaldi, "onnx": _fingerprint_tree(base / "speech_tokenizer_v3.onnx")}
        feats = _hash_files([d / f for d in (tr, dv) for f in ("utt2embedding.pt", "spk2embedding.pt",
                                                                 "utt2speech_token.pt")])
        if name == "make-parquet":
            return {"kaldi": kaldi, "feats": feats}
        lists = _hash_files([tr / "parquet" / "data.list", dv / "parquet" / "data.list"])
        base_fp = {f: _fingerprint_tree(base / f) for f in ("cosyvoice3.yaml", "llm.pt", "flow.pt")}
        if name == "train-llm":
            return {"lists": lists, "base": base_fp, "epochs": self._epochs(c.llm_epochs),
                    "overrides": list(c.train_overrides)}
        if name == "train-flow":
            return {"lists": lists, "base": base_fp, "epochs": self._epochs(c.flow_epochs),
                    "overrides": list(c.train_overrides), "requested": c.train_flow}
        if name == "average":
            return {"llm": self.state.get("train-llm", {}).get("hash"),
                    "flow": self.state.get("train-flow", {}).get("hash"), "num": c.num_average}
        if name == "assemble":
            return {"avg": _hash_files([self.w / "exp" / "llm" / "llm_avg.pt", self.w / "exp" / "flow" / "flow_avg.pt"]),
                    "spk": _hash_files([tr / "spk2embedding.pt"]), "base": _fingerprint_tree(base)}
        if name == "synthesize":
            return {"model": _hash_files([self.model_dir / "llm.pt", self.model_dir / "spk2info.pt"]),
                    "text": c.sample_text}
        raise UsageError(f"unknown stage {name}")

    def outputs_exist(self, name: str) -> bool:
        tr, dv = self.split("train"), self.split("dev")
        need = {
            "prepare-audio": [self.wavs / "prepared.jsonl"],
            "transcribe": [tr / "wav.scp", dv / "wav.scp", self.data / "metadata.jsonl"],
            "extract-embedding": [tr / "spk2embedding.pt", dv / "utt2embedding.pt"],
            "extract-speech-token": [tr / "utt2speech_token.pt", dv / "utt2speech_token.pt"],
            "make-parquet": [tr / "parquet" / "data.list", dv / "parquet" / "data.list"],
            "train-llm": [self.w / "exp" / "llm" / "config.yaml"],
            "train-flow": [self.w / "exp" / "flow" / "config.yaml"] if self.cfg.train_flow else [],
            "average": [self.w / "exp" / "llm" / "llm_avg.pt"],
            "assemble": [self.model_dir / "llm.pt", self.model_dir / "spk2info.pt"],
            "synthesize": [self.w / "out" / "tuned" / "sample.wav"],
        }[name]
        return all(p.exists() for p in need)

    def run_stage(self, name: str) -> str:
        c = self.cfg
        tr, dv = self.split("train"), self.split("dev")
        base = c.base_model
        if name == "prepare-audio":
            self._call(name, ["prepare-audio", "--in_dir", str(c.audio), "--out_dir", str(self.wavs)])
        elif name == "transcribe":
            backend = c.backend
            argv = ["transcribe", "--wav_dir", str(self.wavs), "--out_root", str(self.data), "--spk_id", c.speaker]
            if backend == "auto":
                backend = "transcripts" if c.transcripts else "faster-whisper"
            argv += ["--backend", backend]
            if c.transcripts:
                argv += ["--transcripts", str(c.transcripts)]
            if backend != "transcripts":
                argv += ["--whisper_model", c.whisper_model, "--device", c.device]
            if c.language:
                argv += ["--language", c.language]
            self._call(name, argv)
        elif name in ("extract-embedding", "extract-speech-token"):
            onnx = "campplus.onnx" if name == "extract-embedding" else "speech_tokenizer_v3.onnx"
            for d in (tr, dv):
                self._call(name, [name, "--dir", str(d), "--onnx_path", str(base / onnx)])
        elif name == "make-parquet":
            for d in (tr, dv):
                self._call(name, ["make-parquet", "--src_dir", str(d), "--des_dir", str(d / "parquet")])
        elif name in ("train-llm", "train-flow"):
            kind = name.split("-")[1]
            if kind == "flow" and not c.train_flow:
                return "not requested (add --train_flow; small-data flow training often hurts clarity)"
            epochs = self._epochs(c.llm_epochs if kind == "llm" else c.flow_epochs)
            self._call(name, ["train", "--model", kind, "--train_data", str(tr / "parquet" / "data.list"),
                              "--cv_data", str(dv / "parquet" / "data.list"), "--base_model_dir", str(base),
                              "--onnx_path", str(base), "--model_dir", str(self.w / "exp" / kind),
                              "--device", c.device, "--num_workers", str(c.num_workers),
                              f"max_epoch={epochs}", *c.train_overrides])
            return f"{epochs} epochs max"
        elif name == "average":
            for kind in ("llm", "flow") if c.train_flow else ("llm",):
                run = self.w / "exp" / kind
                self._call(name, ["average", "--src_path", str(run), "--dst_model", str(run / f"{kind}_avg.pt"),
                                  "--num", str(c.num_average), "--val_best"])
        elif name == "assemble":
            argv = ["assemble", "--base_model_dir", str(base), "--out_model_dir", str(self.model_dir),
                    "--llm_pt", str(self.w / "exp" / "llm" / "llm_avg.pt"),
                    "--spk2embedding_pt", str(tr / "spk2embedding.pt"), "--spk_id", c.speaker, "--overwrite"]
            if c.train_flow:
                argv += ["--flow_pt", str(self.w / "exp" / "flow" / "flow_avg.pt")]
            self._call(name, argv)
        elif name == "synthesize":
            out = self.w / "out"
            common = ["infer", "--model_dir", str(self.model_dir), "--spk_id", c.speaker, "--text", c.sample_text,
                      "--seed", "1986", "--device", c.device]
            # One folder per variant: each keeps its own run.json beside the wav.
            self._call(name, common + ["--out_wav", str(out / "tuned" / "sample.wav")])
            if c.train_flow:
                self._call(name, common + ["--flow_ckpt", str(base / "flow.pt"),
                                           "--out_wav", str(out / "tuned_llm_base_flow" / "sample.wav")])
        return ""

    def run(self, start: str | None = None, until: str | None = None, force: tuple[str, ...] = ()) -> RunResult:
        for s in (start, until, *force):
            if s is not None and s not in STAGES:
                raise UsageError(f"unknown stage {s!r}; stages are: {', '.join(STAGES)}")
        if not self.cfg.audio.is_dir():
            raise DataError(f"--audio {self.cfg.audio} is not a folder; point it at your recordings")
        if not self.cfg.base_model.is_dir():
            raise DataError(f"--base_model {self.cfg.base_model} is not a folder; point it at Fun-CosyVoice3-0.5B "
                            "(or make a test model with 'cosytune init-model --preset tiny --out DIR')")
        i0 = STAGES.index(start) if start else 0
        i1 = STAGES.index(until) if until else len(STAGES) - 1
        result = RunResult()
        for i, name in enumerate(STAGES):
            if i < i0 or i > i1:
                continue
            key = sha256_json(self.stage_inputs(name))
            rec = self.state.get(name, {})
            if name not in force and rec.get("hash") == key and self.outputs_exist(name):
                result.stages.append(StageResult(name, "skipped", note="unchanged since " + rec.get("done_at", "?")))
                logger.info("[%s] up to date, skipped", name)
                continue
            t0 = time.time()
            note = self.run_stage(name)
            status = "done"
            if note.startswith("not requested"):
                status, note = "not requested", note[len("not requested"):].strip(" ()")
            self.state[name] = {"hash": key,
                                "done_at": time.strftime("%Y-%m-%d %H:%M:%S")}
            write_json(self.state_path, self.state)
            result.stages.append(StageResult(name, status, time.time() - t0, note))
        if (self.model_dir / "llm.pt").exists():
            result.model_dir = self.model_dir
        result.listen = sorted((self.w / "out").rglob("*.wav")) if (self.w / "out").exists() else []
        return result

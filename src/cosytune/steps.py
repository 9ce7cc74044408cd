"""The library entry points of the data and packaging commands, with their progress bars and summaries.

Each ``run_*`` function takes typed arguments, does the work (showing the command's progress bar when
``show_progress``), prints the command's summary when ``summary`` and returns the result object. The
``cosytune`` commands and ``cosytune run`` (:mod:`cosytune.pipeline`) both call these, so a stage of the
pipeline behaves and looks exactly like the standalone command.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from cosytune.console import print_summary, progress
from cosytune.errors import DataError

if TYPE_CHECKING:
    from cosytune.data.frontend_common import ExtractionSummary
    from cosytune.data.parquet import ParquetSummary
    from cosytune.data.prepare_audio import PrepareAudioConfig, PrepareSummary
    from cosytune.data.transcribe import TranscribeConfig, TranscribeSummary
    from cosytune.modeldir.package import AssembleResult
    from cosytune.train.average import AverageResult


def run_prepare_audio(in_dir: Path, out_dir: Path, cfg: PrepareAudioConfig, *, show_progress: bool = True,
                      summary: bool = True) -> PrepareSummary:
    """``cosytune prepare-audio``; raises DataError when no usable audio remains."""
    from cosytune.data.prepare_audio import prepare_audio

    s = prepare_audio(in_dir, out_dir, cfg, progress=show_progress)
    if summary:
        print_summary("prepare-audio", s.items())
    if s.num_outputs == 0:
        raise DataError(
            f"no usable audio remains: all {s.num_inputs} input file(s) were rejected "
            f"({', '.join(f'{k} {v}' for k, v in sorted(s.reject_counts.items()))}); see "
            f"{s.out_dir}/rejects.jsonl for each file's reason"
        )
    return s


def run_transcribe(in_dir: Path, out_dir: Path, cfg: TranscribeConfig, *, show_progress: bool = True,
                   summary: bool = True) -> TranscribeSummary:
    """``cosytune transcribe``."""
    from cosytune.data.transcribe import transcribe_dataset

    s = transcribe_dataset(in_dir, out_dir, cfg, progress=show_progress)
    if summary:
        print_summary("transcribe", s.items())
    return s


def _num_utts(data_dir: Path) -> int:
    from cosytune.data.frontend_common import read_kaldi_dir

    return len(read_kaldi_dir(data_dir).utt2wav)


def run_extract_embedding(data_dir: Path, onnx_path: Path, *, device: str = "auto", num_threads: int = 2,
                          force: bool = False, rejects_path: Path | None = None, show_progress: bool = True,
                          summary: bool = True) -> ExtractionSummary:
    """``cosytune extract-embedding``: utt2embedding.pt and spk2embedding.pt of a Kaldi dir."""
    from cosytune.data.embedding import extract_embeddings

    with progress(total=_num_utts(data_dir), desc="embeddings", enabled=show_progress) as bar:
        s = extract_embeddings(data_dir, onnx_path, device=device, num_threads=num_threads, force=force,
                               rejects_path=rejects_path, progress=bar.update)
    if summary:
        print_summary("extract-embedding", s.items())
    return s


def run_extract_speech_token(data_dir: Path, onnx_path: Path, *, device: str = "auto", num_threads: int = 2,
                             max_batch: int | None = None, force: bool = False, rejects_path: Path | None = None,
                             show_progress: bool = True, summary: bool = True) -> ExtractionSummary:
    """``cosytune extract-speech-token``: utt2speech_token.pt of a Kaldi dir."""
    from cosytune.data.speech_token import extract_speech_tokens

    with progress(total=_num_utts(data_dir), desc="speech tokens", enabled=show_progress) as bar:
        s = extract_speech_tokens(data_dir, onnx_path, device=device, num_threads=num_threads, max_batch=max_batch,
                                  force=force, rejects_path=rejects_path, progress=bar.update)
    if summary:
        print_summary("extract-speech-token", s.items())
    return s


def run_make_parquet(src_dir: Path, des_dir: Path, *, num_utts_per_parquet: int = 1000, num_processes: int = 1,
                     dpo: bool = False, force: bool = False, rejects_path: Path | None = None,
                     show_progress: bool = True, summary: bool = True) -> ParquetSummary:
    """``cosytune make-parquet``: training shards and data.list of a Kaldi dir."""
    from cosytune.data.parquet import make_parquet

    with progress(total=_num_utts(src_dir), desc="parquet", enabled=show_progress) as bar:
        s = make_parquet(src_dir, des_dir, num_utts_per_parquet=num_utts_per_parquet, num_processes=num_processes,
                         dpo=dpo, force=force, rejects_path=rejects_path, progress=bar.update)
    if summary:
        print_summary("make-parquet", [
            ("utterances written", s.utterances),
            ("shards", f"{s.shards} ({s.written} written, {s.reused} unchanged)"),
            ("columns", ", ".join(s.columns)),
            ("excluded", ", ".join(f"{k}: {v}" for k, v in sorted(s.excluded.items())) or "none"),
            ("data.list", s.data_list),
        ])
    return s


def run_average(src_path: Path, dst_model: Path, *, num: int = 5, val_best: bool = True,
                summary: bool = True) -> AverageResult:
    """``cosytune average``: the N best (or newest) checkpoints of a run dir averaged into one file."""
    from cosytune.train.average import average_checkpoints

    res = average_checkpoints(src_path, dst_model, num, val_best)
    if summary:
        print_summary("average", [
            ("output", res.dst_model),
            ("tensors", res.num_tensors),
            ("selection", "lowest CV loss" if val_best else "newest"),
        ] + [(f"  {c.name}", f"cv_loss={c.cv_loss}") for c in res.sources])
    return res


def run_assemble(base_model_dir: Path, out_model_dir: Path, llm_pt: Path, *, flow_pt: Path | None = None,
                 spk2embedding_pt: Path | None = None, spk_ids: list[str] | None = None, overwrite: bool = False,
                 summary: bool = True) -> AssembleResult:
    """``cosytune assemble``: base model files + tuned weights + spk2info.pt in one model dir."""
    from cosytune.modeldir.package import assemble

    res = assemble(base_model_dir, out_model_dir, llm_pt, flow_pt, spk2embedding_pt, spk_ids, overwrite)
    if summary:
        methods = Counter(res.linked.values())
        shared = methods.get("hardlink", 0) + methods.get("symlink", 0)
        note = (f"{shared} file(s) are the base dir's own files (links): replace them only by writing a new file "
                "and renaming it, or with cosytune assemble; `cp other.pt` onto one would change the base model too")
        print_summary("assemble", [
            ("model dir", res.out_dir),
            ("written", ", ".join(res.written)),
            ("flow", "tuned" if "flow.pt" in res.written else "base (linked)"),
            ("linked from base", ", ".join(f"{n} {m}" for m, n in methods.items())),
            ("speakers in spk2info.pt", ", ".join(res.speakers) or "(none written)"),
            *([("warning", note)] if shared else []),
        ])
    return res

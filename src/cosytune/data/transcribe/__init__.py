"""Transcription and dataset building: prepared wavs → metadata.jsonl + Kaldi train/dev dirs.

Role: the seed workflow's ``prepare_xuan_sft_dataset`` step, done properly. Input is the
out_dir of ``cosytune prepare-audio`` (24 kHz mono PCM16 wavs plus ``prepared.jsonl``, one row
per wav with ``wav``, ``utt``, ``source``, ``source_rel``, ``duration_s``, ``sample_rate``,
``segment_index``, ``num_segments``) or a plain folder of audio files (then each file is its
own source recording).

Text comes from a backend:

* ``transcripts``: the user's own text. ``--transcripts FILE`` holds ``name|text`` lines (or
  ``name<TAB>text``, or JSONL rows with a name key — ``name``/``file``/``path``/``audio``/
  ``wav``/``utt`` — and a ``text`` key) where name is the source file's path, its path relative
  to the input folder, its file name or its stem; without the flag a same-named ``.txt`` or
  ``.lab`` beside each *source* audio file is used. A single transcript of a recording that
  prepare-audio sliced cannot be split reliably, so such slices go to ASR when
  ``asr_fallback`` names a backend and otherwise become rejects (``sliced_source_needs_asr``).
* ``faster-whisper`` / ``openai-whisper``: ASR, imported lazily (extras ``asr`` / ``whisper``).
  Results are cached per utterance in ``asr_cache_<backend>.json`` (keyed by the wav's SHA-256
  and the decoding settings), so a re-run does not decode again.
* ``cross_check`` (optional): a second, independent transcript by an ASR backend of clips whose
  text came from elsewhere; rows whose character error rate against it exceeds
  ``max_disagreement`` are flagged ``asr_disagrees`` in the review file (a wrong or misplaced
  transcript shows up this way), never dropped.

Output (in out_dir):

* ``utterances.jsonl``: every candidate with readable audio, kept or not (the review base).
* ``metadata.jsonl``: kept utterances: ``utt``, ``wav``, ``duration_s``, ``sample_rate``,
  ``text``, ``speaker``, ``language``, ``instruct``, ``source``, ``source_rel``,
  ``segment_index``, ``num_segments``, ``split``, ``text_source``, ``edited``, ASR confidence
  (``asr_avg_logprob``, ``asr_no_speech_prob``, ``asr_compression_ratio``,
  ``asr_language_prob``; null without ASR), ``chars_per_s`` and review ``flags``.
* ``train/`` and ``dev/``: Kaldi dirs (see :mod:`cosytune.data.kaldi`) with ``instruct``.
* ``review.tsv``: the editable review file (see :mod:`cosytune.data.review`).
* ``rejects.jsonl``: rows of stage ``transcribe`` (plus the input folder's earlier stages).
* ``transcribe_config.yaml`` and ``transcribe_summary.json``.

Speaking-rate filter: see :mod:`~cosytune.data.transcribe.metrics`.

Modules, one job each: ``config`` (:class:`TranscribeConfig`), ``records`` (:class:`Utterance`,
:class:`TranscribeSummary`), ``metrics`` (text measures), ``discovery`` (finding the clips),
``transcripts`` and ``asr`` (the text backends), ``split`` (filters, review flags, train/dev split) and
``dataset`` (:func:`transcribe_dataset`, :func:`apply_review`). What the commands and the other
packages use is importable from this package; the rest from its module.

Reference: upstream-spec.md §7.6 (Kaldi files and the CosyVoice 3 instruct).
"""

from __future__ import annotations

from cosytune.data.transcribe.asr import (
    PUNCTUATION_PROMPTS,
    AsrCache,
    AsrResult,
    FasterWhisperBackend,
    OpenAIWhisperBackend,
    asr_settings,
    build_asr_backend,
)
from cosytune.data.transcribe.config import ASR_BACKENDS, TranscribeConfig
from cosytune.data.transcribe.dataset import STAGE, apply_review, transcribe_dataset
from cosytune.data.transcribe.discovery import AUDIO_EXTENSIONS, OTHER_MEDIA_EXTENSIONS, discover_inputs
from cosytune.data.transcribe.metrics import char_error_rate, guess_language, speakable_units
from cosytune.data.transcribe.records import TranscribeSummary, Utterance
from cosytune.data.transcribe.split import review_flags, split_train_dev
from cosytune.data.transcribe.transcripts import load_transcripts
from cosytune.text.special import DEFAULT_INSTRUCT

__all__ = [
    "ASR_BACKENDS", "AUDIO_EXTENSIONS", "DEFAULT_INSTRUCT", "OTHER_MEDIA_EXTENSIONS", "PUNCTUATION_PROMPTS", "STAGE",
    "AsrCache", "AsrResult", "FasterWhisperBackend", "OpenAIWhisperBackend", "TranscribeConfig",
    "TranscribeSummary", "Utterance", "apply_review", "asr_settings", "build_asr_backend", "char_error_rate",
    "discover_inputs", "guess_language", "load_transcripts", "review_flags", "speakable_units", "split_train_dev",
    "transcribe_dataset",
]

"""Training data: parquet shards (``data.list``) → filtered, featurised utterances → dynamic batches.

The stages follow upstream's pipeline (upstream-spec §7.3) with its filter values, but run once
per run instead of once per epoch, since a speaker set (10–60 min) fits in memory:

1. read every row of the shards listed in ``data.list`` (``utt``, ``audio_data``, ``text``, ``spk``,
   ``instruct`` and, when present, ``speech_token``, ``utt_embedding``, ``spk_embedding``);
2. tokenise ``text`` and ``instruct`` with the model's Qwen tokenizer;
3. filter (duration, text-token count, tokens per 10 ms frame) — every drop is counted by reason;
4. resample to 24 kHz, peak-normalise above 1, zero-pad to a multiple of 960 samples (one token),
   and compute the 80-bin 24 kHz mel for the flow;
5. speech tokens and embeddings: the offline ones when the shard has them, otherwise extracted
   online through the model dir's ONNX models (speech_tokenizer_v3 / campplus);
6. align tokens and mel: offline tokens come from the unpadded 16 kHz audio and can be one longer or
   shorter than ``mel_frames / 2`` — upstream crashes on that (its issues #1765, #1862); we cut
   both to the common length ``min(len(tokens), mel_frames // 2)`` and count it;
7. embeddings are L2-normalised; ``use_spk_embedding`` picks the speaker mean over the utterance's.

Each epoch's batch order depends only on ``(seed, epoch)``: shuffle, sort buckets of 500 by length,
pack greedily under the frame budget (longest × count ≤ ``max_frames_in_batch``), shuffle the batch
order, then deal batches to ranks so every rank gets the same number (no DDP hang on uneven data).

Batch keys: ``utts``, ``text_token``/``_len``, ``instruct_token``/``_len``, ``speech_token``/``_len``,
``speech_feat``/``_len`` (B, T, 80) for the flow, ``embedding`` (B, 192).
"""

from __future__ import annotations

import io
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cosytune.errors import DataError
from cosytune.train.config import DataConfig
from cosytune.train.loop import BatchSource

logger = logging.getLogger(__name__)

TOKEN_RATE_HZ = 25
MEL_RATE_HZ = 50
SAMPLES_PER_TOKEN_24K = 960


@dataclass
class Item:
    utt: str
    spk: str
    text_token: list[int]
    instruct_token: list[int]
    speech_token: list[int] | None
    speech_feat: torch.Tensor | None  # (T, 80)
    embedding: torch.Tensor | None  # (192,)
    frames: int  # 50 Hz length used for batching


def read_data_list(path: Path) -> list[Path]:
    """Shard paths from a ``data.list`` (relative paths are taken relative to the list's folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass the data.list written by cosytune make-parquet")
    shards = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        p = Path(line)
        if not p.is_absolute() and not p.exists():
            p = path.parent / p
        shards.append(p)
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise DataError(f"{path} lists shards that do not exist: {missing[:5]}; re-run make-parquet")
    if not shards:
        raise DataError(f"{path} lists no shards")
    return shards


def read_rows(shards: list[Path]) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for s in shards:
        try:
            table = pq.read_table(s)
        except Exception as e:  # boundary: a broken shard is a clear error, not a silent skip
            raise DataError(f"cannot read parquet shard {s}: {e}; re-run make-parquet") from e
        rows.extend(table.to_pylist())
    return rows


def decode_audio_bytes(data: bytes, utt: str) -> tuple[np.ndarray, int]:
    """Mono float32 audio from a shard's ``audio_data`` bytes (wav, flac, mp3 …)."""
    import soundfile as sf

    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return audio.mean(axis=1), int(sr)
    except Exception:  # noqa: BLE001 -- libsndfile raises several types; any failure means "try ffmpeg"
        import tempfile

        from cosytune.audio.io import load_audio

        with tempfile.NamedTemporaryFile(suffix=".bin") as f:
            f.write(data)
            f.flush()
            try:
                audio, sr = load_audio(f.name)
            except Exception as e:
                raise DataError(f"utterance {utt}: audio_data cannot be decoded ({e})") from e
        return audio.mean(axis=0).astype(np.float32), int(sr)


def _l2(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


class SFTDataset(BatchSource):
    """All utterances of a ``data.list``, featurised once, served as deterministic dynamic batches.

    Args:
        data_list: path to ``data.list``.
        tokenizer: object with ``encode(text) -> list[int]`` (the model's Qwen tokenizer).
        model: ``"llm"`` or ``"flow"`` (the flow needs mels; the LLM does not).
        cfg: data settings (filters, frame budget).
        seed: base seed of the per-epoch batch order.
        token_extractor: callable ``list[np.ndarray 16 kHz] -> list[list[int]]`` for rows without
            ``speech_token`` (None: such rows are an error).
        embedding_extractor: callable ``list[np.ndarray 16 kHz] -> list[np.ndarray (192,)]`` for
            rows without embeddings (None: such rows are an error for the flow).
    """

    def __init__(self, data_list: Path, tokenizer, model: str, cfg: DataConfig, seed: int = 0,
                 token_extractor=None, embedding_extractor=None, progress: bool = False) -> None:
        from cosytune.audio.features import mel_spectrogram
        from cosytune.audio.resample import resample

        self.model, self.cfg, self.seed = model, cfg, seed
        self.drops: Counter = Counter()
        self.stats: Counter = Counter()
        rows = read_rows(read_data_list(data_list))
        if not rows:
            raise DataError(f"{data_list}: the shards hold no rows")
        items: list[Item] = []
        need_tokens, need_emb = [], []
        audio16: dict[int, np.ndarray] = {}
        for row in rows:
            utt = str(row.get("utt"))
            if row.get("audio_data") is None:
                raise DataError(f"utterance {utt} has no audio_data; re-run make-parquet")
            audio, sr = decode_audio_bytes(row["audio_data"], utt)
            dur = len(audio) / sr
            if dur < cfg.min_duration_s or dur > cfg.max_duration_s:
                self.drops["duration"] += 1
                continue
            text_token = tokenizer.encode(str(row.get("text") or ""))
            if not (cfg.min_text_tokens <= len(text_token) <= cfg.max_text_tokens):
                self.drops["text_tokens"] += 1
                continue
            ratio = len(text_token) / (dur * 100)
            if not (cfg.min_tokens_per_frame <= ratio <= cfg.max_tokens_per_frame):
                self.drops["tokens_per_frame"] += 1
                continue
            instruct = row.get("instruct")
            if not instruct:
                raise DataError(
                    f"utterance {utt} has no instruct text; CosyVoice 3 training needs one ending in "
                    "<|endofprompt|> (re-run transcribe/make-parquet, which write it)"
                )
            wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
            if sr != 24000:
                if sr < 16000:
                    self.drops["sample_rate_below_16k"] += 1
                    continue
                wav = resample(wav, sr, 24000)
            peak = float(wav.abs().max())
            if peak > 1:
                wav = wav / peak
            pad = (-wav.numel()) % SAMPLES_PER_TOKEN_24K
            wav = torch.nn.functional.pad(wav, (0, pad))
            n_tok_audio = wav.numel() // SAMPLES_PER_TOKEN_24K
            feat = mel_spectrogram(wav).T.contiguous() if model == "flow" else None  # (T, 80)
            tokens = row.get("speech_token")
            tokens = [int(t) for t in tokens] if tokens is not None and len(tokens) > 0 else None
            emb = None
            key = "spk_embedding" if cfg.use_spk_embedding else "utt_embedding"
            stored = row.get(key)
            if stored is None:
                stored = row.get("utt_embedding") if key == "spk_embedding" else row.get("spk_embedding")
            if stored is not None:
                emb = _l2(torch.as_tensor(np.asarray(stored, dtype=np.float32)))
            idx = len(items)
            if tokens is None or (emb is None and model == "flow"):
                audio16[idx] = resample(wav, 24000, 16000).numpy()
                if tokens is None:
                    need_tokens.append(idx)
                if emb is None and model == "flow":
                    need_emb.append(idx)
            items.append(Item(utt, str(row.get("spk")), text_token, tokenizer.encode(str(instruct)), tokens, feat,
                              emb, n_tok_audio * 2))
        if need_tokens:
            if token_extractor is None:
                raise DataError(
                    f"{len(need_tokens)} utterances have no speech_token and no --onnx_path was given to "
                    "extract them online; run cosytune extract-speech-token or pass --onnx_path MODEL_DIR"
                )
            for i, toks in zip(need_tokens, token_extractor([audio16[i] for i in need_tokens])):
                items[i].speech_token = [int(t) for t in toks]
            self.stats["online_speech_tokens"] = len(need_tokens)
        if need_emb:
            if embedding_extractor is None:
                raise DataError(
                    f"{len(need_emb)} utterances have no embedding and no --onnx_path was given; run "
                    "cosytune extract-embedding or pass --onnx_path MODEL_DIR"
                )
            for i, e in zip(need_emb, embedding_extractor([audio16[i] for i in need_emb])):
                items[i].embedding = _l2(torch.as_tensor(np.asarray(e, dtype=np.float32)))
            self.stats["online_embeddings"] = len(need_emb)
        kept = []
        for it in items:
            if not it.speech_token:
                self.drops["empty_speech_token"] += 1
                continue
            if model == "flow":
                assert it.speech_feat is not None
                n = min(len(it.speech_token), it.speech_feat.shape[0] // 2)
                if n != len(it.speech_token) or 2 * n != it.speech_feat.shape[0]:
                    self.stats["token_mel_aligned"] += 1
                it.speech_token = it.speech_token[:n]
                it.speech_feat = it.speech_feat[: 2 * n]
                it.frames = 2 * n
            kept.append(it)
        self.items = kept
        if not self.items:
            raise DataError(f"{data_list}: every utterance was filtered out ("
                            + ", ".join(f"{k}: {v}" for k, v in sorted(self.drops.items()))
                            + "); check the data")
        def listing(counts: dict) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))

        logger.info("%s: %d utterances kept, dropped %s%s", data_list, len(self.items),
                    listing(self.drops) or "none", f" ({listing(self.stats)})" if self.stats else "")

    def __len__(self) -> int:
        return len(self.items)

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100003 + epoch)
        order = list(range(len(self.items)))
        rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), 500):
            bucket = sorted(order[start:start + 500], key=lambda i: self.items[i].frames)
            cur: list[int] = []
            longest = 0
            for i in bucket:
                f = self.items[i].frames
                if cur and max(longest, f) * (len(cur) + 1) > self.cfg.max_frames_in_batch:
                    batches.append(cur)
                    cur, longest = [], 0
                cur.append(i)
                longest = max(longest, f)
            if cur:
                batches.append(cur)
        rng.shuffle(batches)
        if world_size > 1:
            per_rank = max(1, len(batches) // world_size)
            while len(batches) < per_rank * world_size:  # fewer batches than ranks: repeat
                batches = batches + batches
            batches = batches[rank::world_size][:per_rank]
        return batches

    def collate(self, indices: list[int]) -> dict:
        items = sorted((self.items[i] for i in indices), key=lambda it: -it.frames)

        def pad_ids(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
            out = torch.zeros(len(seqs), int(lens.max()) if len(seqs) else 0, dtype=torch.int64)
            for j, s in enumerate(seqs):
                out[j, : len(s)] = torch.tensor(s, dtype=torch.int64)
            return out, lens

        batch: dict = {"utts": [it.utt for it in items]}
        batch["text_token"], batch["text_token_len"] = pad_ids([it.text_token for it in items])
        batch["instruct_token"], batch["instruct_token_len"] = pad_ids([it.instruct_token for it in items])
        batch["speech_token"], batch["speech_token_len"] = pad_ids([it.speech_token or [] for it in items])
        if self.model == "flow":
            feats = [it.speech_feat for it in items]
            lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.int32)
            out = torch.zeros(len(feats), int(lens.max()), feats[0].shape[1])
            for j, f in enumerate(feats):
                out[j, : f.shape[0]] = f
            batch["speech_feat"], batch["speech_feat_len"] = out, lens
            batch["embedding"] = torch.stack([it.embedding for it in items])
        return batch

"""Batched synthesis of many segments: one LLM batch and one flow batch per group of segments.

Role
    ``cosytune infer-batch`` (and any caller with many lines to speak) hands a list of
    :class:`BatchRequest` to :func:`synthesize_batch`. Each segment keeps its own text, speaker, mode,
    seed and options; what is shared is the work: the LLM decodes up to ``batch_size`` segments per
    backbone call (each row with its own sampler state and generator, as a single request would), and
    the flow solves those segments' mels in one CFG batch. The vocoder runs per segment (its causal
    convolutions look a few frames ahead, so right padding would touch the last samples).

Equivalence
    A row's tokens equal :meth:`Synthesizer.synthesize` with the same seed up to the float rounding of
    batched matrix products (same generator, same draws; tests check equality on CPU). The flow pads
    segments on the right: the DiT's masked attention and causal position convolutions keep valid frames
    independent of padding, so each mel equals the single-segment mel up to the same rounding.

Shapes
    LLM rows B ≤ batch_size; flow rows (2B, 80, T_max) inside the CFG sampler (conditional rows first);
    mel per segment (1, 80, 2·N_flow_tokens).

Upstream reference: none (upstream synthesises one segment at a time); the per-segment rules are those of
``cosyvoice/cli/model.py`` as implemented in :mod:`cosytune.infer.synthesizer`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cosytune.errors import CosytuneError, DataError
from cosytune.infer.fast import GraphedDecoder, batched_cfg_sample
from cosytune.infer.streaming import SilenceThinner
from cosytune.infer.synthesizer import (
    NO_SPEECH,
    PreparedRequest,
    SynthesisOptions,
    SynthesisResult,
    Synthesizer,
    bucket_capacity,
)

logger = logging.getLogger(__name__)

__all__ = ["BatchRequest", "synthesize_batch"]


@dataclass
class BatchRequest:
    """One segment of a batch: the arguments of :meth:`Synthesizer.synthesize`."""

    text: str
    mode: str | None = None
    spk_id: str | None = None
    prompt_text: str | None = None
    prompt_wav: str | os.PathLike | None = None
    options: SynthesisOptions = field(default_factory=SynthesisOptions)


@dataclass
class _Row:
    index: int
    req: PreparedRequest
    options: SynthesisOptions
    seed: int
    prepare_s: float
    tokens: list[int] = field(default_factory=list)
    flow_tokens: list[int] = field(default_factory=list)
    thinner: SilenceThinner | None = None


def _group_key(row: _Row, synth: Synthesizer) -> tuple:
    sampling = row.options.sampling or synth.llm.config.sampling
    return (sampling, row.options.min_len_mode)


def _decode_group(synth: Synthesizer, rows: list[_Row], fast: bool) -> None:
    """LLM tokens for ``rows`` (same sampler settings) in one batch."""
    llm = synth.llm
    prompts = [llm.build_prompt(r.req.text_ids, r.req.llm_prompt_ids, r.req.llm_prompt_speech) for r in rows]
    gens = [torch.Generator(device=synth.device).manual_seed(int(r.seed)) for r in rows]
    need = max(p.lm_input.shape[1] for p in prompts) + max(p.max_len for p in prompts)
    capacity = bucket_capacity(need, llm.config.qwen2.max_position_embeddings)
    decoder = None
    if fast and capacity is not None:
        decoder = GraphedDecoder(llm, len(rows), capacity,
                                 compile_mode=synth.decode_compile_mode, gate=synth.gate)
    options = rows[0].options
    with synth.gate.shared():  # a capture inside upgrades to the exclusive hold (see DeviceGate)
        outputs = llm.generate_batch(prompts, sampling=options.sampling, generators=gens,
                                     min_len_mode=options.min_len_mode, rows=decoder)
    for row, tokens in zip(rows, outputs):
        row.tokens = tokens
        row.thinner = SilenceThinner(llm.config.silent_tokens, row.options.max_silent_run)
        row.flow_tokens = [t for t in tokens if row.thinner.accept(t)]


@torch.inference_mode()
def _mels(synth: Synthesizer, rows: list[_Row]) -> list[torch.Tensor]:
    """Flow mels of ``rows`` (each with flow tokens) from one right-padded CFG batch."""
    with synth.gate.shared():
        return _mels_gated(synth, rows)


def _mels_gated(synth: Synthesizer, rows: list[_Row]) -> list[torch.Tensor]:
    flow = synth.flow
    dev = synth.device
    dtype = next(flow.parameters()).dtype
    parts = []
    for r in rows:
        prompt_token, prompt_feat, embedding = synth.flow_inputs(r.req)
        tok = torch.tensor([r.flow_tokens], dtype=torch.int64, device=dev)
        parts.append(flow.sampler_inputs(tok, prompt_token, prompt_feat.to(dev, dtype), embedding.to(dev, dtype)))
    b = len(parts)
    t_max = max(p[0].shape[2] for p in parts)
    n_mels = parts[0][0].shape[1]
    mu = torch.zeros(b, n_mels, t_max, device=dev, dtype=dtype)
    cond = torch.zeros_like(mu)
    mask = torch.zeros(b, 1, t_max, device=dev, dtype=dtype)
    spks = torch.cat([p[2] for p in parts]).to(dtype)
    for i, (mu_i, _mask_i, _spks_i, cond_i, _n_prompt) in enumerate(parts):
        t = mu_i.shape[2]
        mu[i, :, :t], cond[i, :, :t], mask[i, :, :t] = mu_i[0], cond_i[0], 1
    decoder = flow.decoder
    noise = decoder.fixed_noise(t_max, dev, dtype).expand(b, -1, -1)
    t_span = decoder.time_grid(decoder.config.n_timesteps, dtype, dev)
    out = batched_cfg_sample(decoder.estimator, mu, mask, spks, cond, noise, t_span,
                             decoder.config.inference_cfg_rate)
    return [out[i: i + 1, :, p[4]: p[0].shape[2]] for i, p in enumerate(parts)]


def synthesize_batch(synth: Synthesizer, requests: Sequence[BatchRequest], *, batch_size: int = 8,
                     fast: bool | None = None,
                     on_result: Callable[[int, SynthesisResult | CosytuneError], None] | None = None,
                     on_stage: Callable[[str], None] | None = None,
                     ) -> list[SynthesisResult | CosytuneError]:
    """Synthesise every request, batching the LLM and the flow across segments.

    Args:
        synth: a loaded :class:`Synthesizer`.
        requests: the segments.
        batch_size: segments per LLM/flow batch (1 = one at a time, still through this path).
        fast: decode with a (graph-captured on CUDA) :class:`~cosytune.infer.fast.GraphedDecoder`;
            None = on CUDA only.
        on_result: called with (request index, result or error) as soon as a segment is finished
            (e.g. to write its wav at once), in completion order.
        on_stage: called with a short description each time a batch starts a stage (e.g. "batch 2/5:
            decoding 8 segments"), so a progress display shows what runs before the batch's results come.

    Returns:
        One entry per request, in order: a :class:`SynthesisResult`, or the user-facing error that
        stopped that segment (the other segments still run).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fast = synth.device.type == "cuda" if fast is None else fast
    results: list[Any] = [None] * len(requests)

    def finish(i: int, value: SynthesisResult | CosytuneError) -> None:
        results[i] = value
        if on_result is not None:
            on_result(i, value)

    rows: list[_Row] = []
    for i, r in enumerate(requests):
        t0 = time.perf_counter()
        try:
            req = synth.prepare(r.text, mode=r.mode, spk_id=r.spk_id, prompt_text=r.prompt_text,
                                prompt_wav=r.prompt_wav, options=r.options)
        except CosytuneError as exc:
            finish(i, exc)
            continue
        rows.append(_Row(i, req, r.options, synth.resolve_seed(r.options), time.perf_counter() - t0))

    groups: dict[tuple, list[_Row]] = {}
    for row in rows:
        groups.setdefault(_group_key(row, synth), []).append(row)
    batches: list[list[_Row]] = []
    for group in groups.values():
        # Similar lengths together: less padding in both the LLM cache and the flow batch.
        group.sort(key=lambda r: len(r.req.text_ids) + len(r.req.llm_prompt_ids) + len(r.req.llm_prompt_speech))
        batches += [group[start: start + batch_size] for start in range(0, len(group), batch_size)]
    for k, batch in enumerate(batches, 1):
        stage = (lambda what, k=k: on_stage(f"batch {k}/{len(batches)}: {what}")) if on_stage else None
        _run_batch(synth, batch, fast, finish, stage)
    return results


def _run_batch(synth: Synthesizer, batch: list[_Row], fast: bool,
               finish: Callable[[int, SynthesisResult | CosytuneError], None],
               stage: Callable[[str], None] | None = None) -> None:
    t1 = time.perf_counter()
    if stage:
        stage(f"decoding {len(batch)} segment(s)")
    with synth.gate.shared():
        _decode_group(synth, batch, fast)
    t2 = time.perf_counter()
    if stage:
        stage(f"rendering {len(batch)} segment(s)")
    speaking = []
    for row in batch:
        if row.flow_tokens:
            speaking.append(row)
        else:
            finish(row.index, DataError(NO_SPEECH))
    if not speaking:
        return
    mels = _mels(synth, speaking)
    t3 = time.perf_counter()
    n = len(batch)
    for row, mel in zip(speaking, mels):
        t_h = time.perf_counter()
        wav = synth.mel_to_wav(mel.float(), speed=row.options.speed)
        hift_s = time.perf_counter() - t_h
        audio = wav.numpy().astype(np.float32, copy=False)
        audio_s = audio.shape[0] / synth.sample_rate
        # Batch stages are shared: each segment is charged its share of the LLM and flow time.
        llm_s, flow_s = (t2 - t1) / n, (t3 - t2) / len(speaking)
        total = row.prepare_s + llm_s + flow_s + hift_s
        timings = {"prepare_s": row.prepare_s, "llm_s": llm_s, "flow_s": flow_s, "hift_s": hift_s, "total_s": total,
                   "audio_s": audio_s, "rtf": total / audio_s if audio_s else float("inf")}
        assert row.thinner is not None
        info = synth.result_info(row.req, row.options, row.tokens, len(row.flow_tokens), row.thinner, stream=False)
        info["batch"] = {"rows": n, "fast_decode": fast}
        info["llm_decoder"] = ("graph" if synth.device.type == "cuda" else "static") if fast else "reference"
        finish(row.index, SynthesisResult(audio, synth.sample_rate, row.tokens, row.seed, timings, info))

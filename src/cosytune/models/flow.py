"""The CosyVoice 3 flow: speech tokens (25 Hz) → 80-bin mel (50 Hz) by conditional flow matching.

Public API
    * :class:`FlowConfig` (frozen): sizes, CFM settings and the :class:`~cosytune.models.dit.DiTConfig`;
      ``FlowConfig.fun_cosyvoice3()``, ``FlowConfig.tiny()`` (``cosyvoice3.yaml`` is read into it by
      ``cosytune.modeldir.upstream_yaml``).
    * :func:`build_flow` ``(config)`` → :class:`CausalMaskedDiffWithDiT`, built without I/O. Its
      ``state_dict()`` has exactly upstream flow.pt's keys (330 tensors + ``rotary_embed.inv_freq``).
    * Training: ``model(batch)`` → ``{"loss": tensor}`` (:meth:`CausalMaskedDiffWithDiT.forward`).
    * Inference: :meth:`CausalMaskedDiffWithDiT.inference` ``(token, prompt_token, prompt_feat,
      embedding, *, streaming=False, finalize=True)`` → mel ``(1, 80, T_new)`` (prompt frames removed).

Data path (spec §3.2): ``spks = Linear(L2norm(embedding))`` (B, 80); tokens → ``input_embedding``
(×valid mask) → pre-lookahead layer (conv k=4 over the tokens right-padded with 3 zeros — or with
3 look-ahead tokens as context in non-final streaming chunks — leaky ReLU, left-pad 2, conv k=3,
residual) → repeat ×2 in time = ``mu``. ``cond`` holds the prompt mel in its first frames, zeros
after. The CFM integrates ``dx/dt = v(x, t)`` from the fixed noise over a cosine time grid with
10 Euler steps; each step evaluates the DiT once on a batch of 2 (conditional, and unconditional
with mu/spks/cond zeroed) and mixes ``(1 + cfg)·v_c − cfg·v_u``.

Fixed noise: upstream draws ``randn(1, 80, 15000)`` right after seeding every RNG with 0 when the CFM
is built, and uses its first T frames in every call (so streaming and one-shot runs see the same
noise per absolute frame). We draw the same tensor from a private ``torch.Generator`` seeded with
0 on first use — identical values, without touching the global RNG. 15000 frames = 300 s caps
prompt + output length.

Training (spec §3.4, golden-notes §1.4 — draws in this order): Python ``random()`` once per batch
for streaming (< 0.5); per sample Python ``random()`` and, when ≥ 0.5, ``randint(0, int(0.3·len))``
for the prompt-like mel prefix in ``cond``; torch ``rand(B,1,1)`` for t (uniform, no cosine warp);
``randn_like`` for the noise; ``rand(B)`` for the CFG keep mask (> 0.2 keeps mu, spks and cond);
then the DiT's dropout. Loss: MSE over valid frames, ``Σ(pred·m − u·m)² / (Σm · 80)``.

Shapes: B batch, N tokens, T = 2N mel frames.

Reference: upstream ``FunAudioLLM/CosyVoice:cosyvoice/flow/flow.py`` (``CausalMaskedDiffWithDiT``),
``flow/flow_matching.py`` (``ConditionalCFM``, ``CausalConditionalCFM``),
``transformer/upsample_encoder.py`` (``PreLookaheadLayer``); read for facts only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosytune.errors import DataError
from cosytune.models.dit import DiT, DiTChunkCache, DiTConfig, dit_forward_chunk

NOISE_FRAMES = 15000
"""Length of the fixed inference noise (300 s of mel at 50 Hz)."""


@dataclass(frozen=True)
class FlowConfig:
    """Flow sizes and CFM settings (upstream ``CausalMaskedDiffWithDiT`` + ``CausalConditionalCFM``)."""

    input_size: int = 80
    output_size: int = 80
    spk_embed_dim: int = 192
    output_type: str = "mel"
    vocab_size: int = 6561
    input_frame_rate: int = 25
    only_mask_loss: bool = True
    """The loss covers valid frames only (upstream's flag; the loss here always does)."""
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    pre_lookahead_channels: int = 1024
    """Hidden channels of the pre-lookahead layer (its ``channels`` argument)."""
    cfm_in_channels: int = 240
    """The CFM's ``in_channels`` (x, mu and cond stacked: 3 × 80)."""
    n_spks: int = 1
    spk_emb_dim: int = 80
    """Width of the speaker condition the CFM receives (after the flow's affine layer)."""
    sigma_min: float = 1e-6
    solver: str = "euler"
    t_scheduler: str = "cosine"
    training_cfg_rate: float = 0.2
    inference_cfg_rate: float = 0.7
    reg_loss_type: str = "l1"
    """Recorded from the yaml; the CosyVoice 3 loss is the masked MSE of the module docstring."""
    n_timesteps: int = 10
    noise_seed: int = 0
    dit: DiTConfig = field(default_factory=DiTConfig)

    def __post_init__(self) -> None:
        problems = []
        if self.input_size != self.dit.mu_dim or self.output_size != self.dit.mel_dim:
            problems.append("input_size/output_size must equal the DiT's mu_dim/mel_dim")
        if self.t_scheduler not in ("cosine", "linear"):
            problems.append(f"t_scheduler must be 'cosine' or 'linear', got {self.t_scheduler!r}")
        if self.token_mel_ratio != 2:
            problems.append(f"token_mel_ratio must be 2 for CosyVoice 3, got {self.token_mel_ratio}")
        if self.solver != "euler":
            problems.append(f"solver: only 'euler' is used by CosyVoice 3, got {self.solver!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def fun_cosyvoice3(cls) -> FlowConfig:
        """The released Fun-CosyVoice3-0.5B flow (spec §3.1)."""
        return cls()

    @classmethod
    def tiny(cls) -> FlowConfig:
        """The golden fixtures' tiny flow (PreLookahead 64 channels, DiT 64 wide, 2 blocks)."""
        return cls(pre_lookahead_channels=64, dit=DiTConfig(dim=64, depth=2, heads=4, dim_head=16))


def make_valid_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, max_len) float mask, 1 at positions < length."""
    return (torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]).float()


class PreLookaheadLayer(nn.Module):
    """Two convolutions: output token t sees input tokens t−2 … t+3 (3 tokens of look-ahead)."""

    def __init__(self, in_channels: int, channels: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(in_channels, channels, lookahead + 1, padding=0)
        self.conv2 = nn.Conv1d(channels, in_channels, 3, padding=0)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` (B, N, C); ``context`` (B, ≤lookahead, C): the look-ahead tokens of a non-final chunk."""
        h = x.transpose(1, 2)
        if context is None or context.shape[1] == 0:
            h = F.pad(h, (0, self.lookahead))
        else:
            h = torch.cat((h, context.transpose(1, 2)), dim=2)
            h = F.pad(h, (0, self.lookahead - context.shape[1]))
        h = F.leaky_relu(self.conv1(h), 0.01)
        h = self.conv2(F.pad(h, (2, 0)))
        return h.transpose(1, 2) + x


class CausalConditionalCFM(nn.Module):
    """Conditional flow matching around the DiT estimator: training loss and Euler sampling."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.config = cfg
        self.estimator = DiT(cfg.dit)
        self._noise: dict[torch.device, Tensor] = {}

    def fixed_noise(self, frames: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The first ``frames`` frames of the fixed noise (1, 80, frames)."""
        if frames > NOISE_FRAMES:
            raise DataError(f"the flow can generate at most {NOISE_FRAMES} mel frames ({NOISE_FRAMES // 50} s) "
                            f"including the prompt; asked for {frames}. Use a shorter prompt or text.")
        if device not in self._noise:
            if "cpu" not in {d.type for d in self._noise}:
                g = torch.Generator().manual_seed(self.config.noise_seed)
                self._noise[torch.device("cpu")] = torch.randn(1, self.config.output_size, NOISE_FRAMES, generator=g)
            self._noise[device] = self._noise[torch.device("cpu")].to(device)
        return self._noise[device][:, :, :frames].to(dtype)

    def time_grid(self, n_timesteps: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        t = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
        if self.config.t_scheduler == "cosine":
            t = 1 - torch.cos(t * 0.5 * math.pi)
        return t

    def guided_euler(self, x: Tensor, n_timesteps: int, w: float,
                     velocity: Callable[[int, Tensor, Tensor], Tensor]) -> Tensor:
        """Euler integration of the guided velocity ``(1 + w)·v_c − w·v_u`` from ``x`` (1, 80, T) over the
        time grid; returns the result in float32.

        ``velocity(step, x, t)`` gives the estimator output (2, 80, T) at Euler step ``step`` (1-based):
        row 0 conditional, row 1 unconditional. The one update of :meth:`sample` and :meth:`sample_chunk`.
        """
        t_span = self.time_grid(n_timesteps, x.dtype, x.device)
        t, dt = t_span[0], t_span[1] - t_span[0]
        t = t.unsqueeze(0)
        for step in range(1, len(t_span)):
            v = velocity(step, x, t)
            v_c, v_u = v[:1], v[1:]
            x = x + dt * ((1.0 + w) * v_c - w * v_u)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x.float()

    @torch.inference_mode()
    def sample(self, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, *, n_timesteps: int | None = None,
               cfg_rate: float | None = None, temperature: float = 1.0, streaming: bool = False,
               trace: list[Tensor] | None = None) -> Tensor:
        """Euler integration with classifier-free guidance; returns the mel (1, 80, T) in float32.

        ``trace``, when given, receives the estimator output (2, 80, T) of every step.
        """
        n = n_timesteps or self.config.n_timesteps
        w = self.config.inference_cfg_rate if cfg_rate is None else cfg_rate
        if mu.shape[0] != 1:
            raise DataError(f"flow sampling takes one utterance at a time (batch 1), got {mu.shape[0]}")
        T = mu.shape[2]
        x = self.fixed_noise(T, mu.device, mu.dtype) * temperature
        dtype = spks.dtype
        # Batch of 2: row 0 conditional, row 1 unconditional (mu, spks, cond zero).
        x_in = torch.zeros(2, x.shape[1], T, device=x.device, dtype=dtype)
        mask_in = torch.zeros(2, 1, T, device=x.device, dtype=dtype)
        mu_in = torch.zeros(2, mu.shape[1], T, device=x.device, dtype=dtype)
        t_in = torch.zeros(2, device=x.device, dtype=dtype)
        spks_in = torch.zeros(2, spks.shape[1], device=x.device, dtype=dtype)
        cond_in = torch.zeros(2, cond.shape[1], T, device=x.device, dtype=dtype)

        def velocity(step: int, x: Tensor, t: Tensor) -> Tensor:
            x_in[:] = x
            mask_in[:] = mask
            mu_in[0] = mu[0]
            t_in[:] = t
            spks_in[0] = spks[0]
            cond_in[0] = cond[0]
            v = self.estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in, streaming)
            if trace is not None:
                trace.append(v.detach().clone())
            return v

        return self.guided_euler(x, n, w, velocity)

    @torch.inference_mode()
    def sample_chunk(self, mu: Tensor, spks: Tensor, cond: Tensor, caches: list[DiTChunkCache], *,
                     n_timesteps: int | None = None, cfg_rate: float | None = None,
                     temperature: float = 1.0) -> Tensor:
        """:meth:`sample` with ``streaming=True`` for the next frames of a stream only, continuing ``caches``.

        ``mu``/``cond`` (1, 80, T_new) are the new frames (from ``caches[0].frames`` on), ``caches`` one
        :class:`~cosytune.models.dit.DiTChunkCache` per Euler step (empty ones for a stream's first chunk;
        appended to). The same arithmetic as :meth:`sample` on the whole sequence, so the result equals the
        new frames of that solve up to float rounding. Returns (1, 80, T_new) float32.
        """
        n = n_timesteps or self.config.n_timesteps
        w = self.config.inference_cfg_rate if cfg_rate is None else cfg_rate
        if mu.shape[0] != 1:
            raise DataError(f"flow sampling takes one utterance at a time (batch 1), got {mu.shape[0]}")
        if len(caches) != n:
            raise ValueError(f"need one cache per Euler step ({n}), got {len(caches)}")
        start, frames = caches[0].frames, mu.shape[2]
        x = self.fixed_noise(start + frames, mu.device, mu.dtype)[:, :, start:] * temperature
        dtype = spks.dtype
        zeros = torch.zeros
        mu_in = torch.cat((mu, zeros(mu.shape, device=mu.device, dtype=mu.dtype))).to(dtype)
        spks_in = torch.cat((spks, zeros(spks.shape, device=spks.device, dtype=dtype))).to(dtype)
        cond_in = torch.cat((cond, zeros(cond.shape, device=cond.device, dtype=cond.dtype))).to(dtype)

        def velocity(step: int, x: Tensor, t: Tensor) -> Tensor:
            x_in = torch.cat((x, x)).to(dtype)
            t_in = t.expand(2).to(dtype)
            return dit_forward_chunk(self.estimator, x_in, mu_in, t_in, spks_in, cond_in, caches[step - 1])

        return self.guided_euler(x, n, w, velocity)

    def compute_loss(self, x1: Tensor, mask: Tensor, mu: Tensor, spks: Tensor, cond: Tensor,
                     streaming: bool = False, record: dict | None = None) -> Tensor:
        """CFM loss for target mel ``x1`` (B, 80, T); ``mask`` (B, 1, T)."""
        b = mu.shape[0]
        t = torch.rand(b, 1, 1, device=mu.device, dtype=mu.dtype)
        z = torch.randn_like(x1)
        s = self.config.sigma_min
        y = (1 - (1 - s) * t) * z + t * x1
        u = x1 - (1 - s) * z
        if self.config.training_cfg_rate > 0:
            keep = (torch.rand(b, device=x1.device) > self.config.training_cfg_rate).to(mu.dtype)
            mu, spks, cond = mu * keep.view(-1, 1, 1), spks * keep.view(-1, 1), cond * keep.view(-1, 1, 1)
        pred = self.estimator(y, mask, mu, t.squeeze(), spks, cond, streaming)
        if record is not None:
            record.update(t=t, z=z, y=y, mu=mu, spks=spks, cond=cond, pred=pred)
        return F.mse_loss(pred * mask, u * mask, reduction="sum") / (mask.sum() * u.shape[1])


class CausalMaskedDiffWithDiT(nn.Module):
    """The flow network; see the module docstring."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.config = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(cfg.input_size, cfg.pre_lookahead_channels,
                                                     cfg.pre_lookahead_len)
        self.decoder = CausalConditionalCFM(cfg)

    def speaker(self, embedding: Tensor) -> Tensor:
        """(B, 192) raw CAM++ embedding → (B, 80) speaker condition (any scale: it is L2-normalised)."""
        return self.spk_embed_affine_layer(F.normalize(embedding.to(self.spk_embed_affine_layer.weight.dtype), dim=1))

    def forward(self, batch: Mapping[str, Tensor], rng: Any = random, record: dict | None = None) -> dict:
        """Training loss. ``batch``: ``speech_token`` (B, N), ``speech_token_len``, ``speech_feat``
        (B, 2N, 80), ``speech_feat_len``, ``embedding`` (B, 192). ``rng`` supplies the Python draws."""
        missing = [k for k in ("speech_token", "speech_token_len", "speech_feat", "speech_feat_len", "embedding")
                   if k not in batch]
        if missing:
            raise DataError(f"flow training batch lacks {missing}")
        dev = self.input_embedding.weight.device
        token = batch["speech_token"].to(dev).long()
        token_len = batch["speech_token_len"].to(dev)
        feat = batch["speech_feat"].to(dev)
        feat_len = batch["speech_feat_len"]
        if feat.shape[1] != 2 * token.shape[1]:
            raise DataError(f"speech_feat has {feat.shape[1]} frames but speech_token has {token.shape[1]} tokens; "
                            "the flow needs exactly 2 mel frames per token (align them in the data pipeline)")
        streaming = rng.random() < 0.5
        spks = self.speaker(batch["embedding"].to(dev))
        tmask = make_valid_mask(token_len, token.shape[1]).unsqueeze(-1)  # (B, N, 1)
        x = self.input_embedding(token.clamp(min=0)) * tmask
        h = self.pre_lookahead_layer(x)
        if record is not None:
            record["mu_pre_upsample"] = h
        h = h.repeat_interleave(self.config.token_mel_ratio, dim=1)  # (B, T, 80)
        cond = torch.zeros_like(feat)
        for i, n in enumerate(feat_len.tolist()):
            if rng.random() < 0.5:
                continue
            idx = rng.randint(0, int(0.3 * n))
            cond[i, :idx] = feat[i, :idx]
        mask = make_valid_mask(token_len * self.config.token_mel_ratio, h.shape[1]).to(h.dtype)[:, None]  # (B,1,T)
        loss = self.decoder.compute_loss(feat.transpose(1, 2).contiguous(), mask, h.transpose(1, 2).contiguous(),
                                         spks, cond.transpose(1, 2).contiguous(), streaming, record)
        if record is not None:
            record["streaming"] = streaming
        return {"loss": loss}

    @torch.inference_mode()
    def sampler_inputs(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor, *,
                       finalize: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """What :meth:`inference` hands the CFM sampler: ``(mu, mask, spks, cond, n_prompt)``.

        mu and cond are (1, 80, T) with T = 2·(P + N_out) frames (prompt first), mask (1, 1, T) ones,
        spks (1, 80); the first ``n_prompt`` frames are the prompt's. Arguments as :meth:`inference`.
        Batch callers pad several of these on the right and sample them together.
        """
        dev = self.input_embedding.weight.device
        token, prompt_token = token.to(dev).long(), prompt_token.to(dev).long()
        if token.dim() != 2 or token.shape[0] != 1:
            raise DataError(f"token must have shape (1, N), got {tuple(token.shape)}")
        if prompt_feat.shape[1] != 2 * prompt_token.shape[1]:
            raise DataError(f"prompt_feat has {prompt_feat.shape[1]} frames for {prompt_token.shape[1]} prompt tokens;"
                            " it must have exactly 2 per token (cut both to a common length)")
        spks = self.speaker(embedding.to(dev))
        tok = torch.cat((prompt_token, token), dim=1)
        x = self.input_embedding(tok.clamp(min=0))
        look = self.config.pre_lookahead_len
        if finalize:
            h = self.pre_lookahead_layer(x)
        else:
            if token.shape[1] <= look:
                raise DataError(f"a non-final chunk needs more than {look} tokens, got {token.shape[1]}")
            h = self.pre_lookahead_layer(x[:, :-look], context=x[:, -look:])
        h = h.repeat_interleave(self.config.token_mel_ratio, dim=1)  # (1, T, 80)
        n_prompt = prompt_feat.shape[1]
        T = h.shape[1]
        cond = torch.zeros(1, T, self.config.output_size, device=dev, dtype=h.dtype)
        cond[:, :n_prompt] = prompt_feat.to(dev, h.dtype)
        mask = torch.ones(1, 1, T, device=dev, dtype=h.dtype)
        mu, cond_t = h.transpose(1, 2).contiguous(), cond.transpose(1, 2).contiguous()
        return mu, mask, spks, cond_t, n_prompt

    def inference(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor, *,
                  streaming: bool = False, finalize: bool = True, n_timesteps: int | None = None,
                  cfg_rate: float | None = None, temperature: float = 1.0, record: dict | None = None,
                  sampler: Any = None) -> Tensor:
        """Mel of ``token`` given the prompt: (1, 80, 2·N_new) float32, prompt frames removed.

        Args:
            token: (1, N) new speech tokens (in a non-final streaming chunk the last
                ``pre_lookahead_len`` of them are look-ahead context only and produce no mel).
            prompt_token: (1, P) prompt tokens (P may be 0).
            prompt_feat: (1, 2P, 80) prompt mel.
            embedding: (1, 192) speaker embedding.
            streaming: block-causal DiT attention (chunked); the final chunk uses full attention.
            finalize: whether this is the last chunk (no look-ahead tokens to hold back).
            sampler: replaces ``self.decoder.sample`` (same call signature), e.g. a CUDA-graph replay
                of the same solve (``cosytune.infer.fast.GraphedFlowSampler``); not with ``record``.
        """
        mu, mask, spks, cond_t, n_prompt = self.sampler_inputs(token, prompt_token, prompt_feat, embedding,
                                                               finalize=finalize)
        dtype = self.spk_embed_affine_layer.weight.dtype
        if record is not None:
            record.update(mu=mu, spks=spks, cond=cond_t)
        if sampler is not None and record is None:
            mel = sampler(mu, mask, spks.to(dtype), cond_t, n_timesteps=n_timesteps, cfg_rate=cfg_rate,
                          temperature=temperature, streaming=streaming)
            return mel[:, :, n_prompt:]
        mel = self.decoder.sample(mu, mask, spks.to(dtype), cond_t, n_timesteps=n_timesteps, cfg_rate=cfg_rate,
                                  temperature=temperature, streaming=streaming,
                                  trace=record.setdefault("estimator_out", []) if record is not None else None)
        return mel[:, :, n_prompt:]

    @torch.inference_mode()
    def inference_chunk(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor,
                         embedding: Tensor, cache: FlowStreamCache, *, n_timesteps: int | None = None,
                         cfg_rate: float | None = None, temperature: float = 1.0) -> Tensor:
        """A non-final streaming chunk that computes only its new frames (the earlier ones are in ``cache``).

        Arguments as :meth:`inference` with ``streaming=True, finalize=False`` (``token`` = every token so far
        plus the look-ahead ones). Returns the mel of the frames after ``cache.frames`` (prompt frames removed):
        equal, up to float rounding, to ``inference(...)[:, :, cache.frames - 2P:]`` of the recomputing path,
        because the streaming mask and the causal convolutions keep earlier frames independent of later ones.
        Each chunk must end on a DiT chunk boundary (the stream schedule's hops do).
        """
        mu, _mask, spks, cond, n_prompt = self.sampler_inputs(token, prompt_token, prompt_feat, embedding,
                                                              finalize=False)
        start = cache.frames
        if start >= mu.shape[2]:
            raise DataError(f"this chunk ends at frame {mu.shape[2]}, but the stream has already reached {start}")
        dtype = self.spk_embed_affine_layer.weight.dtype
        mel = self.decoder.sample_chunk(mu[:, :, start:], spks.to(dtype), cond[:, :, start:], cache.steps,
                                        n_timesteps=n_timesteps, cfg_rate=cfg_rate, temperature=temperature)
        return mel[:, :, max(0, n_prompt - start):]


class FlowStreamCache:
    """Per-request state of a cached streaming flow: one :class:`~cosytune.models.dit.DiTChunkCache` per Euler
    step (see :meth:`CausalMaskedDiffWithDiT.inference_chunk`)."""

    def __init__(self, n_timesteps: int) -> None:
        self.steps = [DiTChunkCache() for _ in range(n_timesteps)]

    @property
    def frames(self) -> int:
        """Frames (prompt included) whose mel has been computed."""
        return self.steps[0].frames

    def memory_bytes(self) -> int:
        """Bytes held (keys and values of every block at every Euler step)."""
        return sum(c.memory_bytes() for c in self.steps)


def build_flow(config: FlowConfig) -> CausalMaskedDiffWithDiT:
    """Construct the flow network (random init, no I/O)."""
    return CausalMaskedDiffWithDiT(config)

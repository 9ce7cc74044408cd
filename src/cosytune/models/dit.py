"""The DiT estimator of CosyVoice 3's flow: the velocity field of conditional flow matching.

``DiT(config)(x, mask, mu, t, spks, cond, streaming) -> v``, all channels-first ``(B, 80, T)``
in and out (``spks`` is ``(B, 80)``, ``t`` is ``(B,)`` or a 0-d tensor, ``mask`` ``(B, 1, T)``).

Layout (spec §3.3):

1. time: sinusoidal embedding of ``1000·t`` (256 dims) → Linear → SiLU → Linear = ``t_emb`` (B, D);
2. input: ``Linear(concat[x, cond, mu, spks])`` (320 → D), plus a causal grouped-conv position
   embedding (two × [left-pad 30, Conv1d k=31 groups=16, Mish]);
3. ``depth`` × block: AdaLN-Zero modulation from ``t_emb`` (shift, scale, gate for attention, then
   for the MLP), self-attention with rotary embeddings, GELU(tanh) MLP; padded frames of the
   attention output are zeroed;
4. final AdaLN (scale first, then shift) and ``Linear(D → 80)``.

Attention mask: key padding; with ``streaming`` also block-causal over ``static_chunk_size``-frame
chunks with unlimited left context (chunk boundaries at absolute frame indices).

Shapes: B batch, T mel frames (50 Hz), D model width, H heads, Dh head width.

Rotary quirk (CHECKPOINT-COMPAT, spec §3.3): the rotary table is ``dim_head`` wide but is applied to
the flattened ``(B, T, D)`` query/key *before* the head split, so only head 0 is rotated; the other
heads see position only through the conv position embedding. The ``rotary_embed.inv_freq`` buffer is
persistent (it is in flow.pt) and is the one used, as upstream.

Public API: :class:`DiTConfig` (field names = upstream ``DiT`` arguments, plus the fixed
``time_freq_dim``/``conv_pos_*``), :class:`DiT`, :func:`attention_mask`, :func:`apply_rotary`.
``DiT.state_dict()`` keys = upstream ``decoder.estimator.*`` without the prefix.

Reference: upstream ``FunAudioLLM/CosyVoice:cosyvoice/flow/DiT/dit.py`` and ``modules.py`` (F5-TTS
style), ``cosyvoice/utils/mask.py``; read for facts only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosytune.errors import ConfigError


@dataclass(frozen=True)
class DiTConfig:
    """DiT sizes (upstream yaml ``estimator: DiT`` arguments; ``long_skip_connection`` is recorded but
    building a DiT with it refuses, and the last three are fixed by the architecture, not in the yaml)."""

    dim: int = 1024
    depth: int = 22
    heads: int = 16
    dim_head: int = 64
    ff_mult: int = 2
    mel_dim: int = 80
    mu_dim: int = 80
    spk_dim: int = 80
    out_channels: int = 80
    static_chunk_size: int = 50
    num_decoding_left_chunks: int = -1
    dropout: float = 0.1
    long_skip_connection: bool = False
    time_freq_dim: int = 256
    conv_pos_kernel: int = 31
    conv_pos_groups: int = 16

    def __post_init__(self) -> None:
        problems = []
        if self.heads * self.dim_head != self.dim:
            problems.append(f"heads × dim_head must equal dim ({self.heads}×{self.dim_head} != {self.dim})")
        if self.dim % self.conv_pos_groups:
            problems.append(f"dim {self.dim} must be divisible by conv_pos_groups {self.conv_pos_groups}")
        if self.dim_head % 2:
            problems.append(f"dim_head must be even for rotary embeddings, got {self.dim_head}")
        if self.static_chunk_size < 1:
            problems.append(f"static_chunk_size must be >= 1, got {self.static_chunk_size}")
        if problems:
            raise ValueError("; ".join(problems))


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of ``1000·t`` followed by a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -scale)
        arg = 1000.0 * t[:, None] * freqs[None, :]  # (B, half)
        return torch.cat((arg.sin(), arg.cos()), dim=-1).to(t.dtype)

    def forward(self, t: Tensor) -> Tensor:
        emb = self.sinusoid(t)
        return self.time_mlp(emb.to(self.time_mlp[0].weight.dtype))


#: ``impl="auto"`` position convolutions use the GEMM form up to this many rows × frames.
GEMM_CONV_MAX_ROW_FRAMES = 4096


class CausalConvPositionEmbedding(nn.Module):
    """Two causal grouped convolutions (left-padded by ``kernel - 1``) with Mish."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel, groups=groups, padding=0), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel, groups=groups, padding=0), nn.Mish())

        #: "conv" (the library's grouped convolution), "gemm" (:func:`grouped_conv1d_gemm`: one batched
        #: GEMM over unfolded windows; cuDNN runs a small grouped bf16 conv as one kernel per group, 16
        #: launches of ~35 µs on an H200), or "auto" (gemm up to GEMM_CONV_MAX_ROW_FRAMES rows × frames,
        #: where the unfolded windows stay small; conv above).
        self.impl = "conv"

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        h = x.transpose(1, 2)
        gemm = self.impl == "gemm" or (self.impl == "auto" and x.shape[0] * x.shape[1] <= GEMM_CONV_MAX_ROW_FRAMES)
        for seq in (self.conv1, self.conv2):
            padded = F.pad(h, (self.kernel - 1, 0))
            h = seq[1](grouped_conv1d_gemm(padded, seq[0]) if gemm else seq[0](padded))
        return h.transpose(1, 2)


def grouped_conv1d_gemm(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """``conv(x)`` (stride 1, no padding, no dilation) as one batched GEMM over the unfolded windows.

    x (B, C_in, T + k - 1) -> (B, C_out, T). The windows are gathered per group, (G, B·T, C_in/G·k),
    and multiplied by the weights reshaped to (G, C_in/G·k, C_out/G): the same sums as the grouped
    convolution, in one kernel instead of one per group.
    """
    b, c_in, _ = x.shape
    g, k = conv.groups, conv.kernel_size[0]
    w = conv.weight  # (C_out, C_in/G, k)
    c_out = w.shape[0]
    win = x.unfold(2, k, 1)  # (B, C_in, T, k)
    t = win.shape[2]
    win = win.reshape(b, g, c_in // g, t, k).permute(1, 0, 3, 2, 4).reshape(g, b * t, (c_in // g) * k)
    wg = w.reshape(g, c_out // g, (c_in // g) * k).transpose(1, 2)  # (G, C_in/G·k, C_out/G)
    out = torch.bmm(win, wg.to(win.dtype))  # (G, B·T, C_out/G)
    out = out.reshape(g, b, t, c_out // g).permute(1, 0, 3, 2).reshape(b, c_out, t)
    if conv.bias is not None:
        out = out + conv.bias.to(out.dtype)[None, :, None]
    return out


class InputEmbedding(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.mel_dim * 2 + cfg.mu_dim + cfg.spk_dim, cfg.dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(cfg.dim, cfg.conv_pos_kernel, cfg.conv_pos_groups)

    def forward(self, x: Tensor, cond: Tensor, mu: Tensor, spks: Tensor) -> Tensor:
        # (B, T, 80) each, spks (B, 80); the concat order x, cond, mu, spk is a checkpoint contract.
        spks = spks[:, None, :].expand(-1, x.shape[1], -1)
        h = self.proj(torch.cat((x, cond, mu, spks), dim=-1))  # (B, T, D)
        return h + self.conv_pos_embed(h)


class RotaryEmbedding(nn.Module):
    """Rotary frequencies with pairwise-duplicated layout ([f0, f0, f1, f1, ...]).

    CHECKPOINT-COMPAT: ``inv_freq`` is a persistent buffer in upstream's flow.pt (x-transformers
    keeps it in the state dict), so it is one here too.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=True)

    def forward(self, seq_len: int) -> Tensor:
        pos = torch.arange(seq_len, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        freqs = pos[:, None] * self.inv_freq[None, :]  # (T, Dh/2)
        return torch.stack((freqs, freqs), dim=-1).flatten(-2)[None]  # (1, T, Dh)


def apply_rotary(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of the first ``freqs.shape[-1]`` channels of ``x`` (B, T, C).

    CHECKPOINT-COMPAT: upstream applies this to the flattened ``heads·dim_head``-wide q and k
    *before* splitting heads, so only the first ``dim_head`` channels — head 0 — are rotated and
    heads 1… get no positional rotation. Computed in fp32, then cast back (as x-transformers does).
    """
    dtype = x.dtype
    rot = freqs.shape[-1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        xr, xp = x[..., :rot].float(), x[..., rot:]
        f = freqs.float()
        pairs = xr.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        out = xr * f.cos() + rotated * f.sin()
    return torch.cat((out.to(dtype), xp), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        inner = cfg.heads * cfg.dim_head
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.to_q = nn.Linear(cfg.dim, inner)
        self.to_k = nn.Linear(cfg.dim, inner)
        self.to_v = nn.Linear(cfg.dim, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, cfg.dim), nn.Dropout(cfg.dropout))

    def forward(self, x: Tensor, attn_mask: Tensor, freqs: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = apply_rotary(self.to_q(x), freqs)
        k = apply_rotary(self.to_k(x), freqs)
        v = self.to_v(x)
        q, k, v = (z.view(b, t, self.heads, self.dim_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, Dh)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)
        o = o.transpose(1, 2).reshape(b, t, self.heads * self.dim_head).to(q.dtype)
        o = self.to_out(o)
        # Zero padded frames: the last query row's key mask is the key-padding mask in both modes.
        return o.masked_fill(~attn_mask[:, 0, -1, :, None], 0.0)


class FeedForward(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        inner = cfg.dim * cfg.ff_mult
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(cfg.dim, inner), nn.GELU(approximate="tanh")),
                                nn.Dropout(cfg.dropout), nn.Linear(inner, cfg.dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(x)


class AdaLayerNormZero(nn.Module):
    """Modulation (shift, scale, gate) × (attention, MLP) from the time embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim * 6)

    def forward(self, emb: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(emb)).chunk(6, dim=-1)


class AdaLayerNormZeroFinal(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim * 2)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=-1)  # CHECKPOINT-COMPAT: scale first
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.attn_norm = AdaLayerNormZero(cfg.dim)
        self.attn = Attention(cfg)
        self.ff = FeedForward(cfg)

    def forward(self, x: Tensor, t_emb: Tensor, attn_mask: Tensor, freqs: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(t_emb)
        d = x.shape[-1:]
        n = F.layer_norm(x, d, eps=1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        x = x + gate_msa[:, None] * self.attn(n, attn_mask, freqs)
        m = F.layer_norm(x, d, eps=1e-6) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(m)


def attention_mask(mask: Tensor, streaming: bool, chunk: int) -> Tensor:
    """(B, 1, T, T) bool: key padding, plus block-causal chunks of ``chunk`` frames when streaming.

    Rows with no visible key are opened fully (upstream does the same, with a printed warning).
    """
    key = mask[:, 0].bool()  # (B, T)
    t = key.shape[1]
    m = key[:, None, :].expand(-1, t, -1)  # (B, T, T)
    if streaming:
        idx = torch.arange(t, device=mask.device)
        chunk_end = (idx // chunk + 1) * chunk  # (T,)
        m = m & (idx[None, :] < chunk_end[:, None])[None]
    m = m | ~m.any(dim=-1, keepdim=True)
    return m[:, None]


class DiT(nn.Module):
    """The estimator; see the module docstring."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        if cfg.long_skip_connection:
            raise ConfigError("DiT long_skip_connection=True is not used by CosyVoice 3 and not implemented; "
                              "set it to False (the released yaml leaves it out)", source="flow estimator")
        self.config = cfg
        self.time_embed = TimestepEmbedding(cfg.dim, cfg.time_freq_dim)
        self.input_embed = InputEmbedding(cfg)
        self.rotary_embed = RotaryEmbedding(cfg.dim_head)
        self.transformer_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = AdaLayerNormZeroFinal(cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.out_channels)

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor,
                streaming: bool = False) -> Tensor:
        """Velocity (B, 80, T) for noisy mel ``x`` at time ``t`` (see the module docstring)."""
        b = x.shape[0]
        x, mu, cond = (z.transpose(1, 2) for z in (x, mu, cond))  # (B, T, 80)
        if t.ndim == 0:
            t = t.repeat(b)
        t_emb = self.time_embed(t)  # (B, D)
        h = self.input_embed(x, cond, mu, spks)  # (B, T, D)
        freqs = self.rotary_embed(h.shape[1])
        attn_mask = attention_mask(mask, streaming, self.config.static_chunk_size)
        for block in self.transformer_blocks:
            h = block(h, t_emb, attn_mask, freqs)
        h = self.norm_out(h, t_emb)
        return self.proj_out(h).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Streaming with a cache: the frames of a new chunk only (inference; see DiT.forward_chunk)
# --------------------------------------------------------------------------------------------------


class DiTChunkCache:
    """What earlier streaming chunks left for later ones, for one DiT call site (one Euler step).

    With the streaming (block-causal) mask and causal position convolutions, frames of earlier chunks never
    see later frames, so a later chunk needs from them only: every block's rotated keys and values, and the
    last ``kernel - 1`` frames at the input of each position convolution. Rows are whatever batch the
    caller runs (the CFG solve: conditional and unconditional).

    Attributes:
        frames: frames cached so far (the absolute index of the next chunk's first frame).
        keys, values: per block, (B, H, frames, Dh).
        conv_tails: per position convolution, (B, D, <= kernel - 1) the last frames of its input.
    """

    def __init__(self) -> None:
        self.frames = 0
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.conv_tails: list[Tensor | None] = [None, None]

    def memory_bytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def _conv_pos_chunk(module: CausalConvPositionEmbedding, x: Tensor, cache: DiTChunkCache) -> Tensor:
    """``module(x)`` for the new frames ``x`` (B, T, D), continuing the cached earlier frames."""
    h = x.transpose(1, 2)
    gemm = module.impl == "gemm" or (module.impl == "auto" and x.shape[0] * x.shape[1] <= GEMM_CONV_MAX_ROW_FRAMES)
    k = module.kernel - 1
    for i, seq in enumerate((module.conv1, module.conv2)):
        tail = cache.conv_tails[i]
        ctx = h if tail is None else torch.cat((tail.to(h.dtype), h), dim=2)
        padded = F.pad(ctx, (max(0, module.kernel - 1 - (ctx.shape[2] - h.shape[2])), 0))
        cache.conv_tails[i] = ctx[:, :, -k:] if k else ctx[:, :, :0]
        h = seq[1](grouped_conv1d_gemm(padded, seq[0]) if gemm else seq[0](padded))
    return h.transpose(1, 2)


def _attention_chunk(attn: Attention, x: Tensor, freqs: Tensor, mask: Tensor, layer: int,
                     cache: DiTChunkCache) -> Tensor:
    b, t, _ = x.shape
    q = apply_rotary(attn.to_q(x), freqs)
    k = apply_rotary(attn.to_k(x), freqs)
    v = attn.to_v(x)
    q, k, v = (z.view(b, t, attn.heads, attn.dim_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, Dh)
    if layer < len(cache.keys):
        k = torch.cat((cache.keys[layer], k), dim=2)
        v = torch.cat((cache.values[layer], v), dim=2)
        cache.keys[layer], cache.values[layer] = k, v
    else:
        cache.keys.append(k)
        cache.values.append(v)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
    o = o.transpose(1, 2).reshape(b, t, attn.heads * attn.dim_head).to(q.dtype)
    return attn.to_out(o)


def chunk_attention_mask(start: int, frames: int, chunk: int, device: torch.device | str) -> Tensor:
    """(1, 1, frames, start + frames) bool: queries ``start … start+frames-1`` see every cached key and the new
    keys up to the end of their own ``chunk``-frame block (the streaming mask of :func:`attention_mask`,
    restricted to the new rows)."""
    q = torch.arange(start, start + frames, device=device)
    key = torch.arange(start + frames, device=device)
    return (key[None, :] < ((q // chunk + 1) * chunk)[:, None])[None, None]


@torch.no_grad()
def dit_forward_chunk(dit: DiT, x: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor,
                      cache: DiTChunkCache) -> Tensor:
    """The streaming-mode velocity of the next frames only: :meth:`DiT.forward` with ``streaming=True`` on
    the whole sequence so far, restricted to its last frames, up to float rounding.

    Args:
        dit: the estimator.
        x, mu, cond: (B, 80, T_new) the new frames (starting at ``cache.frames``, a multiple of the DiT's
            ``static_chunk_size`` for the equality to hold); spks (B, 80); t (B,) or 0-d.
        cache: the earlier frames' keys, values and convolution tails (updated: the new frames are appended).

    Returns:
        (B, 80, T_new) velocity of the new frames.
    """
    b, _, frames = x.shape
    start = cache.frames
    x, mu, cond = (z.transpose(1, 2) for z in (x, mu, cond))
    if t.ndim == 0:
        t = t.repeat(b)
    t_emb = dit.time_embed(t)
    emb = dit.input_embed
    spk = spks[:, None, :].expand(-1, frames, -1)
    h = emb.proj(torch.cat((x, cond, mu, spk), dim=-1))
    h = h + _conv_pos_chunk(emb.conv_pos_embed, h, cache)
    freqs = dit.rotary_embed(start + frames)[:, start:]
    mask = chunk_attention_mask(start, frames, dit.config.static_chunk_size, x.device)
    for layer, block in enumerate(dit.transformer_blocks):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.attn_norm(t_emb)
        d = h.shape[-1:]
        n = F.layer_norm(h, d, eps=1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        h = h + gate_msa[:, None] * _attention_chunk(block.attn, n, freqs, mask, layer, cache)
        m = F.layer_norm(h, d, eps=1e-6) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        h = h + gate_mlp[:, None] * block.ff(m)
    h = dit.norm_out(h, t_emb)
    cache.frames = start + frames
    return dit.proj_out(h).transpose(1, 2)

"""Qwen2 decoder: the text/speech backbone of the CosyVoice 3 LLM, written for fast cached decoding.

What it is
    A decoder-only transformer with the Qwen2 architecture (pre-norm RMSNorm, grouped-query
    attention with q/k/v biases and no o_proj bias, rotate-half RoPE, SwiGLU MLP, final RMSNorm),
    numerically equivalent to ``transformers.Qwen2ForCausalLM`` on the same weights (a test checks
    it). CosyVoice 3 feeds it embeddings (``inputs_embeds``) and reads the final hidden states; the
    tied ``lm_head`` exists only because the checkpoint carries it.

Tensor layout and shape legend
    B batch, T new positions in this call, S cache capacity (positions), D ``hidden_size``,
    H ``num_attention_heads``, K ``num_key_value_heads``, d ``head_dim`` = D / H.
    Activations are (B, T, D). Attention works on (B, H, T, d) queries and (B, K, S, d) keys/values;
    each group of H / K query heads shares one key/value head.

Three entry points
    * ``Qwen2Model.forward(x, input_lens)``: no cache, causal attention over the T positions of
      right-padded rows (training, and a full recompute for tests); no mask tensor is needed.
    * ``Qwen2Model.prefill(x, cache, input_lens)``: appends T positions to a :class:`KVCache`
      (the prompt, or a chunk of one) and attends to everything cached before them.
    * ``Qwen2Model.decode_step(x, cache)``: exactly one new position per row. Every tensor shape
      depends only on (B, S), the write position and mask come from ``cache.lengths`` (a device
      tensor), and nothing syncs with the host, so the step can be captured in a CUDA graph.

The KV cache
    :class:`KVCache` is preallocated (``KVCache.allocate``) and passed in explicitly; the model
    keeps no state between calls. Its tensors are updated in place (so a captured graph keeps
    valid addresses) and the same object is returned. ``lengths`` (B,) holds the number of filled
    positions of each row, so rows with prompts of different lengths can decode together. A query
    at position p sees exactly the cached keys 0..p of its row: we build this past+current mask
    ourselves instead of using upstream's one-element mask, which transformers >= 4.57 reads as
    "attend to key 0 only" (golden-notes §1.1).

Numerics (match transformers' Qwen2)
    RMSNorm runs in float32 and casts back before the weight multiply. RoPE inverse frequencies and
    cos/sin tables are computed in float32 from integer positions, then cast to the activation
    dtype. Attention uses ``torch.nn.functional.scaled_dot_product_attention``; query heads sharing
    a K/V head are grouped as in transformers (query head h uses K/V head h // (H / K)).

Parameter names follow transformers (``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj``,
..., ``model.norm``, ``lm_head``), so nested as ``llm.model`` inside the CosyVoice 3 LM they produce
upstream's ``llm.model.model.*`` keys.

Reference: transformers ``models/qwen2/modeling_qwen2.py`` (architecture facts only);
upstream ``FunAudioLLM/CosyVoice:cosyvoice/llm/llm.py`` (``Qwen2Encoder``); spec §2.1-2.2.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosytune.errors import ConfigError

logger = logging.getLogger(__name__)

# `enable_gqa` lets SDPA share K/V heads without materialising copies (torch >= 2.5).
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)

# HF config.json keys that carry no architecture information; accepted and ignored.
_HF_METADATA_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "use_cache", "initializer_range",
    "_name_or_path", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "finetuning_task",
    "id2label", "label2id", "task_specific_params", "problem_type", "tokenizer_class", "prefix",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "num_beam_groups", "diversity_penalty", "tf_legacy_loss", "use_bfloat16", "dtype",
})
# Fields kept only so config.json round-trips; they do not change the network (compare=False).


@dataclass(frozen=True)
class Qwen2Config:
    """Architecture of a Qwen2 decoder; field names are those of HF ``config.json``.

    Defaults are the CosyVoice-BlankEN backbone of Fun-CosyVoice3-0.5B (Qwen2.5-0.5B shape).
    """

    vocab_size: int = 151936
    """Rows of the text embedding table (and of the tied ``lm_head``)."""
    hidden_size: int = 896
    """Model width D."""
    intermediate_size: int = 4864
    """SwiGLU inner width."""
    num_hidden_layers: int = 24
    """Number of decoder layers."""
    num_attention_heads: int = 14
    """Query heads H; head_dim = hidden_size / H."""
    num_key_value_heads: int = 2
    """Key/value heads K (grouped-query attention); must divide H."""
    max_position_embeddings: int = 32768
    """Longest sequence the model was trained for (positions beyond it are refused)."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = True
    """``lm_head.weight`` is the same tensor as ``embed_tokens.weight``."""
    hidden_act: str = "silu"
    """MLP activation; only ``silu`` exists in Qwen2."""
    attention_dropout: float = 0.0
    """Attention dropout probability (0 in every Qwen2 release)."""
    use_sliding_window: bool = False
    """Sliding-window attention; not supported (no CosyVoice checkpoint uses it)."""
    sliding_window: int | None = field(default=32768, compare=False)
    """Window size, kept for round-tripping config.json; unused while use_sliding_window is false."""
    max_window_layers: int = field(default=24, compare=False)
    """Kept for round-tripping config.json; unused."""
    bos_token_id: int | None = field(default=151643, compare=False)
    """Kept for round-tripping config.json; unused by CosyVoice."""
    eos_token_id: int | None = field(default=151643, compare=False)
    """Kept for round-tripping config.json; unused by CosyVoice."""
    torch_dtype: str = field(default="float32", compare=False)
    """Storage dtype named in config.json (informational; the caller chooses the run dtype)."""
    rope_scaling: dict | None = None
    """Only ``None`` (plain RoPE) is supported."""
    layer_types: tuple[str, ...] | None = field(default=None, compare=False)
    """Per-layer attention kind written by newer transformers; must all be ``full_attention``."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.hidden_size % self.num_attention_heads:
                problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                                f"num_attention_heads {self.num_attention_heads}")
            elif (self.hidden_size // self.num_attention_heads) % 2:
                problems.append(f"head_dim {self.hidden_size // self.num_attention_heads} must be even for RoPE")
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                                f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act must be 'silu' (Qwen2), got {self.hidden_act!r}")
        if self.use_sliding_window:
            problems.append("use_sliding_window=true is not supported (CosyVoice 3 uses full attention)")
        if self.rope_scaling not in (None, {}):
            problems.append(f"rope_scaling must be null (plain RoPE), got {self.rope_scaling!r}")
        if self.layer_types is not None and any(t != "full_attention" for t in self.layer_types):
            problems.append(f"layer_types must all be 'full_attention', got {sorted(set(self.layer_types))}")
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            problems.append(f"rope_theta and rms_norm_eps must be > 0, got {self.rope_theta}, {self.rms_norm_eps}")
        if not 0.0 <= self.attention_dropout < 1.0:
            problems.append(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if problems:
            raise ConfigError(problems, source="Qwen2 config")

    @property
    def head_dim(self) -> int:
        """Per-head width d."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], source: str = "config.json") -> Qwen2Config:
        """Build from a transformers ``config.json`` dict.

        Known metadata keys (``architectures``, ``transformers_version``, generation defaults, ...)
        are ignored; any other unknown key is an error, so a config describing a different
        architecture is never silently misread.

        Args:
            data: the parsed JSON object.
            source: name used in error messages.

        Raises:
            ConfigError: listing every unknown key, wrong ``model_type`` and invalid value.
        """
        known = {f.name for f in fields(cls)}
        problems = []
        model_type = data.get("model_type", "qwen2")
        if model_type != "qwen2":
            problems.append(f"model_type must be 'qwen2', got {model_type!r}")
        unknown = sorted(k for k in data if k not in known and k not in _HF_METADATA_KEYS
                         and k != "rope_parameters")
        if unknown:
            problems.append(f"unknown keys {unknown}: this does not look like a Qwen2 config this code understands")
        rope = data.get("rope_parameters")  # transformers >= 5 moves rope_theta in here
        if rope is not None:
            if (not isinstance(rope, Mapping) or rope.get("rope_type", "default") != "default"
                    or "rope_theta" not in rope):
                problems.append("rope_parameters must be a plain RoPE {'rope_type': 'default', 'rope_theta': ...}, "
                                f"got {rope!r}")
            elif "rope_theta" in data and data["rope_theta"] != rope["rope_theta"]:
                problems.append(f"rope_theta {data['rope_theta']} disagrees with rope_parameters {rope!r}")
        if problems:
            raise ConfigError(problems, source=source)
        kwargs = {k: v for k, v in data.items() if k in known}
        if rope is not None:
            kwargs["rope_theta"] = rope["rope_theta"]
        if kwargs.get("layer_types") is not None:
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        if "torch_dtype" not in kwargs and isinstance(data.get("dtype"), str):
            kwargs["torch_dtype"] = data["dtype"]  # transformers >= 4.56 writes `dtype`
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(e.problems, source=source) from None
        except TypeError as e:
            raise ConfigError(str(e), source=source) from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` content transformers (and upstream CosyVoice) can load."""
        out: dict[str, Any] = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
        out.update(asdict(self))
        if out["layer_types"] is None:
            del out["layer_types"]
        else:
            out["layer_types"] = list(out["layer_types"])
        out["use_cache"] = True
        # The transformers version upstream CosyVoice pins. Without this key transformers >= 4.57.3
        # cannot rule out a Mistral tokenizer in the same folder and warns about a "wrong regex"
        # on every load of our tokenizer (a false alarm: it is Qwen2's pattern).
        out["transformers_version"] = "4.51.3"
        return out


@dataclass
class KVCache:
    """Preallocated key/value cache, passed explicitly to :meth:`Qwen2Model.prefill`/``decode_step``.

    Attributes:
        keys: (num_layers, B, K, S, d) rotated keys.
        values: (num_layers, B, K, S, d) values.
        lengths: (B,) int64, filled positions per row; the next position of row b is ``lengths[b]``.
    """

    keys: Tensor
    values: Tensor
    lengths: Tensor

    @classmethod
    def allocate(cls, config: Qwen2Config, batch_size: int, capacity: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> KVCache:
        """Allocate an empty cache able to hold ``capacity`` positions per row.

        Args:
            config: the decoder's config (layers, K, d).
            batch_size: rows B.
            capacity: positions S per row (prompt + every token that will be fed back).
            device: where the cache lives (the model's device).
            dtype: the activation dtype of the model.
        """
        if capacity <= 0 or batch_size <= 0:
            raise ValueError(f"KV cache needs batch_size > 0 and capacity > 0, got {batch_size}, {capacity}")
        if capacity > config.max_position_embeddings:
            raise ValueError(f"KV cache capacity {capacity} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}; shorten the prompt or the text")
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, capacity, config.head_dim)
        return cls(keys=torch.zeros(shape, device=device, dtype=dtype),
                   values=torch.zeros(shape, device=device, dtype=dtype),
                   lengths=torch.zeros(batch_size, device=device, dtype=torch.long))

    @property
    def capacity(self) -> int:
        """Positions S per row."""
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        """Rows B."""
        return self.keys.shape[1]

    def reset(self) -> KVCache:
        """Mark every row empty (in place; stale entries are never visible) and return self."""
        self.lengths.zero_()
        return self


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, cast back before the weight multiply (as HF)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoPE tables for integer positions.

    Args:
        positions: (B, T) integer positions.
        head_dim: d (even).
        theta: RoPE base.
        dtype: dtype of the returned tables (the activation dtype).

    Returns:
        ``(cos, sin)``, each (B, 1, T, d), frequencies duplicated as [f, f] (rotate-half layout).
    """
    # float32 regardless of autocast, like transformers: bf16 angles would be visibly wrong at
    # positions in the hundreds.
    with torch.autocast(device_type=positions.device.type, enabled=False):
        exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (theta ** exponent)  # (d/2,)
        angles = positions.float()[..., None] * inv_freq  # (B, T, d/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, d)
        cos, sin = angles.cos(), angles.sin()
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, T, d) queries or keys by (B, 1, T, d) tables."""
    return x * cos + _rotate_half(x) * sin


def _causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal SDPA within one sequence; q (B, H, T, d), k/v (B, K, T, d) -> (B, H, T, d).

    No mask tensor, so the flash / memory-efficient kernels apply; K/V heads are shared through
    ``enable_gqa`` (or repeated on torch < 2.5, matching transformers' head order h -> h // (H/K)).
    """
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _cached_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """SDPA of new queries over a whole cache; q (B, H, T, d), k/v (B, K, S, d), mask (B, 1, T, S).

    The H/K query heads that share a K/V head are folded into the query axis, (B, K, G*T, d), so the
    cache is read as is (no per-step copy of K/V into H heads) by whichever SDPA kernel applies.
    """
    if q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    qg, mask = _fold_query_groups(q, k.shape[1], mask)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)  # (B, K, G*T, d)
    return out.reshape(q.shape)


def _fold_query_groups(q: Tensor, kv: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Fold the G = H/K query heads sharing a K/V head into the query axis.

    q (B, H, T, d) -> (B, K, G*T, d): heads k*G .. k*G+G-1 share K/V head k (as transformers);
    mask (B, 1, T, S) -> (B, 1, G*T, S), repeated per head of a group.
    """
    b, h, t, d = q.shape
    groups = h // kv
    mask = mask[:, :, None].expand(b, 1, groups, t, mask.shape[-1]).reshape(b, 1, groups * t, -1)
    return q.reshape(b, kv, groups * t, d), mask


def _reduce_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """:func:`_cached_attention` as explicit float32 reductions, for a few new queries per row.

    Same arguments and result. Written as broadcast-multiply + sum (no matmul, no SDPA call) so that
    ``torch.compile`` turns a decode step's attention into a couple of small fused reduction kernels;
    a library attention kernel costs several microseconds per layer at one query per row.
    """
    qg, mask = _fold_query_groups(q, k.shape[1], mask)
    qf = qg.float()[:, :, :, None] * (q.shape[-1] ** -0.5)  # (B, K, G*T, 1, d)
    scores = (qf * k.float()[:, :, None]).sum(-1)  # (B, K, G*T, S)
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = (p[..., None] * v.float()[:, :, None]).sum(-2)  # (B, K, G*T, d)
    return out.to(q.dtype).reshape(q.shape)


def _efficient_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """:func:`_cached_attention` through SDPA's memory-efficient kernel only, on CUDA (elsewhere as is)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if q.device.type != "cuda":
        return _cached_attention(q, k, v, mask)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return _cached_attention(q, k, v, mask)


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """:func:`_cached_attention` as two batched matrix products around a float32 softmax.

    Same arguments and result (up to rounding). The scores are computed and normalised in float32; the
    probabilities meet the values in the cache's dtype, as a fused attention kernel does. For one new
    query per row these are small batched GEMMs; in a graphed bf16 decode step on an H100 they were still
    slower than SDPA's choice (2.74 vs 2.51 ms per step at batch 1), so they are an option, not the default.
    """
    qg, mask = _fold_query_groups(q, k.shape[1], mask)
    scores = torch.matmul(qg.float() * (q.shape[-1] ** -0.5), k.float().transpose(-1, -2))  # (B, K, G*T, S)
    p = torch.softmax(torch.where(mask, scores, float("-inf")), dim=-1)
    out = torch.matmul(p.to(v.dtype), v)  # (B, K, G*T, d)
    return out.reshape(q.shape)


#: Attention kinds of :meth:`Qwen2Attention.forward_cached`.
CACHED_ATTENTION = {"sdpa": _cached_attention, "efficient": _efficient_attention, "matmul": _matmul_attention,
                    "reduce": _reduce_attention}


class Qwen2Attention(nn.Module):
    """Grouped-query self-attention with q/k/v biases and RoPE."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        d, h, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv * d, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv * d, bias=True)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        #: (weight, bias) of q/k/v packed into one tensor (see Qwen2Model.pack_projections), or None.
        self.packed: tuple[Tensor, Tensor] | None = None

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.packed is not None and not torch.is_grad_enabled():
            # One GEMM instead of three (decode is launch-bound); the packed tensor holds the very
            # storage of q/k/v_proj, so the result is the same projection.
            q, k, v = F.linear(x, self.packed[0], self.packed[1]).split((h * d, kv * d, kv * d), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, t, h, d).transpose(1, 2)  # (B, H, T, d)
        k = k.reshape(b, t, kv, d).transpose(1, 2)  # (B, K, T, d)
        v = v.reshape(b, t, kv, d).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Causal attention within x only (no cache)."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        out = _causal_attention(q, k, v)  # (B, H, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, write_index: Tensor,
                       cache_k: Tensor, cache_v: Tensor, attention: str = "sdpa") -> Tensor:
        """Write this call's keys/values into the layer cache, then attend over the whole cache.

        Args:
            x: (B, T, D).
            cos, sin: (B, 1, T, d) tables at the new positions.
            mask: bool (B, 1, T, S), true where a key is visible.
            write_index: (B, K, T, d) int64 positions to write, expanded over K and d.
            cache_k, cache_v: (B, K, S, d) views of this layer's cache, updated in place.
            attention: a :data:`CACHED_ATTENTION` kind: "sdpa" (the library's choice of fused kernel),
                "efficient" (SDPA's memory-efficient kernel), "matmul" (:func:`_matmul_attention`) or
                "reduce" (:func:`_reduce_attention`, for compiled single-token steps, where it becomes a
                couple of fused kernels).
        """
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        cache_k.scatter_(2, write_index, k.to(cache_k.dtype))
        cache_v.scatter_(2, write_index, v.to(cache_v.dtype))
        # Under autocast q/k/v come out in the autocast dtype while the cache may be float32.
        attend = CACHED_ATTENTION[attention]
        out = attend(q.to(cache_k.dtype), cache_k, cache_v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Qwen2MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        #: gate and up weights packed into one tensor (see Qwen2Model.pack_projections), or None.
        self.packed: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is not None and not torch.is_grad_enabled():
            gate, up = F.linear(x, self.packed).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(config)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, write_index: Tensor,
                       cache_k: Tensor, cache_v: Tensor, attention: str = "sdpa") -> Tensor:
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, mask, write_index,
                                              cache_k, cache_v, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embedding table, decoder layers and final norm (HF ``Qwen2Model``), driven by embeddings."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @torch.no_grad()
    def pack_projections(self) -> Qwen2Model:
        """Store each layer's q/k/v (and gate/up) weights in one contiguous tensor; returns self.

        The parameters become views into the packed tensor, so state_dict keys, shapes and values are
        unchanged and an in-place ``load_state_dict`` updates both. Gradient-free forwards then run one
        GEMM for q/k/v and one for gate/up (fewer kernel launches when decoding); with gradients
        enabled the separate projections run as before, so training is unaffected. Moving or casting
        the module (``.to``/``.half``...) drops the packing (the parameters get new storage); pack again
        afterwards. Idempotent.
        """
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.packed is not None and attn.packed[0].data_ptr() == attn.q_proj.weight.data_ptr():
                continue
            projs = (attn.q_proj, attn.k_proj, attn.v_proj)
            w = torch.cat([p.weight for p in projs])
            b = torch.cat([p.bias for p in projs])
            start = 0
            for proj in projs:
                n = proj.weight.shape[0]
                proj.weight.data, proj.bias.data = w[start: start + n], b[start: start + n]
                start += n
            attn.packed = (w, b)
            gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            n = mlp.gate_proj.weight.shape[0]
            mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gu[:n], gu[n:]
            mlp.packed = gu
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> Qwen2Model:
        # .to()/.cuda()/.half() give the parameters new storage: the packed tensors would go stale.
        for layer in self.layers:
            layer.self_attn.packed = None
            layer.mlp.packed = None
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor, input_lens: Tensor | None = None) -> Tensor:
        """Full causal forward without a cache.

        Args:
            x: (B, T, D) input embeddings, right-padded.
            input_lens: (B,) valid lengths (optional, checked only). Right padding needs no mask: a
                causal query at a valid position never sees a later, padded key, so valid outputs
                are those of upstream's key-masked attention, and the mask-free flash path applies.
                Outputs at padded positions are finite but meaningless.

        Returns:
            (B, T, D) hidden states after the final norm (HF ``hidden_states[-1]``).
        """
        b, t, _ = x.shape
        if t > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {t} positions exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if input_lens is not None and tuple(input_lens.shape) != (b,):
            raise ValueError(f"input_lens must have shape ({b},), got {tuple(input_lens.shape)}")
        positions = torch.arange(t, device=x.device).expand(b, t)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def _forward_cached(self, x: Tensor, cache: KVCache, advance: Tensor, attention: str = "sdpa") -> Tensor:
        b, t, _ = x.shape
        positions = cache.lengths[:, None] + torch.arange(t, device=x.device)  # (B, T)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        key_pos = torch.arange(cache.capacity, device=x.device)
        # Past + current: a query at position p sees cached keys 0..p of its own row, nothing else.
        mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
        kv, d = self.config.num_key_value_heads, self.config.head_dim
        write_index = positions[:, None, :, None].expand(b, kv, t, d)
        for i, layer in enumerate(self.layers):
            x = layer.forward_cached(x, cos, sin, mask, write_index, cache.keys[i], cache.values[i], attention)
        cache.lengths.add_(advance)
        return self.norm(x)

    def prefill(self, x: Tensor, cache: KVCache, input_lens: Tensor | None = None) -> tuple[Tensor, KVCache]:
        """Append T positions per row to ``cache`` and return their hidden states.

        Args:
            x: (B, T, D) input embeddings, right-padded.
            cache: a cache with ``B`` rows; rows may already hold earlier positions.
            input_lens: (B,) valid lengths of x (default T); each row's length grows by its own.

        Returns:
            ``(hidden (B, T, D), cache)``; the cache is updated in place and returned.

        Raises:
            ValueError: the cache has the wrong batch size or too little room left.
        """
        b, t, _ = x.shape
        if cache.batch_size != b:
            raise ValueError(f"cache has {cache.batch_size} rows but the input has {b}")
        if input_lens is None:
            input_lens = torch.full((b,), t, device=x.device, dtype=torch.long)
        needed = int((cache.lengths + t).max())
        if needed > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions per row but this prefill needs "
                             f"{needed}; allocate a larger cache")
        return self._forward_cached(x, cache, input_lens.to(device=x.device, dtype=torch.long)), cache

    def decode_step(self, x: Tensor, cache: KVCache, attention: str = "sdpa") -> tuple[Tensor, KVCache]:
        """Feed exactly one new position per row (shape-stable, no host sync; CUDA-graph capturable).

        The caller must make sure ``cache.lengths < cache.capacity`` (it is not checked here because
        that would need a device-to-host sync every step).

        Args:
            x: (B, 1, D) input embeddings.
            cache: the cache filled by :meth:`prefill` and earlier steps; updated in place.
            attention: see :meth:`Qwen2Attention.forward_cached`.

        Returns:
            ``(hidden (B, 1, D), cache)``.
        """
        return self._forward_cached(x, cache, 1, attention), cache


class Qwen2ForCausalLM(nn.Module):
    """``Qwen2Model`` plus the (tied) text ``lm_head``; parameter names as in transformers."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            # CHECKPOINT-COMPAT: upstream llm.pt stores `llm.model.lm_head.weight` as a second copy of
            # the embedding table; sharing the Parameter keeps both keys in state_dict() with one tensor.
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, inputs_embeds: Tensor, input_lens: Tensor | None = None) -> Tensor:
        """Hidden states (B, T, D) of a full causal forward; see :meth:`Qwen2Model.forward`."""
        return self.model(inputs_embeds, input_lens)

    def logits(self, hidden: Tensor) -> Tensor:
        """Text-vocabulary logits (..., vocab_size) of hidden states (unused by CosyVoice)."""
        return self.lm_head(hidden)

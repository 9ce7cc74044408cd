"""The CosyVoice 3 speech language model: Qwen2 backbone, speech-token table and head, loss, decoding.

Public API
    * :class:`LLMConfig` (frozen): sizes and constants; ``LLMConfig.fun_cosyvoice3_0_5b()`` (real
      sizes), ``LLMConfig.tiny()`` (tests/demo); ``cosytune.modeldir.upstream_yaml`` reads the yaml's
      ``CosyVoice3LM`` arguments and ``CosyVoice-BlankEN/config.json`` into it.
    * :class:`CosyVoice3LM` ``(config)``: an ``nn.Module`` built without any I/O. Its ``state_dict()``
      has exactly upstream ``llm.pt``'s keys, shapes and order; ``cosytune.weights.io`` loads it
      strictly, where only the tied ``llm.model.lm_head.weight`` may be absent (:data:`TIED_KEYS`).
    * Training: ``model(batch, rng)`` -> :class:`LMOutput` (loss, acc, num_tokens), with the pieces
      ``prepare_inputs`` -> :class:`LMInputs`, ``hidden_states`` and ``loss_from_hidden`` exposed.
    * Inference: ``build_prompt`` -> :class:`InferencePrompt`; ``generate(...)`` yields token ids;
      ``decode(...)`` yields a :class:`DecodeStep` per step with the log-probabilities and the
      sampling bookkeeping; ``generate_batch(prompts)`` decodes several prompts in one batch;
      ``step_logp(token_ids, cache)`` is the shape-stable single-token step.

Speech vocabulary (``speech_token_size`` = 6561 FSQ tokens, then 200 specials; spec §2.3)
    0..6560 speech tokens; 6561 ``sos``; 6562 ``eos``; 6563 ``task``; 6564 ``fill`` (bistream);
    6565..6760 unused. Every id >= 6561 stops decoding. ``sos``/``task`` are rows of
    ``speech_embedding`` (CosyVoice 3 has no separate ``llm_embedding``).

Training layout (per utterance; I instruct, L text, S speech tokens; IGNORE_ID = -1)
    unistream: input  ``[sos] instruct(I) text(L) [task] speech(S)``
               target ``-1 x (1+I+L), speech(S), eos``
    bistream (mix_ratio a:b = 5:15, chosen when ``rng.random() < 0.5`` and S/L > b/a):
               input  ``[sos] instruct(I)`` then per block j: ``text[aj:aj+a] speech[bj:bj+b]`` while
               the text block is full, and finally ``text_rest [task] speech_rest``;
               target ``-1 x (1+I)``, per full block ``-1 x (a-1), speech block, fill``, and finally
               ``-1 x |text_rest|, speech_rest, eos``.
    The random draw is made for *every* utterance, before the ratio test (upstream evaluates it as
    the first operand of ``and``). Inputs are right-padded with the value -1.0, targets with -1.
    Loss: label-smoothing KL (smoothing ``lsm_weight``; 0 gives cross-entropy) summed over
    non-ignored targets and divided by their count; accuracy is argmax accuracy on the same targets.

Inference layout
    ``[sos] embed(prompt_text ++ text) [task] speech_emb(prompt_speech)``; then each sampled id is
    fed back through ``speech_embedding``. ``min_len = int(len(text) * min_ratio)`` and
    ``max_len = int(len(text) * max_ratio)`` count target-text tokens only. The text must contain
    ``<|endofprompt|>`` (id 151646), as upstream asserts.

Min-length rule (spec §2.5, golden-notes §1.3): while ``step < min_len`` a stop must not be sampled.
    ``min_len_mode="all_stops"`` (default) sets all 200 stop ids to -inf, which is what the rule is
    for (before commit 0e62489 upstream also kept every stop id out, by re-sampling until a speech
    token came out). ``min_len_mode="upstream"`` reproduces HEAD
    bit for bit: it masks only id 6561 (``sos``, CosyVoice 2's eos id), so a short text can still end
    early on 6562..6760 (fixture ``B_greedy`` stops at step 7 with min_len 10). The default is the
    corrected behaviour because the HEAD rule is a leftover of the CosyVoice 2 id layout, and an
    early stop truncates the audio; use ``"upstream"`` only to compare token streams with upstream.

Shapes: B batch, T sequence, D hidden, V_sp = speech_token_size + 200.

Reference: upstream ``FunAudioLLM/CosyVoice:cosyvoice/llm/llm.py`` (``Qwen2LM``, ``CosyVoice3LM``,
``Qwen2Encoder``), ``cosyvoice/transformer/label_smoothing_loss.py``; spec §2.1-2.5, §2.9.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from cosytune.errors import ConfigError, DataError
from cosytune.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM
from cosytune.models.sampling import DrawQ, SampleResult, SamplingConfig, ras_sample, ras_sample_rows

logger = logging.getLogger(__name__)

IGNORE_ID = -1
"""Target value of positions that carry no loss (and padding value of targets)."""

TIED_KEYS: dict[str, str] = {"llm.model.lm_head.weight": "llm.model.model.embed_tokens.weight"}
"""state_dict keys that alias another key; a file may omit them (the golden weights do)."""

MinLenMode = Literal["all_stops", "upstream"]


class RandomSource(Protocol):
    """Anything with ``random() -> float`` in [0, 1), e.g. ``random.Random(seed)``."""

    def random(self) -> float: ...


@dataclass(frozen=True)
class LLMConfig:
    """Sizes and constants of :class:`CosyVoice3LM`; defaults are Fun-CosyVoice3-0.5B's."""

    qwen2: Qwen2Config = field(default_factory=Qwen2Config)
    """The backbone (``CosyVoice-BlankEN/config.json``)."""
    speech_token_size: int = 6561
    """Speech tokens (FSQ codebook 3^8); special ids start here."""
    num_special_tokens: int = 200
    """Extra rows after the speech tokens in ``speech_embedding``/``llm_decoder``; all are stop ids."""
    length_normalized_loss: bool = True
    """Divide the summed loss by the number of target tokens (else by the batch size)."""
    lsm_weight: float = 0.0
    """Label smoothing."""
    mix_ratio: tuple[int, int] = (5, 15)
    """Bistream training: text tokens per block, speech tokens per block."""
    bistream_prob: float = 0.5
    """Probability of a bistream layout for an eligible utterance (hard-coded 0.5 upstream)."""
    endofprompt_id: int = 151646
    """``<|endofprompt|>``; must appear in every inference text (upstream hard-codes 151646)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Default sampler parameters (yaml ``sampling``)."""
    min_token_text_ratio: float = 2.0
    """min_len = int(text tokens * this)."""
    max_token_text_ratio: float = 20.0
    """max_len = int(text tokens * this)."""
    silent_tokens: frozenset[int] = frozenset({1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323})
    """Speech-token ids of silence and breath in this checkpoint's FSQ codebook; upstream's CosyVoice 3
    runtime gives at most 5 of them in a row to the flow (spec §6.2)."""

    def __post_init__(self) -> None:
        problems = []
        if self.speech_token_size < 1:
            problems.append(f"speech_token_size must be >= 1, got {self.speech_token_size}")
        if self.num_special_tokens < 4:
            problems.append(f"num_special_tokens must be >= 4 (sos, eos, task, fill), got {self.num_special_tokens}")
        if len(self.mix_ratio) != 2 or min(self.mix_ratio) < 1:
            problems.append(f"mix_ratio must be two positive integers, got {self.mix_ratio!r}")
        if not 0.0 <= self.lsm_weight < 1.0:
            problems.append(f"lsm_weight must be in [0, 1), got {self.lsm_weight}")
        if not 0.0 <= self.bistream_prob <= 1.0:
            problems.append(f"bistream_prob must be in [0, 1], got {self.bistream_prob}")
        if not 0 <= self.min_token_text_ratio <= self.max_token_text_ratio:
            problems.append(f"need 0 <= min_token_text_ratio <= max_token_text_ratio, got "
                            f"{self.min_token_text_ratio}, {self.max_token_text_ratio}")
        if problems:
            raise ConfigError(problems, source="LLM config")

    # Special ids (CosyVoice 3 layout: rows of speech_embedding after the speech tokens).
    @property
    def sos_id(self) -> int:
        """Start of sequence (input only)."""
        return self.speech_token_size

    @property
    def eos_id(self) -> int:
        """End of speech (a target; stops decoding)."""
        return self.speech_token_size + 1

    @property
    def task_id(self) -> int:
        """Separates text from speech (input only)."""
        return self.speech_token_size + 2

    @property
    def fill_id(self) -> int:
        """Bistream block end (a target in bistream training)."""
        return self.speech_token_size + 3

    @property
    def speech_vocab_size(self) -> int:
        """Rows of ``speech_embedding`` and outputs of ``llm_decoder`` (6761)."""
        return self.speech_token_size + self.num_special_tokens

    @property
    def hidden_size(self) -> int:
        """Backbone width D."""
        return self.qwen2.hidden_size

    def is_stop(self, token_id: int) -> bool:
        """Whether ``token_id`` ends decoding (every id >= speech_token_size)."""
        return token_id >= self.speech_token_size

    @classmethod
    def fun_cosyvoice3_0_5b(cls) -> LLMConfig:
        """The released Fun-CosyVoice3-0.5B LLM (24 x 896, 506,148,480 parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> LLMConfig:
        """A tiny model of the same architecture (the golden fixture's sizes) for tests and demos.

        The text vocabulary keeps its real size so real tokenizer ids stay valid.
        """
        return cls(qwen2=Qwen2Config(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_window_layers=2))


@dataclass
class LMInputs:
    """The training sequences of one batch (see the module docstring for the layout)."""

    lm_input: Tensor
    """(B, T, D) embeddings, right-padded with -1.0."""
    lm_target: Tensor
    """(B, T) int64 targets, IGNORE_ID where there is no loss and on padding."""
    lm_input_lens: Tensor
    """(B,) int32 valid lengths."""
    branches: list[str]
    """``"unistream"`` or ``"bistream"`` per utterance."""


@dataclass
class LMOutput:
    """Result of a training forward."""

    loss: Tensor
    """Scalar loss (length-normalised label-smoothing KL)."""
    acc: Tensor
    """Scalar argmax accuracy over the target tokens (detached)."""
    num_tokens: int
    """Number of target tokens in the batch (the loss denominator when length-normalised)."""


@dataclass
class InferencePrompt:
    """A prepared inference input."""

    lm_input: Tensor
    """(1, L, D) ``[sos] embed(prompt_text ++ text) [task] speech_emb(prompt_speech)``."""
    min_len: int
    """Steps during which stop ids are suppressed."""
    max_len: int
    """Maximum number of decoding steps."""


@dataclass
class DecodeStep:
    """One decoding step of :meth:`CosyVoice3LM.decode`."""

    step: int
    """0-based step index."""
    logp: Tensor
    """(V_sp,) float32 log-probabilities before min-length masking and sampling."""
    sample: SampleResult
    """The sampler's decision and bookkeeping."""
    token_id: int
    """The sampled id (equals ``sample.token_id``)."""
    stop: bool
    """True when ``token_id`` is a stop id (decoding ends; the id is not a speech token)."""


def _as_1d_ids(x: Tensor | Sequence[int] | None, name: str) -> list[int]:
    if x is None:
        return []
    if isinstance(x, Tensor):
        if x.dim() == 2:
            if x.shape[0] != 1:
                raise DataError(f"{name}: expected one sequence (shape (1, N) or (N,)), got {tuple(x.shape)}")
            x = x[0]
        elif x.dim() != 1:
            raise DataError(f"{name}: expected shape (1, N) or (N,), got {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    return [int(v) for v in x]


def suppress_stop_ids(logp: Tensor, speech_token_size: int, mode: MinLenMode) -> Tensor:
    """Set the ids a min-length step must not sample to -inf (in place) and return ``logp``.

    Args:
        logp: (..., V_sp) log-probabilities.
        speech_token_size: first special id (6561).
        mode: ``"all_stops"`` masks every stop id (>= speech_token_size); ``"upstream"`` masks only
            index ``speech_token_size``, as upstream HEAD does (see the module docstring).
    """
    # CHECKPOINT-COMPAT: upstream HEAD masks only speech_token_size (= sos for CosyVoice 3, the eos of
    # CosyVoice 2); "upstream" mode keeps that for token-exact parity with upstream's decoding.
    if mode == "upstream":
        logp[..., speech_token_size] = -float("inf")
    elif mode == "all_stops":
        logp[..., speech_token_size:] = -float("inf")
    else:
        raise ValueError(f"min_len_mode must be 'all_stops' or 'upstream', got {mode!r}")
    return logp


class _Qwen2Backbone(nn.Module):
    """Holds the Qwen2 decoder under the attribute name ``model``.

    CHECKPOINT-COMPAT: upstream wraps ``Qwen2ForCausalLM`` in a ``Qwen2Encoder`` whose only attribute is
    ``model``; this extra level is what puts ``llm.model.model.*`` and ``llm.model.lm_head`` in llm.pt.
    """

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.model = Qwen2ForCausalLM(config)


class CosyVoice3LM(nn.Module):
    """CosyVoice 3 speech LM (see the module docstring for layouts, ids and the public API)."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        d, v = config.hidden_size, config.speech_vocab_size
        # Registration order = upstream state_dict order: llm.*, llm_decoder, speech_embedding.
        self.llm = _Qwen2Backbone(config.qwen2)
        self.llm_decoder = nn.Linear(d, v, bias=False)
        self.speech_embedding = nn.Embedding(v, d)

    # ------------------------------------------------------------------ weights
    @property
    def text_embedding(self) -> nn.Embedding:
        """The Qwen text table ``llm.model.model.embed_tokens``."""
        return self.llm.model.model.embed_tokens

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """Random initialisation (for models trained from scratch / tiny demo models).

        Linear and embedding weights ~ N(0, std), biases 0, norm weights 1, drawn from ``generator``
        on CPU (so the result does not depend on the device) in parameter-name order.
        """
        for name, p in sorted(self.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)

    # ------------------------------------------------------------------ training
    def prepare_inputs(self, batch: Mapping[str, Tensor], rng: RandomSource) -> LMInputs:
        """Build the training sequences (unistream/bistream) of a padded batch.

        Args:
            batch: ``text_token`` (B, L) int, ``text_token_len`` (B,), ``instruct_token`` (B, I),
                ``instruct_token_len`` (B,), ``speech_token`` (B, S), ``speech_token_len`` (B,).
            rng: source of the per-utterance layout draw; one ``rng.random()`` call per utterance,
                in batch order (``random.Random(seed)`` reproduces upstream's Python draws).

        Returns:
            :class:`LMInputs`.

        Raises:
            DataError: a missing key, inconsistent shapes or lengths.
        """
        cfg = self.config
        required = ("text_token", "text_token_len", "instruct_token", "instruct_token_len",
                    "speech_token", "speech_token_len")
        missing = [k for k in required if k not in batch]
        if missing:
            raise DataError(f"LLM training batch lacks {missing}; CosyVoice 3 needs text, instruct and "
                            f"speech tokens with their lengths (the instruct text ends with <|endofprompt|>)")
        device = self.speech_embedding.weight.device
        text, instruct, speech = (batch[k].to(device).long() for k in ("text_token", "instruct_token", "speech_token"))
        text_lens, instruct_lens, speech_lens = (
            [int(v) for v in batch[k].tolist()] for k in ("text_token_len", "instruct_token_len", "speech_token_len"))
        b = text.shape[0]
        for name, t, lens in (("text_token", text, text_lens), ("instruct_token", instruct, instruct_lens),
                              ("speech_token", speech, speech_lens)):
            if t.dim() != 2 or t.shape[0] != b or len(lens) != b or any(n < 0 or n > t.shape[1] for n in lens):
                raise DataError(f"{name}: expected shape (B={b}, N) with lengths in [0, N], got shape "
                                f"{tuple(t.shape)} and lengths {lens}")
        bad_speech = [i for i in range(b) if (speech[i, :speech_lens[i]] >= cfg.speech_token_size).any()
                      or (speech[i, :speech_lens[i]] < 0).any()]
        if bad_speech:
            raise DataError(f"speech tokens must be in [0, {cfg.speech_token_size}); utterances {bad_speech} "
                            f"hold other values")
        text_emb = self.text_embedding(text)  # (B, L, D)
        instruct_emb = self.text_embedding(instruct)  # (B, I, D)
        speech_emb = self.speech_embedding(speech)  # (B, S, D)
        sos = self.speech_embedding.weight[cfg.sos_id].reshape(1, -1)
        task = self.speech_embedding.weight[cfg.task_id].reshape(1, -1)
        n_text, n_speech = cfg.mix_ratio
        inputs: list[Tensor] = []
        targets: list[list[int]] = []
        branches: list[str] = []
        for i in range(b):
            nl, ni, ns = text_lens[i], instruct_lens[i], speech_lens[i]
            sp = speech[i, :ns].tolist()
            # The draw comes first and is always consumed (upstream: `random() < 0.5 and ratio`).
            # S / L > b / a is tested as S * a > b * L (exact for integers; S/0 counts as infinite).
            draw = rng.random()
            if draw < cfg.bistream_prob and ns * n_text > n_speech * nl:
                parts = [sos, instruct_emb[i, :ni]]
                tgt = [IGNORE_ID] * (1 + ni)
                for j in range(-(-(nl + 1) // n_text)):  # ceil((L + 1) / a) blocks
                    t0, s0 = j * n_text, j * n_speech
                    block_text = min(nl, t0 + n_text) - t0
                    if block_text == n_text:
                        parts += [text_emb[i, t0:t0 + n_text], speech_emb[i, s0:s0 + n_speech]]
                        tgt += [IGNORE_ID] * (n_text - 1) + sp[s0:s0 + n_speech] + [cfg.fill_id]
                    else:
                        parts += [text_emb[i, t0:nl], task, speech_emb[i, s0:ns]]
                        tgt += [IGNORE_ID] * block_text + sp[s0:] + [cfg.eos_id]
                branches.append("bistream")
            else:
                parts = [sos, instruct_emb[i, :ni], text_emb[i, :nl], task, speech_emb[i, :ns]]
                tgt = [IGNORE_ID] * (1 + ni + nl) + sp + [cfg.eos_id]
                branches.append("unistream")
            seq = torch.cat(parts, dim=0)
            assert seq.shape[0] == len(tgt), "internal error: input and target lengths differ"
            inputs.append(seq)
            targets.append(tgt)
        lens = torch.tensor([len(t) for t in targets], dtype=torch.int32)
        t_max = int(lens.max()) if b else 0
        lm_input = torch.full((b, t_max, cfg.hidden_size), float(IGNORE_ID), dtype=text_emb.dtype, device=device)
        lm_target = torch.full((b, t_max), IGNORE_ID, dtype=torch.long)
        for i in range(b):
            lm_input[i, : inputs[i].shape[0]] = inputs[i]
            lm_target[i, : len(targets[i])] = torch.tensor(targets[i], dtype=torch.long)
        return LMInputs(lm_input, lm_target.to(device), lens.to(device), branches)

    def hidden_states(self, lm_input: Tensor, lm_input_lens: Tensor | None = None) -> Tensor:
        """(B, T, D) backbone output after the final norm, padding masked as keys."""
        return self.llm.model(lm_input, lm_input_lens)

    def loss_from_hidden(self, hidden: Tensor, lm_target: Tensor) -> LMOutput:
        """Length-normalised label-smoothing loss and accuracy.

        Only target positions go through ``llm_decoder`` (a (B, T, V_sp) logits tensor over padding
        would be wasted memory); logits are upcast to float32 for the softmax.

        Args:
            hidden: (B, T, D) backbone output.
            lm_target: (B, T) targets with IGNORE_ID.
        """
        cfg = self.config
        valid = lm_target != IGNORE_ID  # (B, T)
        n = int(valid.sum())
        logits = self.llm_decoder(hidden[valid]).float()  # (N, V_sp)
        target = lm_target[valid]  # (N,)
        logp = torch.log_softmax(logits, dim=-1)
        eps = cfg.lsm_weight / (cfg.speech_vocab_size - 1)
        conf = 1.0 - cfg.lsm_weight
        # KL(true_dist || softmax) per token with true_dist = conf at the target, eps elsewhere:
        #   sum_c t_c log t_c - conf * logp[y] - eps * (sum_c logp_c - logp[y]);  0 log 0 = 0.
        entropy_term = (conf * math.log(conf) if conf > 0 else 0.0) + (
            (cfg.speech_vocab_size - 1) * eps * math.log(eps) if eps > 0 else 0.0)
        logp_y = logp.gather(1, target[:, None])[:, 0]
        per_token = entropy_term - conf * logp_y
        if eps > 0:
            per_token = per_token - eps * (logp.sum(dim=-1) - logp_y)
        denom = n if cfg.length_normalized_loss else hidden.shape[0]
        loss = per_token.sum() / max(denom, 1)
        correct = (logits.argmax(dim=-1) == target).sum()
        acc = (correct / valid.sum()).detach() if n else torch.zeros((), device=hidden.device)
        return LMOutput(loss=loss, acc=acc, num_tokens=n)

    def forward(self, batch: Mapping[str, Tensor], rng: RandomSource) -> LMOutput:
        """Training forward: layout, backbone, loss (see :meth:`prepare_inputs` for ``batch``/``rng``)."""
        inputs = self.prepare_inputs(batch, rng)
        hidden = self.hidden_states(inputs.lm_input, inputs.lm_input_lens)
        return self.loss_from_hidden(hidden, inputs.lm_target)

    # ------------------------------------------------------------------ inference
    def build_prompt(self, text: Tensor | Sequence[int], prompt_text: Tensor | Sequence[int] | None = None,
                     prompt_speech_token: Tensor | Sequence[int] | None = None, *,
                     min_token_text_ratio: float | None = None,
                     max_token_text_ratio: float | None = None) -> InferencePrompt:
        """``[sos] embed(prompt_text ++ text) [task] speech_emb(prompt_speech)`` and the length limits.

        Args:
            text: target-text ids, (N,) or (1, N).
            prompt_text: prompt-text ids (may be empty); ``<|endofprompt|>`` must be in prompt_text+text.
            prompt_speech_token: prompt speech ids in [0, speech_token_size) (may be empty).
            min_token_text_ratio, max_token_text_ratio: override the config's ratios.

        Raises:
            DataError: empty text, no ``<|endofprompt|>``, or out-of-range ids.
        """
        cfg = self.config
        text_ids = _as_1d_ids(text, "text")
        prompt_ids = _as_1d_ids(prompt_text, "prompt_text")
        speech_ids = _as_1d_ids(prompt_speech_token, "prompt_speech_token")
        if not text_ids:
            raise DataError("text is empty: there is nothing to synthesise")
        all_text = prompt_ids + text_ids
        if cfg.endofprompt_id not in all_text:
            raise DataError(f"<|endofprompt|> (id {cfg.endofprompt_id}) is not in prompt_text + text; CosyVoice 3 "
                            f"needs it, e.g. prefix the text with 'You are a helpful assistant.<|endofprompt|>'")
        vocab = cfg.qwen2.vocab_size
        if any(not 0 <= t < vocab for t in all_text):
            raise DataError(f"text ids must be in [0, {vocab}); got {[t for t in all_text if not 0 <= t < vocab][:5]}")
        if any(not 0 <= t < cfg.speech_token_size for t in speech_ids):
            raise DataError(f"prompt speech tokens must be in [0, {cfg.speech_token_size}); got "
                            f"{[t for t in speech_ids if not 0 <= t < cfg.speech_token_size][:5]}")
        device = self.speech_embedding.weight.device
        table = self.speech_embedding.weight
        parts = [table[cfg.sos_id][None],
                 self.text_embedding(torch.tensor(all_text, dtype=torch.long, device=device)),
                 table[cfg.task_id][None]]
        if speech_ids:
            parts.append(self.speech_embedding(torch.tensor(speech_ids, dtype=torch.long, device=device)))
        lm_input = torch.cat(parts, dim=0)[None]  # (1, L, D)
        lo = cfg.min_token_text_ratio if min_token_text_ratio is None else min_token_text_ratio
        hi = cfg.max_token_text_ratio if max_token_text_ratio is None else max_token_text_ratio
        # Same float arithmetic as upstream: int(len(text) * ratio).
        return InferencePrompt(lm_input, int(len(text_ids) * lo), int(len(text_ids) * hi))

    def _logp(self, hidden_last: Tensor) -> Tensor:
        """(B, D) hidden -> (B, V_sp) float32 log-probabilities."""
        return torch.log_softmax(self.llm_decoder(hidden_last).float(), dim=-1)

    def step_logp(self, token_ids: Tensor, cache: KVCache, attention: str = "sdpa") -> tuple[Tensor, KVCache]:
        """Shape-stable single-token step: feed ``token_ids`` (B,) and return (B, V_sp) log-probs.

        No host synchronisation and static shapes, so it can be captured in a CUDA graph. The cache is
        updated in place (and returned); the caller keeps ``cache.lengths < cache.capacity``.
        ``attention``: see ``Qwen2Attention.forward_cached`` ("reduce" for compiled steps).
        """
        x = self.speech_embedding(token_ids)[:, None]  # (B, 1, D)
        hidden, cache = self.llm.model.model.decode_step(x, cache, attention)
        return self._logp(hidden[:, 0]), cache

    def suppress_stops(self, logp: Tensor, mode: MinLenMode) -> Tensor:
        """:func:`suppress_stop_ids` with this model's ``speech_token_size``."""
        return suppress_stop_ids(logp, self.config.speech_token_size, mode)

    @torch.inference_mode()
    def decode(self, prompt: InferencePrompt, *, sampling: SamplingConfig | None = None,
               generator: torch.Generator | None = None, draw_q: DrawQ | None = None,
               min_len_mode: MinLenMode = "all_stops", rows: RowDecoder | None = None) -> Iterator[DecodeStep]:
        """Autoregressive decoding with a KV cache, one :class:`DecodeStep` per step.

        Step 0 runs the whole prompt; each later step feeds the previous id's ``speech_embedding`` row.
        Decoding ends after a stop id (reported with ``stop=True``) or after ``prompt.max_len`` steps.

        Args:
            prompt: from :meth:`build_prompt`.
            sampling: sampler parameters (default: the config's).
            generator: randomness for the sampler (a ``torch.Generator`` on any device; a CPU one
                seeded with s reproduces upstream's CPU run after ``torch.manual_seed(s)``). None uses
                torch's global generator, which is only for quick experiments.
            draw_q: inject Exp(1) draws instead (tests); see :func:`ras_sample`.
            min_len_mode: ``"all_stops"`` (default) or ``"upstream"``; see the module docstring.
            rows: a one-row :class:`RowDecoder` that runs the backbone (e.g. a
                ``cosytune.infer.fast.GraphedDecoder``); default: a fresh eager cache for this prompt.
        """
        cfg = self.config
        sampling = sampling or cfg.sampling
        if min_len_mode not in ("all_stops", "upstream"):
            raise ValueError(f"min_len_mode must be 'all_stops' or 'upstream', got {min_len_mode!r}")
        if prompt.max_len <= 0:
            return
        lm_input = prompt.lm_input
        if rows is None:
            rows = _EagerRows(self, 1, lm_input.shape[1] + prompt.max_len)
        # logp may be the row decoder's own buffer: editing it in place below is fine, the next step
        # overwrites it, and what is yielded is a copy.
        logp = rows.prefill([lm_input])[0]
        history: list[int] = []
        for step in range(prompt.max_len):
            raw = logp.clone()
            if step < prompt.min_len:
                self.suppress_stops(logp, min_len_mode)
            result = ras_sample(logp, history, sampling, generator=generator, draw_q=draw_q)
            stop = cfg.is_stop(result.token_id)
            yield DecodeStep(step, raw, result, result.token_id, stop)
            if stop or step + 1 == prompt.max_len:
                return
            history.append(result.token_id)
            logp = rows.step(torch.tensor([result.token_id], device=lm_input.device))[0]

    def generate(self, text: Tensor | Sequence[int], prompt_text: Tensor | Sequence[int] | None = None,
                 prompt_speech_token: Tensor | Sequence[int] | None = None, *,
                 sampling: SamplingConfig | None = None, generator: torch.Generator | None = None,
                 min_len_mode: MinLenMode = "all_stops", min_token_text_ratio: float | None = None,
                 max_token_text_ratio: float | None = None) -> Iterator[int]:
        """Yield speech token ids for ``text`` (the stop id is not yielded).

        Args:
            text, prompt_text, prompt_speech_token: see :meth:`build_prompt`.
            sampling, generator, min_len_mode: see :meth:`decode`.
            min_token_text_ratio, max_token_text_ratio: override the config's ratios.
        """
        prompt = self.build_prompt(text, prompt_text, prompt_speech_token,
                                   min_token_text_ratio=min_token_text_ratio,
                                   max_token_text_ratio=max_token_text_ratio)
        for step in self.decode(prompt, sampling=sampling, generator=generator, min_len_mode=min_len_mode):
            if step.stop:
                return
            yield step.token_id

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[InferencePrompt], *, sampling: SamplingConfig | None = None,
                       generators: Sequence[torch.Generator | None] | None = None,
                       min_len_mode: MinLenMode = "all_stops", rows: RowDecoder | None = None) -> list[list[int]]:
        """Decode several prompts together (one backbone call per step for all of them).

        Each row follows exactly the rules of :meth:`decode` (its own min/max length, history and
        generator), so a row's tokens equal a single-prompt run with the same generator up to the
        float rounding of batched matrix products. Rows that have finished keep feeding a dummy token
        until all are done; their outputs are ignored.

        Args:
            prompts: from :meth:`build_prompt`, any lengths.
            sampling: sampler parameters (default: the config's).
            generators: one per prompt (or None for all: torch's global generator).
            min_len_mode: see :meth:`decode`.
            rows: what runs the backbone, e.g. a ``cosytune.infer.fast.GraphedDecoder`` with
                ``len(prompts)`` rows and room for the longest prompt plus the largest ``max_len``
                (anything with ``prefill(list of (1, L, D)) -> (B, V_sp)`` and ``step((B,) ids) ->
                (B, V_sp)`` log-probs). Default: a fresh eager cache.

        Returns:
            The speech tokens of each prompt (stop ids excluded).
        """
        cfg = self.config
        sampling = sampling or cfg.sampling
        if min_len_mode not in ("all_stops", "upstream"):
            raise ValueError(f"min_len_mode must be 'all_stops' or 'upstream', got {min_len_mode!r}")
        b = len(prompts)
        gens = list(generators) if generators is not None else [None] * b
        if len(gens) != b:
            raise ValueError(f"got {len(gens)} generators for {b} prompts")
        outputs: list[list[int]] = [[] for _ in range(b)]
        active = [p.max_len > 0 for p in prompts]
        if not any(active):
            return outputs
        device = prompts[0].lm_input.device
        if rows is None:
            rows = _EagerRows(self, b, max(p.lm_input.shape[1] for p in prompts) + max(p.max_len for p in prompts))
        logp = rows.prefill([p.lm_input for p in prompts])  # (B, V_sp)
        step = 0
        while True:
            live = [i for i in range(b) if active[i]]
            row_logp = logp[live]  # a copy: the decoder's buffer stays untouched
            short = [k for k, i in enumerate(live) if step < prompts[i].min_len]
            if short:
                idx = torch.tensor(short, device=row_logp.device)
                row_logp[idx] = self.suppress_stops(row_logp[idx], min_len_mode)
            # All rows in one sampler call: per-row calls cost device round trips per row and token.
            picked = ras_sample_rows(row_logp, [outputs[i] for i in live], sampling,
                                     generators=[gens[i] for i in live])
            feed = [0] * b
            for i, token in zip(live, picked):
                if cfg.is_stop(token):
                    active[i] = False
                else:
                    outputs[i].append(token)
                    active[i] = step + 1 < prompts[i].max_len
                feed[i] = token if active[i] else 0
            if not any(active):
                return outputs
            logp = rows.step(torch.tensor(feed, device=device))
            step += 1


class RowDecoder(Protocol):
    """Runs the backbone for B rows: :meth:`CosyVoice3LM.generate_batch`'s ``rows`` argument."""

    def prefill(self, lm_inputs: Sequence[Tensor]) -> Tensor: ...

    def step(self, token_ids: Tensor) -> Tensor: ...


def right_pad_prompts(lm_inputs: Sequence[Tensor], width: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack B prompt embeddings ((1, L_i, D) or (L_i, D)) right-padded with zeros to ``width``.

    Returns:
        ``(x (B, W, D), lengths (B,) int64)`` on the prompts' device; W = ``width`` or the longest L_i.
    """
    rows = [x[0] if x.dim() == 3 else x for x in lm_inputs]
    lens = [r.shape[0] for r in rows]
    x = rows[0].new_zeros(len(rows), width or max(lens), rows[0].shape[-1])
    for i, r in enumerate(rows):
        x[i, : lens[i]] = r
    return x, torch.tensor(lens, device=rows[0].device)


class _EagerRows:
    """The default :class:`RowDecoder`: an eager KV cache sized for this call."""

    def __init__(self, model: CosyVoice3LM, batch_size: int, capacity: int) -> None:
        self.model = model
        self.batch_size, self.capacity = batch_size, capacity
        self.cache: KVCache | None = None

    def prefill(self, lm_inputs: Sequence[Tensor]) -> Tensor:
        x, input_lens = right_pad_prompts(lm_inputs)
        self.cache = KVCache.allocate(self.model.config.qwen2, self.batch_size, self.capacity, device=x.device,
                                      dtype=x.dtype)
        hidden, self.cache = self.model.llm.model.model.prefill(x, self.cache, input_lens)
        return self.model._logp(hidden[torch.arange(self.batch_size, device=x.device), input_lens - 1])

    def step(self, token_ids: Tensor) -> Tensor:
        assert self.cache is not None, "prefill first"
        logp, self.cache = self.model.step_logp(token_ids, self.cache)
        return logp


def count_parameters(module: nn.Module) -> int:
    """Number of parameters with tied tensors counted once (upstream's 506,148,480 for the real LLM)."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "IGNORE_ID",
    "TIED_KEYS",
    "CosyVoice3LM",
    "DecodeStep",
    "InferencePrompt",
    "LLMConfig",
    "LMInputs",
    "LMOutput",
    "MinLenMode",
    "RandomSource",
    "RowDecoder",
    "count_parameters",
    "right_pad_prompts",
    "suppress_stop_ids",
]

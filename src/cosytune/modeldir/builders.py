"""Build our networks from the typed contents of ``cosyvoice3.yaml`` (+ BlankEN ``config.json``).

This is the single place where upstream's constructor arguments (:mod:`cosytune.modeldir.upstream_yaml`)
become our model configs (``LLMConfig``, ``FlowConfig``, ``HiFTConfig``). Networks are built on the
requested device; ``device="meta"`` allocates nothing (used to read key/shape inventories).

Upstream reference: the ``llm``/``flow``/``hift`` blocks of ``cosyvoice3.yaml`` (spec §2, §3.1, §4.1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from cosytune.modeldir.upstream_yaml import CosyVoice3Hparams


def llm_config(hp: CosyVoice3Hparams, qwen2: Any) -> Any:
    """``LLMConfig`` from the yaml's ``llm`` block and the backbone's ``Qwen2Config``.

    Raises:
        ConfigError: the yaml width disagrees with the backbone, or values are invalid.
    """
    from cosytune.models.llm import LLMConfig
    from cosytune.models.sampling import SamplingConfig

    lm = hp.llm
    kwargs = {"llm_input_size": lm.llm_input_size, "llm_output_size": lm.llm_output_size,
              "speech_token_size": lm.speech_token_size, "length_normalized_loss": lm.length_normalized_loss,
              "lsm_weight": lm.lsm_weight, "mix_ratio": list(lm.mix_ratio)}
    sampling = SamplingConfig(**dataclasses.asdict(lm.sampling))
    return LLMConfig.from_upstream(kwargs, qwen2, sampling=sampling)


def hift_config(hp: CosyVoice3Hparams) -> Any:
    """``HiFTConfig`` from the yaml's ``hift`` block (field names are shared)."""
    from cosytune.models.hift import HiFTConfig

    values = dataclasses.asdict(hp.hift)
    values["nsf_voiced_threshold"] = float(values["nsf_voiced_threshold"])
    return HiFTConfig(**values)


def flow_config(hp: CosyVoice3Hparams) -> Any:
    """``FlowConfig`` from the yaml's ``flow`` block."""
    from cosytune.models.flow import FlowConfig

    return FlowConfig.from_upstream(_flow_upstream_kwargs(hp))


def _flow_upstream_kwargs(hp: CosyVoice3Hparams) -> dict[str, Any]:
    """The flow block as nested upstream keyword arguments (the golden ``flow_tiny_config.json`` layout)."""
    f, cfm, dit = hp.flow, hp.flow.cfm, hp.flow.dit
    return {
        "CausalMaskedDiffWithDiT": {
            "input_size": f.input_size, "output_size": f.output_size, "spk_embed_dim": f.spk_embed_dim,
            "output_type": f.output_type, "vocab_size": f.vocab_size, "input_frame_rate": f.input_frame_rate,
            "only_mask_loss": f.only_mask_loss, "token_mel_ratio": f.token_mel_ratio,
            "pre_lookahead_len": f.pre_lookahead_len,
        },
        "PreLookaheadLayer": {"in_channels": f.input_size, "channels": f.pre_lookahead_channels,
                              "pre_lookahead_len": f.pre_lookahead_len},
        "CausalConditionalCFM": {
            "in_channels": cfm.in_channels, "n_spks": cfm.n_spks, "spk_emb_dim": cfm.spk_emb_dim,
            "cfm_params": {"sigma_min": cfm.sigma_min, "solver": cfm.solver, "t_scheduler": cfm.t_scheduler,
                           "training_cfg_rate": cfm.training_cfg_rate,
                           "inference_cfg_rate": cfm.inference_cfg_rate, "reg_loss_type": cfm.reg_loss_type},
        },
        "DiT": dataclasses.asdict(dit),
    }


def network_config(kind: str, hp: CosyVoice3Hparams, qwen2: Any = None) -> Any:
    """The model config of ``kind`` (``llm`` needs ``qwen2``)."""
    if kind == "llm":
        if qwen2 is None:
            raise ValueError("the llm config needs the Qwen2 backbone config (CosyVoice-BlankEN/config.json)")
        return llm_config(hp, qwen2)
    if kind == "flow":
        return flow_config(hp)
    if kind == "hift":
        return hift_config(hp)
    raise ValueError(f"kind must be 'llm', 'flow' or 'hift', got {kind!r}")


def build_network(kind: str, hp: CosyVoice3Hparams, qwen2: Any = None,
                  device: str | torch.device = "cpu") -> torch.nn.Module:
    """Construct the ``kind`` network with default (random) initialisation on ``device``.

    Args:
        kind: ``llm``, ``flow`` or ``hift``.
        hp: the yaml hyper-parameters.
        qwen2: the backbone ``Qwen2Config`` (``llm`` only).
        device: where to allocate; ``"meta"`` allocates nothing.

    Returns:
        The network (train mode, as constructed).
    """
    config = network_config(kind, hp, qwen2)
    with torch.device(device):
        if kind == "llm":
            from cosytune.models.llm import CosyVoice3LM

            return CosyVoice3LM(config)
        if kind == "flow":
            from cosytune.models.flow import build_flow

            return build_flow(config)
        from cosytune.models.hift import HiFTGenerator

        return HiFTGenerator(config)

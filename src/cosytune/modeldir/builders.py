"""Build our networks from a model dir's configs (:class:`~cosytune.modeldir.upstream_yaml.CosyVoice3Hparams`).

The yaml reader already returns the networks' own configs (``LLMConfig`` with its Qwen2 backbone,
``FlowConfig``, ``HiFTConfig``), so building is only choosing the class. Networks are built on the
requested device; ``device="meta"`` allocates nothing (used to read key/shape inventories).
"""

from __future__ import annotations

import torch

from cosytune.modeldir.upstream_yaml import CosyVoice3Hparams

KINDS = ("llm", "flow", "hift")


def build_network(kind: str, hp: CosyVoice3Hparams, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Construct the ``kind`` network with default (random) initialisation on ``device``.

    Args:
        kind: ``llm``, ``flow`` or ``hift``.
        hp: the model dir's configs.
        device: where to allocate; ``"meta"`` allocates nothing.

    Returns:
        The network (train mode, as constructed).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be 'llm', 'flow' or 'hift', got {kind!r}")
    with torch.device(device):
        if kind == "llm":
            from cosytune.models.llm import CosyVoice3LM

            return CosyVoice3LM(hp.llm)
        if kind == "flow":
            from cosytune.models.flow import build_flow

            return build_flow(hp.flow)
        from cosytune.models.hift import HiFTGenerator

        return HiFTGenerator(hp.hift)

"""DDP training over torchrun ranks: this rank's device, the process group, metric averaging, the DDP wrapper.

The rank layout itself (read once, passed around explicitly) is :class:`cosytune.ranks.Ranks`."""

from __future__ import annotations

import datetime
import logging

import torch

from cosytune.ranks import Ranks
from cosytune.train.config import DdpConfig

logger = logging.getLogger(__name__)


def pick_device(dist: Ranks, device: str = "auto") -> torch.device:
    """``cuda:{local_rank}`` when CUDA is available (or asked for), else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            from cosytune.errors import UsageError

            raise UsageError("--device cuda was given but torch sees no CUDA device; use --device cpu")
        return dist.cuda()
    return torch.device(device)


def init_distributed(dist: Ranks, device: torch.device, backend: str | None = None) -> None:
    """Initialise the process group when launched by torchrun with more than one process."""
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if dist.join(backend, datetime.timedelta(minutes=30)):
        logger.info("process group up: backend=%s world_size=%d", backend, dist.world_size)


def all_reduce_mean(values: dict[str, float], dist: Ranks, device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (identity on a single process)."""
    if not dist.distributed:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    t /= dist.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


#: Models whose every trainable parameter gets a gradient on every step, in every mode of their step function
#: (the LLM's bistream and unistream draws, the flow's condition dropout): DDP needs no search for unused
#: parameters. ``tests/integration/test_scale.py`` checks it on the tiny networks.
EVERY_PARAM_USED = frozenset({"llm", "flow"})


def wrap_ddp(model: torch.nn.Module, cfg: DdpConfig, kind: str, device: torch.device, *, accum_grad: int = 1,
             compiled: bool = False) -> torch.nn.parallel.DistributedDataParallel:
    """``model`` in DistributedDataParallel with the settings of ``cfg`` (``None`` fields decided for ``kind``).

    Gradients are all-reduced bucket by bucket while the backward pass goes on; that overlap needs no search
    for unused parameters (``find_unused_parameters``), which is only done for models not known to use every
    parameter. A static graph is declared only where DDP accepts it: with ``accum_grad`` 1 (its first backward
    must not run under ``no_sync``) and without ``torch.compile``.

    Raises:
        ConfigError: ``ddp.static_graph=true`` with gradient accumulation.
    """
    from cosytune.errors import ConfigError

    find_unused = cfg.find_unused_parameters if cfg.find_unused_parameters is not None else kind not in EVERY_PARAM_USED
    static = cfg.static_graph if cfg.static_graph is not None else (accum_grad == 1 and not compiled)
    if static and accum_grad > 1:
        raise ConfigError(f"ddp.static_graph=true needs accum_grad=1 (found {accum_grad}): DDP cannot declare a "
                          "static graph whose first backward runs under no_sync; leave ddp.static_graph unset")
    kw: dict = {"device_ids": [device.index]} if device.type == "cuda" else {}
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=find_unused, static_graph=static, bucket_cap_mb=cfg.bucket_cap_mb,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view, **kw)
    compression = "none"
    if cfg.grad_compression == "bf16":
        if torch.distributed.get_backend() == "nccl":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
            compression = "bf16"
        else:
            logger.info("ddp.grad_compression=bf16 is for NCCL; the %s backend all-reduces fp32 gradients",
                        torch.distributed.get_backend())
    logger.info("DDP: find_unused_parameters=%s static_graph=%s bucket_cap_mb=%g gradient_as_bucket_view=%s "
                "grad_compression=%s", find_unused, static, cfg.bucket_cap_mb, cfg.gradient_as_bucket_view,
                compression)
    return ddp

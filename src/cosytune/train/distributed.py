"""torchrun / DDP environment: read once, passed around explicitly."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Rank layout of this process (a single process is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> DistInfo:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(dist: DistInfo, device: str = "auto") -> torch.device:
    """``cuda:{local_rank}`` when CUDA is available (or asked for), else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            from cosytune.errors import UsageError

            raise UsageError("--device cuda was given but torch sees no CUDA device; use --device cpu")
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device(device)


def init_distributed(dist: DistInfo, device: torch.device, backend: str | None = None) -> None:
    """Initialise the process group when launched by torchrun with more than one process."""
    if not dist.distributed or torch.distributed.is_initialized():
        return
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    logger.info("process group up: backend=%s world_size=%d", backend, dist.world_size)


def cleanup_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_mean(values: dict[str, float], dist: DistInfo, device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (identity on a single process)."""
    if not dist.distributed:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    t /= dist.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def barrier(dist: DistInfo) -> None:
    if dist.distributed:
        torch.distributed.barrier()

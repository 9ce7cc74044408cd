"""This process's place under torchrun, shared by training (DDP) and batch synthesis over ranks.

:class:`Ranks` reads torchrun's ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` once (a process not launched by torchrun
is rank 0 of 1) and is passed around explicitly; it picks this rank's GPU and joins, waits on and leaves the
process group. What each feature does over the ranks stays with it (``train.distributed``: DDP;
``infer.distributed``: dealing segments, manifest parts).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from typing_extensions import Self


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, "") or default)


@dataclass(frozen=True)
class Ranks:
    """Rank layout of this process (a single process is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Self:
        """From torchrun's environment variables (unset or empty: a single process)."""
        return cls(_env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def cuda(self) -> torch.device:
        """This rank's GPU, ``cuda:LOCAL_RANK``, made the current device."""
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def join(self, backend: str, timeout: datetime.timedelta) -> bool:
        """Join the process group when there are several processes and it is not up yet; True when this call
        initialised it."""
        if not self.distributed or torch.distributed.is_initialized():
            return False
        torch.distributed.init_process_group(backend, timeout=timeout)
        return True

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.distributed:
            torch.distributed.barrier()


def leave_process_group() -> None:
    """Tear the process group down, if one is up."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

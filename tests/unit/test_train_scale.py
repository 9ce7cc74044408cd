"""The multi-GPU rules of training: the learning-rate rule, DDP settings that cannot hold, a resume on another
rank count (the 2-process runs themselves are in tests/integration/test_train_ddp.py)."""

from __future__ import annotations

import pytest
import torch

from cosytune.errors import ConfigError
from cosytune.ranks import Ranks
from cosytune.train.config import REFERENCE_FRAMES, DdpConfig, load_train_config, scaled_lr
from cosytune.train.distributed import wrap_ddp
from cosytune.train.loop import TrainState, _remap_position


def test_learning_rate_rule():
    base = load_train_config("llm")
    assert base.accum_grad * base.data.max_frames_in_batch == REFERENCE_FRAMES  # the recipe is the reference
    assert scaled_lr(base, 8) == base.optim.lr  # "none": upstream's lr whatever the batch
    sqrt = load_train_config("llm", overrides=["optim.lr_scaling=sqrt", "data.max_frames_in_batch=8000"])
    assert scaled_lr(sqrt, 4) == pytest.approx(base.optim.lr * 4)  # 4 x 2 x 8000 = 16 x 4000 -> x4
    lin = load_train_config("flow", overrides=["optim.lr_scaling=linear", "accum_grad=1"])
    assert scaled_lr(lin, 4) == pytest.approx(base.optim.lr * 2)
    with pytest.raises(ConfigError):
        load_train_config("llm", overrides=["optim.lr_scaling=cubic"])
    with pytest.raises(ConfigError):
        load_train_config("llm", overrides=["ddp.bucket_cap_mb=0"])


def test_static_graph_needs_no_accumulation():
    with pytest.raises(ConfigError, match="accum_grad=1"):
        wrap_ddp(torch.nn.Linear(2, 2), DdpConfig(static_graph=True), "llm", torch.device("cpu"), accum_grad=2)


@pytest.mark.parametrize(("batch", "old", "new", "accum", "expect"), [
    (3, 2, 1, 1, 6),   # 2 ranks did 3 batches each: the first 6 of the epoch's order are done
    (3, 2, 4, 1, 1),   # 6 done over 4 ranks: 1 each (2 are seen again, none skipped)
    (4, 1, 2, 2, 2),
    (3, 1, 2, 2, 0),   # rounded down to whole optimiser steps
])
def test_resume_on_another_rank_count_keeps_the_place_in_the_epoch(batch, old, new, accum, expect):
    state = TrainState(epoch=1, step=7, batch_in_epoch=batch)
    _remap_position(state, old, Ranks(rank=0, world_size=new), accum, "epoch_1_step_7")
    assert (state.batch_in_epoch, state.epoch, state.step) == (expect, 1, 7)

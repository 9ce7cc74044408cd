"""The one value converter of every config reader (lenient for ours, strict for upstream's yaml), the nested
merge, and the upstream recipe import of the training config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from cosytune.config.loading import INVALID, convert_value, merge_dicts
from cosytune.errors import listing


@pytest.mark.parametrize("value, tp, lenient, strict", [
    ("yes", bool, True, INVALID),
    (1, bool, True, INVALID),
    (True, bool, True, True),
    ("3", int, 3, INVALID),
    (3.0, int, 3, 3),
    (3.5, int, INVALID, INVALID),
    (True, int, INVALID, INVALID),
    ("1e-5", float, 1e-5, 1e-5),
    (2, float, 2.0, 2.0),
    (7, str, "7", INVALID),
    ("a, b", list[str], ["a", "b"], INVALID),
    ([], tuple[int, ...], (), INVALID),
    ([1, 2.0], tuple[int, ...], (1, 2), (1, 2)),
    ([[1, 3], [5]], tuple[tuple[int, ...], ...], ((1, 3), (5,)), ((1, 3), (5,))),
    (None, float | None, None, None),
    ("x", Literal["x", "y"], "x", "x"),
])
def test_lenient_and_strict_conversion(value, tp, lenient, strict):
    for is_strict, want in ((False, lenient), (True, strict)):
        problems: list[str] = []
        got = convert_value(value, tp, "k", problems, strict=is_strict)
        assert got == want if want is not INVALID else got is INVALID
        assert bool(problems) == (want is INVALID)


def test_problems_name_the_key_and_the_expected_type():
    problems: list[str] = []
    convert_value("wide", int, "hift.base_channels", problems, strict=True)
    convert_value([1, "x"], tuple[int, ...], "a.b", problems)
    convert_value("z", Literal["x", "y"], "mode", problems)
    assert problems == ["hift.base_channels: expected int (a whole number), found 'wide'",
                        "a.b[1]: expected int (a whole number), found 'x'",
                        "mode: expected one of 'x', 'y'; found 'z'"]


def test_merge_dicts_merges_sections_and_leaves_inputs_alone():
    base = {"a": 1, "optim": {"lr": 1, "name": "adam"}}
    out = merge_dicts(base, {"optim": {"lr": 2}, "b": 3})
    assert out == {"a": 1, "b": 3, "optim": {"lr": 2, "name": "adam"}}
    assert base == {"a": 1, "optim": {"lr": 1, "name": "adam"}}


def test_listing_says_how_many_more():
    assert listing(["a", "b"]) == "a, b"
    assert listing(map(str, range(5)), limit=3) == "0, 1, 2 … and 2 more"
    assert listing(["x", "y", "z"], limit=2, sep="\n  ") == "x\n  y\n  … and 1 more"


def test_train_config_reads_an_upstream_recipe(tmp_path: Path):
    from cosytune.train.config import load_train_config

    recipe = tmp_path / "cosyvoice3.yaml"
    recipe.write_text(
        "batch: !name:cosyvoice.dataset.processor.batch\n"
        "    batch_type: 'dynamic'\n"
        "    max_frames_in_batch: 2500\n"
        "train_conf:\n"
        "    optim: Adam\n"
        "    optim_conf:\n"
        "        lr: 0.00002\n"
        "    scheduler: constantlr\n"
        "    scheduler_conf:\n"
        "        warmup_steps: 250\n"
        "    max_epoch: 200\n"
        "    grad_clip: 5\n"
        "    accum_grad: 2\n"
        "    log_interval: 100\n"
        "    save_per_step: -1\n"
        "    unrelated_knob: 3\n"
    )
    cfg = load_train_config("llm", recipe, ["max_epoch=7"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.scheduler.name, cfg.scheduler.warmup_steps) == (
        "adam", 2e-5, "constantlr", 250)
    assert (cfg.max_epoch, cfg.grad_clip, cfg.accum_grad, cfg.log_interval, cfg.save_per_step) == (7, 5.0, 2, 100, -1)
    assert cfg.data.max_frames_in_batch == 2500

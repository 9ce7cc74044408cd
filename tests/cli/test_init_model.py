"""cosytune init-model: a complete tiny model dir from the command line, re-runs, refusals."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cosytune.cli.main import main
from cosytune.modeldir.model_dir import ModelDir

SHARED_NAME = "cosytune_tiny_seed0"  # same dir test_model_dir.py uses: built once per session


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / SHARED_NAME


def test_init_model_tiny(out_dir, capsys):
    assert main(["init-model", "--preset", "tiny", "--out", str(out_dir), "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "== init-model" in out and "check" in out and "ok" in out
    params = next(line for line in out.splitlines() if line.strip().startswith("parameters"))
    assert "llm " in params and "flow " in params and "hift " in params
    assert ModelDir(out_dir).problems(deep=True) == []


def test_rerun_is_a_quick_no_op(out_dir, capsys):
    t0 = time.monotonic()
    assert main(["init-model", "--out", str(out_dir)]) == 0  # defaults: tiny, seed 0
    assert time.monotonic() - t0 < 5
    capsys.readouterr()


def test_other_seed_into_existing_dir_is_refused(out_dir, capsys):
    assert main(["init-model", "--out", str(out_dir), "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "--overwrite" in err


def test_bad_preset_is_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["init-model", "--preset", "huge", "--out", str(tmp_path / "m")])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["init-model", "--help"])
    out = capsys.readouterr().out
    assert "cosytune init-model --preset tiny --out models/tiny" in out

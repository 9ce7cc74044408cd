"""CLI entry point and strict config loading."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from cosytune.cli.main import COMMANDS, main
from cosytune.config import load_config
from cosytune.errors import ConfigError


def test_root_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "commands:" in out and "Exit codes" in out
    import importlib.util

    listed = [line.split()[0] for line in out.split("commands:")[1].split("Exit codes")[0].splitlines() if line.strip()]
    assert listed == [n for n, (m, _) in COMMANDS.items() if importlib.util.find_spec(f"cosytune.cli.{m}")]


def test_unknown_command_is_usage_error(capsys):
    assert main(["prepar-audio"]) == 2
    assert "Did you mean: prepare-audio" in capsys.readouterr().err


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "cosytune", "--version"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.startswith("cosytune ")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_available_command_has_help(name, capsys):
    import importlib.util

    if importlib.util.find_spec(f"cosytune.cli.{COMMANDS[name][0]}") is None:
        pytest.skip(f"{name} not implemented yet")
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "--debug" in capsys.readouterr().out


@dataclasses.dataclass(frozen=True)
class _Inner:
    lr: float = 1e-5
    name: Literal["adam", "adamw"] = "adam"


@dataclasses.dataclass(frozen=True)
class _Outer:
    epochs: int = 3
    path: Path | None = None
    inner: _Inner = dataclasses.field(default_factory=_Inner)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, found {self.epochs}")


def test_load_config_overrides_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 5\ninner:\n  lr: 2e-5\n")
    cfg = load_config(_Outer, f, ["inner.name=adamw", "path=/x/y"])
    assert cfg.epochs == 5 and cfg.inner.lr == 2e-5 and cfg.inner.name == "adamw" and cfg.path == Path("/x/y")


def test_load_config_reports_all_problems_together(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: many\nbogus: 1\ninner:\n  name: sgd\n")
    with pytest.raises(ConfigError) as e:
        load_config(_Outer, f)
    msg = str(e.value)
    assert "epochs" in msg and "bogus" in msg and "inner.name" in msg and "3 problem" in msg


def test_load_config_runs_validators():
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        load_config(_Outer, overrides=["epochs=0"])


def test_load_config_rejects_yaml_tags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner: !new:os.system\n  command: echo hi\n")
    with pytest.raises(ConfigError, match="no !tags"):
        load_config(_Outer, f)

"""CLI entry point and strict config loading."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import subprocess
import sys
import typing
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


# --------------------------------------------------------------------------------------------
# Flags generated from the config dataclasses (they must cover the config and show its defaults)
# --------------------------------------------------------------------------------------------

def _command_parser(name: str) -> argparse.ArgumentParser:
    """The parser ``cosytune <name>`` builds (without the general flags)."""
    module = importlib.import_module(f"cosytune.cli.{COMMANDS[name][0]}")
    parser = argparse.ArgumentParser(prog=f"cosytune {name}")
    module.build_parser(parser)
    return parser


def _help_entries(name: str, capsys, monkeypatch) -> dict[str, str]:
    """``{option string: help text}`` from ``cosytune <name> --help`` printed without line wrapping."""
    monkeypatch.setenv("COLUMNS", "10000")
    with pytest.raises(SystemExit):
        main([name, "--help"])
    entries: dict[str, str] = {}
    lines = capsys.readouterr().out.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        invocation, _, help_text = line.strip().partition("  ")
        if not help_text.strip() and i + 1 < len(lines) and lines[i + 1].startswith(" " * 6):
            help_text = lines[i + 1]
        for opt in invocation.split(", "):
            entries[opt.split(" ")[0]] = help_text.strip()
    return entries


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if value == " " else str(value)


def _config_fields(cls: type, only: tuple[str, ...] | None = None) -> list[tuple[str, object]]:
    """(flag name, dataclass default) of every plain field of ``cls`` (or of the dotted ``only``)."""
    out = []
    for dotted in only or [f.name for f in dataclasses.fields(cls)]:
        owner, name = cls, dotted
        while "." in name:
            head, name = name.split(".", 1)
            owner = typing.get_type_hints(owner)[head]
        f = {f.name: f for f in dataclasses.fields(owner)}[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        tp = typing.get_type_hints(owner)[name]
        if not any(dataclasses.is_dataclass(t) for t in (tp, *typing.get_args(tp))):  # nested configs
            out.append((name, default))
    return out


def _config_classes(name: str) -> list[tuple[type, tuple[str, ...] | None, str | None]]:
    """(config class, the fields that have flags (None: all), default note) of a config-backed command."""
    if name == "prepare-audio":
        from cosytune.data.prepare_audio import PrepareAudioConfig

        return [(PrepareAudioConfig, None, None)]
    if name == "transcribe":
        from cosytune.data.transcribe import TranscribeConfig

        return [(TranscribeConfig, None, None)]
    if name in ("infer", "infer-batch"):
        from cosytune.infer.synthesizer import SynthesisOptions
        from cosytune.models.sampling import SamplingConfig

        # SynthesisOptions.sampling is a SamplingConfig: its fields are flags of their own.
        return [(SynthesisOptions, None, None), (SamplingConfig, None, "the model yaml's; {} in Fun-CosyVoice3-0.5B")]
    if name == "run":
        from cosytune.pipeline import RunConfig

        fields = tuple(f.name for f in dataclasses.fields(RunConfig)
                       if f.default is not dataclasses.MISSING and f.name != "train_overrides")
        return [(RunConfig, fields, None)]
    from cosytune.train.config import TrainConfig

    return [(TrainConfig, ("data.num_workers", "data.prefetch", "data.pin_memory", "seed"), None)]


@pytest.mark.parametrize("name", ["prepare-audio", "transcribe", "infer", "infer-batch", "train", "run"])
def test_config_flags_cover_the_config_and_show_its_defaults(name, capsys, monkeypatch):
    entries = _help_entries(name, capsys, monkeypatch)
    for cls, only, note in _config_classes(name):
        for field_name, default in _config_fields(cls, only):
            opt = f"--{field_name}"
            assert opt in entries, f"{name}: no {opt} for {cls.__name__}.{field_name}"
            shown = note.format(_shown(default)) if note else _shown(default)
            help_text = entries[opt]
            assert help_text.endswith(f"(default: {shown})"), (opt, help_text)
            assert len(help_text) > len(f"(default: {shown})") + 3, f"{cls.__name__}.{field_name} has no docstring"
            if isinstance(default, bool):
                assert f"--no_{field_name}" in entries


def test_config_flag_help_shows_concrete_defaults(capsys, monkeypatch):
    expected = {
        "prepare-audio": {"--trim_threshold_db": "(default: -35.0)", "--num_workers": "(default: 0)",
                          "--loudness_target_lufs": "(default: none)", "--trim": "(default: true)"},
        "transcribe": {"--beam_size": "(default: 5)", "--backend": "(default: faster-whisper)",
                       "--spk_id": "(default: spk)", "--vad_filter": "(default: true)"},
        "infer": {"--speed": "(default: 1.0)", "--top_p": "0.8 in Fun-CosyVoice3-0.5B)",
                  "--guide_sep": "(default: ' ')", "--device": "(default: auto)"},
        "infer-batch": {"--gap_s": "(default: 0.3)", "--batch_size": "(default: 8)"},
        "train": {"--seed": "(default: 1986)", "--prefetch": "(default: 2)", "--resume": "(default: auto)"},
    }
    for name, flags in expected.items():
        entries = _help_entries(name, capsys, monkeypatch)
        for opt, text in flags.items():
            assert entries[opt].endswith(text), (name, opt, entries[opt])


def test_config_flags_keep_the_seed_aliases_and_precedence(tmp_path):
    from cosytune.cli.config_flags import config_from_args
    from cosytune.data.prepare_audio import PrepareAudioConfig

    yaml_file = tmp_path / "pa.yaml"
    yaml_file.write_text("trim_threshold_db: -30\nmax_duration_s: 25\nmin_duration_s: 1.0\n")
    args = _command_parser("prepare-audio").parse_args(
        ["--src_dir", "raw", "--wav_dir", "wavs", "--config", str(yaml_file), "--no_slice", "--no_trim",
         "--trim_threshold_db", "-40", "--measure_loudness", "trim_threshold_db=-50", "max_duration_s=20"])
    cfg = config_from_args(PrepareAudioConfig, args)
    assert (args.in_dir, args.out_dir) == ("raw", "wavs")
    # defaults < --config < key=value < flags
    assert cfg.trim_threshold_db == -40 and cfg.max_duration_s == 20 and cfg.min_duration_s == 1.0
    assert cfg.slice_long is False and cfg.trim is False and cfg.measure_loudness is True
    assert cfg.sample_rate == 24000
    with pytest.raises(SystemExit):
        _command_parser("prepare-audio").parse_args(["--in_dir", "a", "--out_dir", "b", "--resample_quality", "XQ"])


def test_transcribe_flags_map_onto_the_config():
    from cosytune.cli.config_flags import config_overrides
    from cosytune.data.transcribe import TranscribeConfig

    p = _command_parser("transcribe")
    args = p.parse_args(["--wav_dir", "w", "--out_root", "o", "--spk_id", "xuan", "--model", "tiny",
                         "--vad_filter", "false", "--max_sec", "20", "--compute_type", "int8", "dev_size=3"])
    assert (args.in_dir, args.out_dir) == ("w", "o")
    assert config_overrides(args, TranscribeConfig) == {"speaker": "xuan", "whisper_model": "tiny",
                                                        "vad_filter": False, "max_sec": 20.0,
                                                        "compute_type": "int8", "dev_size": 3}
    assert p.parse_args(["--in_dir", "w", "--vad_filter"]).vad_filter is True
    assert p.parse_args(["--in_dir", "w", "--no_vad_filter"]).vad_filter is False
    assert p.parse_args(["--in_dir", "w"]).vad_filter is None  # not given: the config file decides
    with pytest.raises(SystemExit):
        p.parse_args(["--in_dir", "w", "--vad_filter", "maybe"])


def test_train_flags_map_onto_nested_config_keys():
    from cosytune.cli.config_flags import config_overrides
    from cosytune.train.config import TrainConfig, load_train_config

    argv = ["--model", "llm", "--train_data", "d.list", "--model_dir", "exp", "--num_workers", "2",
            "--prefetch", "4", "--pin_memory", "--seed", "7", "--ddp.dist_backend", "gloo", "--use_amp"]
    args = _command_parser("train").parse_args([*argv, "--no_amp", "max_epoch=3", "optim.lr=2e-5", "seed=5"])
    cfg = load_train_config("llm", None, config_overrides(args, TrainConfig))
    assert (cfg.data.num_workers, cfg.data.prefetch, cfg.data.pin_memory, cfg.seed) == (2, 4, True, 7)
    assert cfg.max_epoch == 3 and cfg.optim.lr == 2e-5 and cfg.data.max_frames_in_batch == 2000
    assert args.dist_backend == "gloo" and args.no_amp and args.use_amp
    unset = config_overrides(_command_parser("train").parse_args(["--model", "llm", "--train_data", "d",
                                                                   "--model_dir", "e"]), TrainConfig)
    assert unset == {}  # flags not given leave the preset and --config alone


def test_infer_flags_build_the_synthesis_options():
    from cosytune.cli.config_flags import config_flag_values
    from cosytune.cli.infer import sampling_from_args
    from cosytune.infer.synthesizer import SynthesisOptions
    from cosytune.models.sampling import SamplingConfig

    base = ["--model_dir", "m", "--text", "hi", "--out_dir", "o"]
    args = _command_parser("infer").parse_args(base)
    # Unset flags give the dataclass defaults (sampling: the model's own values).
    assert SynthesisOptions(**config_flag_values(args, SynthesisOptions)) == SynthesisOptions()
    assert sampling_from_args(args, SamplingConfig(top_p=0.7)) == SamplingConfig(top_p=0.7)
    args = _command_parser("infer").parse_args(
        [*base, "--no-text_frontend", "--speed", "0.9", "--seed", "3", "--prompt_strategy", "guide_prefix",
         "--guide_sep", "。", "--top_k", "10", "--tau_r", "1.0", "--max_silent_run", "0"])
    options = SynthesisOptions(**config_flag_values(args, SynthesisOptions))
    assert (options.text_frontend, options.speed, options.seed, options.prompt_strategy, options.guide_sep,
            options.max_silent_run) == (False, 0.9, 3, "guide_prefix", "。", 0)
    assert sampling_from_args(args, SamplingConfig()) == SamplingConfig(top_k=10, tau_r=1.0)


def test_serve_defaults_are_the_fast_defaults_of_infer(monkeypatch):
    """``cosytune serve`` loads the model as ``cosytune infer-batch`` and ``Synthesizer.from_dir`` do by default
    (dtype auto, graphed flow on CUDA, warm-up); the opt-outs reach the engine's config."""
    import inspect

    from cosytune.cli import serve
    from cosytune.infer.synthesizer import Synthesizer
    from cosytune.serve.engine import EngineConfig

    defaults = inspect.signature(Synthesizer.from_dir).parameters
    args = _command_parser("serve").parse_args(["--model_dir", "m"])
    assert args.dtype == defaults["dtype"].default == EngineConfig.dtype == "auto"
    assert EngineConfig.fast_flow is defaults["fast_flow"].default is None and EngineConfig.warmup
    assert (args.no_fast_flow, args.no_warmup, args.no_batch_decode, args.workers) == (False, False, False, None)
    assert EngineConfig.workers is None and EngineConfig.batch_decode is None
    captured = []  # the settings run() builds, without starting a server
    monkeypatch.setattr("cosytune.serve.server.run_server", lambda settings: captured.append(settings) or {})
    serve.run(_command_parser("serve").parse_args(["--model_dir", "m", "--no_fast_flow", "--dtype", "float32",
                                                  "--no_warmup"]))
    s = captured[0]
    assert (s.dtype, s.fast_flow, s.warmup) == ("float32", False, False)

"""`cosytune run`: all stages on the shipped sample with the tiny model; an interrupted run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import pytest
import soundfile as sf

from cosytune.cli.main import main
from cosytune.pipeline import STAGES, scaled_epochs

pytestmark = pytest.mark.slow

SAMPLE = Path(str(files("cosytune") / "assets" / "sample_speaker"))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from cosytune.modeldir.presets import write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("base") / "tiny", preset="tiny", seed=0)


def _argv(work: Path, base: Path, *extra: str) -> list[str]:
    return ["run", "--audio", str(SAMPLE / "audio"), "--speaker", "allison", "--base_model", str(base),
            "--work", str(work), "--transcripts", str(SAMPLE / "transcripts.txt"), "--llm_epochs", "3",
            "--num_average", "2", "--device", "cpu", "--no_progress", *extra]


def test_interrupted_run_resumes_and_yields_a_usable_model_dir(tiny_base, tmp_path, capsys):
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "cosytune", *_argv(work, tiny_base)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = work / "exp" / "llm" / "epoch_0_whole.state.pt"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    state = json.loads((work / "state.json").read_text())
    assert "make-parquet" in state and "train-llm" not in state

    assert main(_argv(work, tiny_base)) == 0
    out = capsys.readouterr().out
    for stage in ("prepare-audio", "transcribe", "extract-embedding", "extract-speech-token", "make-parquet"):
        assert any(line.strip().startswith(stage) and "skipped" in line for line in out.splitlines()), stage
    assert (work / "exp" / "llm" / "epoch_2_whole.pt").exists()
    model = work / "models" / "allison"
    assert (model / "llm.pt").exists() and (model / "spk2info.pt").exists()
    audio, sr = sf.read(work / "out" / "tuned" / "sample.wav")
    assert sr == 24000 and len(audio) > 0

    # A third run with nothing changed skips every stage.
    assert main(_argv(work, tiny_base)) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        if stage != "train-flow":
            assert any(line.strip().startswith(stage) and "skipped" in line for line in out.splitlines()), stage
    # infer uses the assembled dir
    wav = tmp_path / "x.wav"
    assert main(["infer", "--model_dir", str(model), "--spk_id", "allison", "--text", "Hello there.",
                 "--out_wav", str(wav), "--device", "cpu"]) == 0
    assert wav.exists()


def test_force_and_stage_names(tiny_base, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(_argv(work, tiny_base, "--until", "transcribe")) == 0
    capsys.readouterr()
    assert main(_argv(work, tiny_base, "--until", "transcribe", "--force", "transcribe")) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    status = {ln[0]: ln[1] for ln in lines if len(ln) > 1 and ln[0] in STAGES}
    assert status == {"prepare-audio": "skipped", "transcribe": "done"}
    assert main(_argv(work, tiny_base, "--until", "nonsense")) == 2
    assert "stages are" in capsys.readouterr().err


def test_scaled_epochs():
    assert scaled_epochs(10) == 15 and scaled_epochs(60) == 10 and scaled_epochs(1) == 40 and scaled_epochs(0) == 10

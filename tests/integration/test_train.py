"""End-to-end SFT on the shipped sample with the tiny model: training, overfitting, exact resume
after a kill, 2-process DDP (gloo), averaging, assembling, spk2info."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cosytune.cli.main import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir) -> Path:
    return tiny_model_dir  # the session's tiny dir (tests/conftest.py): read-only


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory, tiny_base) -> Path:
    """The shipped sample through prepare-audio, transcribe, extract-* and make-parquet."""
    from importlib.resources import files

    sample = Path(str(files("cosytune") / "assets" / "sample_speaker"))
    root = tmp_path_factory.mktemp("data")
    wavs, data = root / "wavs", root / "data"
    assert main(["prepare-audio", "--in_dir", str(sample / "audio"), "--out_dir", str(wavs), "--no_progress"]) == 0
    assert main(["transcribe", "--wav_dir", str(wavs), "--out_root", str(data), "--spk_id", "allison",
                 "--transcripts", str(sample / "transcripts.txt"), "--no_progress"]) == 0
    for split in ("train", "dev"):
        d = data / split
        assert main(["extract-embedding", "--dir", str(d), "--onnx_path", str(tiny_base), "--no_progress"]) == 0
        assert main(["extract-speech-token", "--dir", str(d), "--onnx_path", str(tiny_base), "--no_progress"]) == 0
        assert main(["make-parquet", "--src_dir", str(d), "--des_dir", str(d / "parquet"), "--no_progress"]) == 0
    return data


def _train_argv(kind: str, data: Path, base: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--model", kind, "--train_data", str(data / "train" / "parquet" / "data.list"),
            "--cv_data", str(data / "dev" / "parquet" / "data.list"), "--base_model_dir", str(base),
            "--model_dir", str(run), "--device", "cpu", "--no_progress", *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
            if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("kind", ["llm", "flow"])
def test_training_runs_end_to_end(kind, sample_data, tiny_base, tmp_path, capsys):
    run = tmp_path / kind
    assert main(_train_argv(kind, sample_data, tiny_base, run, "max_epoch=2", "log_interval=1")) == 0
    out = capsys.readouterr().out
    assert f"train {kind}" in out and "best CV loss" in out
    for e in (0, 1):
        ck = run / f"epoch_{e}_whole.pt"
        sd = torch.load(ck, weights_only=True)
        assert sd["epoch"] == e and sd["step"] > 0  # upstream's format: weights + epoch/step
        info = (run / f"epoch_{e}_whole.yaml").read_text()
        assert "loss_dict" in info and "step" in info
    assert (run / "train_config.yaml").exists() and any((run / "tensorboard").iterdir())
    # the weights moved away from the base
    base = _weights(tiny_base / f"{kind}.pt")
    tuned = _weights(run / "epoch_1_whole.pt")
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k in tuned)


def test_llm_loss_falls_when_overfitting(sample_data, tiny_base, tmp_path):
    from cosytune.ranks import Ranks
    from cosytune.text.tokenizer import load_tokenizer
    from cosytune.train import build
    from cosytune.train.config import load_train_config
    from cosytune.train.data import SFTDataset
    from cosytune.train.loop import evaluate, train

    cfg = load_train_config("llm", overrides=["max_epoch=40", "accum_grad=1", "optim.lr=3e-3", "early_stop_patience=0",
                                              "tensorboard=false", "data.max_frames_in_batch=100000"])
    tok = load_tokenizer(tiny_base / "CosyVoice-BlankEN")
    ds = SFTDataset(sample_data / "dev" / "parquet" / "data.list", tok, "llm", cfg.data, cfg.seed)
    model = build.build_model("llm", tiny_base, None)
    before = evaluate(model, build.llm_step, ds, cfg, torch.device("cpu"), Ranks())
    res = train(cfg, model, build.llm_step, ds, ds, tmp_path / "run", torch.device("cpu"), resume=None)
    after = res.state.history[-1]
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["acc"] > before["acc"]


def test_resume_after_kill_is_exact(sample_data, tiny_base, tmp_path):
    """Kill a training process after its first mid-epoch checkpoint; resuming ends bit-identical to
    an uninterrupted run (the rest of epoch 0 and one whole epoch after it)."""
    extra = ("max_epoch=2", "save_per_step=1", "log_interval=1", "tensorboard=false")
    ref = tmp_path / "ref"
    assert main(_train_argv("llm", sample_data, tiny_base, ref, *extra)) == 0

    run = tmp_path / "killed"
    argv = [sys.executable, "-m", "cosytune", *_train_argv("llm", sample_data, tiny_base, run, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = run / "epoch_0_step_1.state.pt"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    assert not (run / "epoch_1_whole.pt").exists()
    assert not list(run.glob(".*.tmp*")) or all(p.name.startswith(".") for p in run.glob(".*.tmp*"))

    assert main(_train_argv("llm", sample_data, tiny_base, run, *extra)) == 0  # --resume auto is the default
    a, b = _weights(ref / "epoch_1_whole.pt"), _weights(run / "epoch_1_whole.pt")
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs from the uninterrupted one in {diff[:5]}"


def test_ddp_two_processes_gloo(sample_data, tiny_base, tmp_path):
    run = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
            "-m", "cosytune", *_train_argv("llm", sample_data, tiny_base, run, "max_epoch=1", "tensorboard=false",
                                            "--ddp.dist_backend", "gloo")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    sd = torch.load(run / "epoch_0_whole.pt", weights_only=True)
    info = (run / "epoch_0_whole.yaml").read_text()
    assert "world_size: 2" in info and sd["step"] >= 1


def test_average_assemble_spk2info_infer(sample_data, tiny_base, tmp_path, capsys):
    run = tmp_path / "llm"
    assert main(_train_argv("llm", sample_data, tiny_base, run, "max_epoch=2", "tensorboard=false")) == 0
    avg = run / "llm_avg.pt"
    assert main(["average", "--dst_model", str(avg), "--src_path", str(run), "--num", "2", "--val_best"]) == 0
    model_dir = tmp_path / "model"
    assert main(["assemble", "--base_model_dir", str(tiny_base), "--out_model_dir", str(model_dir), "--llm_pt",
                 str(avg), "--spk2embedding_pt", str(sample_data / "train" / "spk2embedding.pt")]) == 0
    from cosytune.modeldir.model_dir import ModelDir

    ModelDir.open(model_dir, deep=True)  # every file present and well-formed
    info = torch.load(model_dir / "spk2info.pt", weights_only=True)
    assert "allison" in info and info["allison"]["embedding"].shape == (1, 192)
    import importlib.util

    if importlib.util.find_spec("cosytune.cli.infer") is None:
        pytest.fail("cosytune infer is not available")
    out_wav = tmp_path / "out" / "x.wav"
    assert main(["infer", "--model_dir", str(model_dir), "--spk_id", "allison", "--text",
                 "Please enter your password.", "--out_wav", str(out_wav), "--device", "cpu", "--seed", "1"]) == 0
    import soundfile as sf

    audio, sr = sf.read(out_wav)
    assert sr == 24000 and len(audio) > 0


def test_resume_never_unpickles_code(sample_data, tiny_base, tmp_path, capsys):
    """A crafted ``.state.pt`` in the run dir is refused on ``--resume auto`` and ``--resume PATH``; its payload never runs."""
    from unsafe_payload import write_evil

    run = tmp_path / "run"
    assert main(_train_argv("llm", sample_data, tiny_base, run, "max_epoch=1", "tensorboard=false")) == 0
    state = run / "epoch_0_whole.state.pt"
    marker = tmp_path / "PWNED"
    write_evil(state, marker)
    capsys.readouterr()
    for resume in ("auto", str(run / "epoch_0_whole.pt")):
        rc = main(_train_argv("llm", sample_data, tiny_base, run, "max_epoch=2", "tensorboard=false", "--resume", resume))
        cap = capsys.readouterr()
        assert rc != 0 and "refusing to load this resume state" in cap.out + cap.err, cap.out + cap.err
        assert not marker.exists()


def test_disk_use_is_bounded(sample_data, tiny_base, tmp_path, capsys):
    """A 10-epoch run keeps the K best checkpoints plus the newest and a single resume state (the defaults),
    and a temporary left by a killed save is cleaned up when training starts again."""
    from cosytune.train.config import TrainConfig

    k = TrainConfig().keep_best
    run = tmp_path / "run"
    run.mkdir()
    (run / ".epoch_3_whole.abcd.tmp.pt").write_bytes(b"half a save")
    assert main(_train_argv("llm", sample_data, tiny_base, run, "max_epoch=10", "early_stop_patience=0",
                            "tensorboard=false", "data.max_frames_in_batch=100000")) == 0
    pts = [p for p in run.glob("epoch_*.pt") if not p.name.endswith(".state.pt")]
    states = list(run.glob("*.state.pt"))
    assert 0 < k and len(pts) <= k + 1, sorted(p.name for p in pts)
    assert [p.name for p in states] == ["epoch_9_whole.state.pt"]
    assert (run / "epoch_9_whole.pt").exists() and not list(run.glob(".*.tmp*"))
    assert "MiB held on disk by the run dir" in capsys.readouterr().out


def test_two_trainings_never_share_a_run_dir(sample_data, tiny_base, tmp_path, capsys):
    """While one training holds its --model_dir, a second one into the same dir is refused and told who holds it."""
    import json

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "cosytune", *_train_argv("llm", sample_data, tiny_base, run, "max_epoch=50",
                                                             "tensorboard=false", "early_stop_patience=0")]
    proc = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        lock = run / ".cosytune.lock"
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if lock.exists() and lock.read_text().startswith("{") and json.loads(lock.read_text())["pid"] == proc.pid:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the first training ended before the test could race it"
        capsys.readouterr()
        assert main(_train_argv("llm", sample_data, tiny_base, run, "max_epoch=1")) == 1
        err = capsys.readouterr().err
        assert "is in use by another cosytune process" in err and f"pid {proc.pid}" in err, err
    finally:
        proc.kill()
        proc.wait()


def test_truncated_checkpoint_is_a_clear_error(sample_data, tiny_base, tmp_path, capsys):
    """Resuming from a truncated checkpoint says which file is damaged and what to do (no traceback)."""
    run = tmp_path / "run"
    assert main(_train_argv("llm", sample_data, tiny_base, run, "max_epoch=1", "tensorboard=false")) == 0
    for name in ("epoch_0_whole.pt", "epoch_0_whole.state.pt"):
        f = run / name
        whole = f.read_bytes()
        f.write_bytes(whole[: len(whole) // 2])
        capsys.readouterr()
        assert main(_train_argv("llm", sample_data, tiny_base, run, "max_epoch=2", "tensorboard=false")) == 1
        err = capsys.readouterr().err
        assert str(f) in err and "truncated or corrupted" in err and "Traceback" not in err, err
        f.write_bytes(whole)


def test_resume_log_tells_the_truth(sample_data, tiny_base, tmp_path, capsys):
    """A resumed run does not claim to start from the base weights, and the data log lists drops as text."""
    run = tmp_path / "run"
    assert main(_train_argv("llm", sample_data, tiny_base, run, "max_epoch=1", "tensorboard=false")) == 0
    capsys.readouterr()
    assert main(_train_argv("llm", sample_data, tiny_base, run, "max_epoch=2", "tensorboard=false")) == 0
    text = capsys.readouterr().err  # the log goes to stderr
    assert "resumed from epoch_0_whole" in text and "starting from the base model" not in text, text
    kept = [line for line in text.splitlines() if "utterances kept, dropped" in line]
    assert kept and all("{" not in line for line in kept), kept

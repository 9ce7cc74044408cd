"""SFT over several processes (torchrun, gloo on CPU): every parameter gets a gradient (so DDP needs no unused-
parameter search), a 2-rank run killed and resumed equals an uninterrupted 2-rank run bit for bit, the same
command runs over 2 "nodes" (c10d rendezvous on 127.0.0.1), and a resume on another rank count is defined and
says so. The data is a small synthetic parquet set (no data-prep stages), so each launch takes seconds."""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from proc_tree import kill_tree

from cosytune.cli.main import main

INSTRUCT = "You are a helpful assistant.<|endofprompt|>"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "owls", "sing"]


def _write_shard(path: Path, n: int, seed: int) -> Path:
    """A parquet shard of ``n`` utterances (1-2 s of 24 kHz noise, matching speech tokens and embeddings)
    and its data.list: the columns make-parquet writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    from cosytune.data.parquet import parquet_schema

    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {c: [] for c in ("utt", "audio_data", "text", "spk", "utt_embedding", "spk_embedding",
                                              "speech_token", "instruct")}
    spk = rng.standard_normal(192).astype(np.float32)
    for i in range(n):
        n_tok = int(rng.integers(25, 51))  # 1-2 s at 25 tokens/s
        buf = io.BytesIO()
        sf.write(buf, (0.1 * rng.standard_normal(n_tok * 960)).astype(np.float32), 24000, format="WAV")
        rows["utt"].append(f"u{seed}_{i:03d}")
        rows["audio_data"].append(buf.getvalue())
        rows["text"].append(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))))
        rows["spk"].append("s")
        rows["utt_embedding"].append(rng.standard_normal(192).astype(np.float32).tolist())
        rows["spk_embedding"].append(spk.tolist())
        rows["speech_token"].append(rng.integers(0, 6561, n_tok).tolist())
        rows["instruct"].append(INSTRUCT)
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pydict(rows, schema=parquet_schema(list(rows))), path / "part_0.parquet")
    (path / "data.list").write_text(str(path / "part_0.parquet") + "\n", encoding="utf-8")
    return path / "data.list"


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir) -> Path:
    return tiny_model_dir  # the session's tiny dir (tests/conftest.py): read-only


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    return {"train": _write_shard(root / "train", 12, 1), "cv": _write_shard(root / "cv", 2, 2)}


def _argv(data: dict[str, Path], base: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--model", "llm", "--train_data", str(data["train"]), "--cv_data", str(data["cv"]),
            "--base_model_dir", str(base), "--model_dir", str(run), "--device", "cpu", "--no_progress",
            "max_epoch=2", "save_per_step=2", "accum_grad=1", "log_interval=1", "tensorboard=false",
            "data.max_frames_in_batch=200", *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
            if isinstance(v, torch.Tensor)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.parametrize("kind", ["llm", "flow"])
def test_every_parameter_gets_a_gradient(kind, tiny_base, data):
    """What lets DDP run without find_unused_parameters (train.distributed.EVERY_PARAM_USED): every trainable
    parameter of the network gets a gradient on every step, whichever mode the step draws."""
    from cosytune.text.tokenizer import load_tokenizer
    from cosytune.train import build
    from cosytune.train.config import load_train_config
    from cosytune.train.data import SFTDataset
    from cosytune.train.distributed import EVERY_PARAM_USED

    assert kind in EVERY_PARAM_USED
    cfg = load_train_config(kind, overrides=["data.max_frames_in_batch=200"])
    ds = SFTDataset(data["train"], load_tokenizer(tiny_base / "CosyVoice-BlankEN"), kind, cfg.data, cfg.seed)
    model = build.build_model(kind, tiny_base, None)
    model.train()
    for step, indices in enumerate(ds.epoch_batches(0, 0, 1)[:3 if kind == "llm" else 2]):
        random.seed(step)  # the LLM's bistream/unistream draw
        torch.manual_seed(step)
        build.STEP_FUNCTIONS[kind](model, ds.collate(indices))["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"step {step}: no gradient for {missing[:5]}"
        model.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_two_ranks_resume_exactly_multinode_and_on_another_rank_count(tiny_base, data, tmp_path, capsys):
    # 1. The reference: 2 "nodes" of 1 process each, c10d rendezvous on 127.0.0.1 (the multi-node command).
    ref = tmp_path / "ref"
    port = _free_port()
    agents = [subprocess.Popen(
        [*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
         "--rdzv_id=cosytune-test", "--local_addr=127.0.0.1", "--rdzv_conf=join_timeout=120",
         "-m", "cosytune", *_argv(data, tiny_base, ref)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        errs = [a.communicate(timeout=300)[1] for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert all(a.returncode == 0 for a in agents), "\n".join(e[-3000:] for e in errs)
    info = (ref / "epoch_1_whole.yaml").read_text()
    assert "world_size: 2" in info
    log = "\n".join(errs)
    assert "find_unused_parameters=False static_graph=True" in log and "data loader" in log, log[-3000:]

    # 2. The same job on one node, killed after its mid-epoch checkpoint, then resumed: bit-identical weights.
    run = tmp_path / "killed"
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "cosytune", *_argv(data, tiny_base, run)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "epoch_0_step_2.yaml"  # written last: the checkpoint is complete
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    kill_tree(proc)  # the launcher and its workers, at once
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    assert not (run / "epoch_1_whole.pt").exists()
    other = tmp_path / "other_count"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns(".cosytune.lock"))
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from epoch_0_step_" in out.stderr
    a, b = _weights(ref / "epoch_1_whole.pt"), _weights(run / "epoch_1_whole.pt")
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"the resumed 2-rank run differs from the uninterrupted one in {diff[:5]}"

    # 3. The killed 2-rank run resumed by a single process: defined, logged, and it finishes the run.
    capsys.readouterr()
    assert main(_argv(data, tiny_base, other, "save_per_step=-1")) == 0  # fewer saves: the test's time
    err = capsys.readouterr().err
    assert "was saved by a run on 2 process(es) and is resumed on 1" in err, err[-3000:]
    assert "not be bit-identical" in err and (other / "epoch_1_whole.pt").is_file()
    ckpt = torch.load(other / "epoch_1_whole.pt", weights_only=True)
    steps_2rank = torch.load(ref / "epoch_1_whole.pt", weights_only=True)["step"]
    assert ckpt["step"] > steps_2rank  # one rank takes twice the steps per epoch for the rest of the run

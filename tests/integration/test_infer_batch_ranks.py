"""``torchrun --nproc_per_node=2 -m cosytune infer-batch`` (gloo, CPU) against one process: killed mid-run and
resumed, the 2-rank run leaves the same files with the same audio as the single-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from proc_tree import kill_tree
from speaker_models import speaker_model_dir

from cosytune.cli.main import main

pytestmark = pytest.mark.slow

TEXTS = ["Hello there.", "One more line.", "Short.", "The fox jumps over the dog.", "Owls sing.", "Good night."]


def _files(out) -> dict[str, object]:
    return {p.name: p for p in sorted(out.iterdir()) if not p.name.startswith(".")}


def test_two_ranks_interrupted_and_resumed_equal_one_process(tmp_path, tiny_model_dir):
    model = speaker_model_dir(tmp_path / "model", tokenizer_from=tiny_model_dir / "CosyVoice-BlankEN")
    lines = tmp_path / "in.txt"
    lines.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    common = ["infer-batch", "--model_dir", str(model), "--spk_id", "alice", "--input", str(lines), "--seed", "5",
              "--batch_size", "1", "--no_text_frontend", "--device", "cpu", "--no_progress"]
    ref = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same float sums, bit for bit
    try:
        assert main([*common, "--out_dir", str(ref)]) == 0
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cosytune",
           *common, "--out_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not list(out.glob("batch.rank*.jsonl")):
        time.sleep(0.005)
    kill_tree(proc)  # the launcher and its workers, at once
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; give it more segments"
    written = len(list(out.glob("seg_*.wav")))
    assert 0 < written < len(TEXTS) and not (out / "run.json").exists()

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipped (unchanged)" in res.stdout
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["request"]["skipped"] >= 1 and info["request"]["written"] + info["request"]["skipped"] == len(TEXTS)

    # The same files (the rank parts are gone), the same audio, the same manifest but for the paths.
    assert _files(out).keys() == _files(ref).keys()
    for i in range(len(TEXTS)):
        a, _ = sf.read(str(ref / f"seg_{i:04d}.wav"), dtype="int16")
        b, _ = sf.read(str(out / f"seg_{i:04d}.wav"), dtype="int16")
        np.testing.assert_array_equal(a, b, err_msg=f"segment {i}")

    def manifest(d):
        return [{k: v for k, v in json.loads(x).items() if k != "path"}
                for x in (d / "batch.jsonl").read_text(encoding="utf-8").splitlines()]

    assert manifest(out) == manifest(ref)

"""Shared by the ``cosytune serve`` tests and its benchmark: a tiny speaker model with checkpoint variants, a
transcribed dataset, and a real server subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SR = 24000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def variant_model(root: Path) -> dict[str, Path]:
    """A tiny base model dir (speaker ``alice``), a training run dir ``work/exp/llm`` with ``epoch_1_whole`` and
    ``llm_avg.pt`` (the base LLM weights nudged: real weight files in the layout training writes), and the
    speaker model dir assembled from ``llm_avg.pt`` (so ``base`` is a variant too)."""
    from speaker_models import speaker_model_dir

    from cosytune.modeldir.package import assemble
    from cosytune.weights.io import read_state_dict

    base = speaker_model_dir(root / "base")
    run = root / "work" / "exp" / "llm"
    run.mkdir(parents=True)
    sd, _ = read_state_dict(base / "llm.pt")
    for epoch, scale in ((1, 0.02), (2, 0.03)):
        g = torch.Generator().manual_seed(epoch)
        tuned = {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
                 for k, v in sd.items()}
        tied = "llm.model.lm_head.weight", "llm.model.model.embed_tokens.weight"
        if all(k in tuned for k in tied):
            tuned[tied[0]] = tuned[tied[1]]  # the Qwen2 head stays tied to the embedding
        torch.save({**tuned, "epoch": epoch, "step": 10 * epoch}, run / f"epoch_{epoch}_whole.pt")
        (run / f"epoch_{epoch}_whole.yaml").write_text(
            f"epoch: {epoch}\nstep: {10 * epoch}\ntag: CV\nloss_dict: {{loss: {3.0 - epoch / 10}}}\n")
        if epoch == 2:
            torch.save(tuned, run / "llm_avg.pt")
    model = root / "model"
    assemble(base, model, run / "llm_avg.pt", spk2embedding_pt=root / "base_spk2embedding.pt", spk_ids=["alice"])
    return {"base": base, "model": model, "run": root / "work"}


def transcribed_dataset(root: Path) -> Path:
    """A ``cosytune transcribe`` out dir (transcripts backend) of four short noise clips."""
    from cosytune.data.transcribe import TranscribeConfig, transcribe_dataset
    from cosytune.fileio import write_jsonl

    wavs, rows = root / "wavs", []
    wavs.mkdir(parents=True)
    (root / "raw").mkdir()
    for i, name in enumerate("abcd"):
        rng = np.random.default_rng(i)
        sf.write(str(wavs / f"{name}.wav"), (0.05 * rng.standard_normal(3 * SR)).astype(np.float32), SR)
        rows.append({"utt": name, "wav": f"{name}.wav", "source": str(root / "raw" / f"{name}.mp3"),
                     "source_rel": f"{name}.mp3", "duration_s": 3.0, "sample_rate": SR, "segment_index": 0,
                     "num_segments": 1})
        (root / "raw" / f"{name}.txt").write_text(f"Recording {name} says something short.")
    write_jsonl(wavs / "prepared.jsonl", rows)
    out = root / "transcribed"
    transcribe_dataset(wavs, out, TranscribeConfig(backend="transcripts", dev_size=1))
    return out


class ServerProcess:
    """``cosytune serve`` in a subprocess on 127.0.0.1 (stopped with SIGINT, then SIGKILL); ``start_s``: seconds
    until it answered ``/health``. ``benchmarks/bench_serve.py`` starts its server with this too."""

    def __init__(self, args: list[str], log: Path, *, timeout_s: float = 300.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self._log = open(log, "wb")  # noqa: SIM115 - the server writes into it until stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "cosytune", "serve", "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait(timeout_s)

    def _wait(self, timeout_s: float) -> None:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cosytune serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.start_s = time.monotonic() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"cosytune serve did not answer /health within {timeout_s} s:\n{self.output()}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log.read_text(errors="replace")[-5000:]

    def stop(self) -> int | None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required", "--mute-audio",
                  "--window-size=1280,900")


def browser_missing() -> str | None:
    """Why the system browser cannot run here (None when it can)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        return (f"{' and '.join(missing)} not found: the browser tests drive Debian's chromium with chromium-driver. "
                "Install them with 'apt-get install chromium chromium-driver' (scripts/setup.sh does this when run "
                "as root), or set COSYTUNE_SKIP_BROWSER=1 to skip these tests")
    return None


def start_browser(profile: Path):
    """Headless Chromium through Selenium with the system browser and driver (nothing is downloaded)."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(f)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)

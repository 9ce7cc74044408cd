"""The scoring networks: Resemblyzer's voice encoder, DNSMOS (P.835 + P.808) and CAM++ similarity.

Their weights ship inside pip packages (``resemblyzer``: ``pretrained.pt``; ``speechmos``: the DNSMOS
ONNX files), so nothing downloads. Neither package is imported: ``resemblyzer``'s ``__init__`` imports
``webrtcvad``, whose old release imports ``pkg_resources`` (gone from current setuptools), and
``speechmos.dnsmos`` imports ``requests`` and builds its sessions with default options. Only the files are
located (``importlib.util.find_spec`` does not execute a package), and the networks are run here: the
voice encoder is a 3-layer LSTM (40 mel bands → 256) + linear + ReLU, L2-normalised, over 1.6 s partial
windows; DNSMOS scores 9.01 s windows hopped by 1 s with its published polynomial calibration.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

import numpy as np

from cosytune.errors import UsageError

logger = logging.getLogger(__name__)

RATE = 16000
"""Both scorers read 16 kHz mono audio."""

EVAL_EXTRA_HINT = "pip install 'cosytune[eval]'"


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing (executing) it.

    Raises:
        UsageError: the package is not installed (the message names the extra that installs it).
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the {name!r} package is not installed; it ships the weights of an evaluation model. "
                         f"Install it with: {EVAL_EXTRA_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def available() -> str | None:
    """None when both scorers' packages are installed, else why not."""
    missing = [n for n in ("resemblyzer", "speechmos") if importlib.util.find_spec(n) is None]
    return None if not missing else f"{', '.join(missing)} not installed ({EVAL_EXTRA_HINT})"


def to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1 if audio.shape[1] <= 8 else 0)
    if sample_rate != RATE:
        import soxr

        audio = soxr.resample(audio, sample_rate, RATE, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else 0.0


# ------------------------------------------------------------------------------------------ voice encoder
class VoiceEncoder:
    """Resemblyzer's pretrained speaker encoder (GE2E, 256-d), run without importing ``resemblyzer``.

    ``embed(audio_16k)`` → an L2-normalised 256-d vector: the mean of the embeddings of 1.6 s windows
    (1.3 windows per second, the last kept when at least 75 % covered), re-normalised. Audio is first
    raised to -30 dBFS (never lowered) and long silences are cut (an energy gate over 30 ms frames).
    """

    MEL_BANDS, HIDDEN, LAYERS, EMBED = 40, 256, 3, 256
    WINDOW_FRAMES, HOP = 160, 160  # 1.6 s windows of 10 ms frames (25 ms FFT windows)
    RATE_PER_S, MIN_COVERAGE = 1.3, 0.75

    def __init__(self, device: str = "cpu", weights: str | Path | None = None) -> None:
        import torch

        from cosytune.weights.io import torch_load_safely

        path = Path(weights) if weights else package_dir("resemblyzer") / "pretrained.pt"
        state = torch_load_safely(path, what="Resemblyzer voice encoder weights")
        state = state.get("model_state", state) if isinstance(state, dict) else state
        self.lstm = torch.nn.LSTM(self.MEL_BANDS, self.HIDDEN, self.LAYERS, batch_first=True)
        self.linear = torch.nn.Linear(self.HIDDEN, self.EMBED)
        self.lstm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("lstm.")})
        self.linear.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("linear.")})
        self.device = torch.device(device)
        self.lstm.to(self.device).eval()
        self.linear.to(self.device).eval()
        self.path = path
        import librosa

        self._mel_fb = librosa.filters.mel(sr=RATE, n_fft=400, n_mels=self.MEL_BANDS).astype(np.float32)

    @staticmethod
    def preprocess(audio_16k: np.ndarray) -> np.ndarray:
        """Raise quiet audio to -30 dBFS and cut silences longer than ~0.2 s."""
        wav = np.asarray(audio_16k, dtype=np.float32)
        power = float(np.mean(wav.astype(np.float64) ** 2)) if wav.size else 0.0
        if power > 0:
            gain_db = -30.0 - 10 * np.log10(power)
            if gain_db > 0:
                wav = wav * np.float32(10 ** (gain_db / 20))
        frame = 480  # 30 ms
        n = len(wav) // frame
        if n < 2:
            return wav
        energy = 10 * np.log10(np.mean(wav[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-10)
        voiced = energy > max(energy.max() - 45.0, -70.0)
        # Smooth (moving average over 8 frames) and keep 6 frames either side of speech.
        smooth = np.convolve(voiced.astype(np.float32), np.ones(8) / 8, mode="same") > 0.5
        keep = np.convolve(smooth.astype(np.float32), np.ones(13), mode="same") > 0
        if not keep.any():
            return wav
        return np.concatenate([wav[i * frame:(i + 1) * frame] for i in np.flatnonzero(keep)])

    def mel(self, wav: np.ndarray) -> np.ndarray:
        """(frames, 40) mel power spectrogram (25 ms windows, 10 ms hop)."""
        import librosa

        spec = np.abs(librosa.stft(wav, n_fft=400, hop_length=self.HOP)) ** 2
        return (self._mel_fb @ spec).T.astype(np.float32)

    def _windows(self, n_samples: int) -> list[tuple[int, int]]:
        n_frames = int(np.ceil((n_samples + 1) / self.HOP))
        step = round(RATE / self.RATE_PER_S / self.HOP)
        starts = list(range(0, max(1, n_frames - self.WINDOW_FRAMES + step + 1), step))
        wins = [(s, s + self.WINDOW_FRAMES) for s in starts]
        last = wins[-1]
        coverage = (n_samples - last[0] * self.HOP) / (self.WINDOW_FRAMES * self.HOP)
        if coverage < self.MIN_COVERAGE and len(wins) > 1:
            wins = wins[:-1]
        return wins

    def embed(self, audio_16k: np.ndarray, preprocess: bool = True) -> np.ndarray:
        """The 256-d embedding of one clip (16 kHz mono)."""
        import torch

        wav = self.preprocess(audio_16k) if preprocess else np.asarray(audio_16k, np.float32)
        if wav.size == 0:
            wav = np.zeros(RATE, np.float32)
        wins = self._windows(len(wav))
        need = wins[-1][1] * self.HOP
        if need > len(wav):
            wav = np.pad(wav, (0, need - len(wav)))
        mel = self.mel(wav)
        batch = np.stack([mel[a:b] for a, b in wins])
        # A few 160-step LSTM windows are latency-bound: on CPU one thread is as fast when idle and several
        # times faster on a busy machine than torch's pool (measured 0.11 vs 0.40 s per 4 s clip, 2 cores).
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                _, (hidden, _) = self.lstm(torch.from_numpy(batch).to(self.device))
                e = torch.relu(self.linear(hidden[-1]))
                e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
        finally:
            torch.set_num_threads(threads)
        mean = e.mean(0).cpu().numpy()
        return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ DNSMOS
class Dnsmos:
    """DNSMOS P.835 (SIG, BAK, OVRL) and P.808 MOS from the ONNX models shipped in ``speechmos``.

    Scores are the means over 9.01 s windows hopped by 1 s; a shorter clip is repeated to fill one
    window (DNSMOS's own rule). Input: 16 kHz mono in [-1, 1] (clipped to it).
    """

    WINDOW_S = 9.01

    def __init__(self, device: str = "cpu", threads: int = 0) -> None:
        import onnxruntime as ort

        from cosytune.modeldir.onnx_models import resolve_providers

        root = package_dir("speechmos") / "dnsmos_models"
        choice = resolve_providers(device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(0, int(threads))
        opts.log_severity_level = 3
        self.primary = ort.InferenceSession(str(root / "sig_bak_ovr.onnx"), opts, providers=choice.providers)
        self.p808 = ort.InferenceSession(str(root / "model_v8.onnx"), opts, providers=choice.providers)
        self.root = root
        import librosa

        self._mel_fb = librosa.filters.mel(sr=RATE, n_fft=321, n_mels=120).astype(np.float32)
        self._lock = threading.Lock()

    # The published calibration of the raw P.835 outputs (non-personalised model).
    _SIG = np.poly1d([-0.08397278, 1.22083953, 0.0052439])
    _BAK = np.poly1d([-0.13166888, 1.60915514, -0.39604546])
    _OVR = np.poly1d([-0.06766283, 1.11546468, 0.04602535])

    def _p808_features(self, seg: np.ndarray) -> np.ndarray:
        import librosa

        spec = np.abs(librosa.stft(seg, n_fft=321, hop_length=160)) ** 2
        mel = self._mel_fb @ spec
        db = (librosa.power_to_db(mel, ref=np.max) + 40) / 40
        return db.T.astype(np.float32)[None]

    def score(self, audio_16k: np.ndarray) -> dict[str, float]:
        """``{"sig", "bak", "ovrl", "p808"}`` of one clip."""
        audio = np.clip(np.asarray(audio_16k, dtype=np.float32), -1.0, 1.0)
        need = int(self.WINDOW_S * RATE)
        if audio.size == 0:
            audio = np.zeros(need, np.float32)
        while len(audio) < need:
            audio = np.concatenate([audio, audio])
        hops = int(np.floor(len(audio) / RATE) - self.WINDOW_S) + 1
        segs = [audio[i * RATE: i * RATE + need] for i in range(max(1, hops))]
        segs = np.stack([seg for seg in segs if len(seg) == need])
        feats = np.concatenate([self._p808_features(seg[:-160]) for seg in segs])
        # All windows of a clip in one call per model (both take a dynamic batch dimension).
        with self._lock:
            p808 = self.p808.run(None, {"input_1": feats})[0].reshape(len(segs), -1)[:, 0]
            raw = self.primary.run(None, {"input_1": segs})[0].reshape(len(segs), -1)[:, :3]
        rows = [(float(self._SIG(s)), float(self._BAK(b)), float(self._OVR(o)), float(q))
                for (s, b, o), q in zip(raw, p808)]
        m = np.mean(np.asarray(rows, np.float64), axis=0)
        return {"sig": float(m[0]), "bak": float(m[1]), "ovrl": float(m[2]), "p808": float(m[3])}


# ----------------------------------------------------------------------------------------------- CAM++
class CamPlusSimilarity:
    """Cosine similarity of CAM++ embeddings (the encoder CosyVoice conditions on; reported for continuity
    with upstream papers, not used for selection, since the model was trained to match it)."""

    def __init__(self, campplus_onnx: str | Path, device: str = "cpu") -> None:
        from cosytune.modeldir.onnx_models import CampPlus

        self.model = CampPlus(campplus_onnx, device=device)

    def embed(self, audio_16k: np.ndarray) -> np.ndarray:
        import torch

        from cosytune.data.embedding import compute_campplus_feature

        return self.model.embed(compute_campplus_feature(torch.from_numpy(np.asarray(audio_16k, np.float32))))

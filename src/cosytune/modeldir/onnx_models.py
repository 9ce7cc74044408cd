"""onnxruntime wrappers for the two front-end ONNX models shipped with Fun-CosyVoice3-0.5B.

* :class:`CampPlus` — ``campplus.onnx``: CMN Kaldi fbank ``(1, T, 80)`` float32 → speaker embedding
  ``(1, 192)`` (upstream ``FunAudioLLM/CosyVoice:cosyvoice/cli/frontend.py`` ``_extract_spk_embedding``,
  ``tools/extract_embedding.py``).
* :class:`SpeechTokenizer` — ``speech_tokenizer_v3.onnx``: Whisper log-mel ``(1, 128, T)`` float32 plus
  its length ``(1,)`` int32 → token ids (25 Hz, ~4 feature frames per token; ``_extract_speech_token``,
  ``tools/extract_speech_token.py``). The ``speech_tokenizer_v3.batch.onnx`` variant takes ``(B, 128, T)``
  with per-row lengths.

Inputs are passed by *position*, as upstream does, so the wrappers do not depend on tensor names.

Providers (``device``): ``"cpu"``, ``"cuda"`` / ``"cuda:N"``, or ``"auto"`` (CUDA when this onnxruntime
build has a working CUDA provider, else CPU). ``COSYVOICE_ORT_FORCE_CPU=1`` in the environment forces CPU
(the variable upstream's seed workflow uses). When the CUDA provider cannot load — e.g. the seed's
``libcublasLt.so.11: cannot open shared object file`` — the wrapper logs **one** warning that names the
missing library and runs on CPU; it never crashes and never lets onnxruntime flood the log.

Batching:
* CAM++ has no length input and pools statistics over every frame it is given, so zero padding would
  change an embedding. Only utterances of identical length share a call; everything else runs as
  concurrent single calls on a thread pool (onnxruntime releases the GIL; ``session.run`` is
  thread-safe).
* The tokenizer takes lengths. When its batch axis is dynamic (and by default only on CUDA: on CPU,
  single calls on a thread pool measured faster), utterances are sorted by length and
  packed into zero-padded batches under a frame budget; each row is cut to its own token count
  (a second model output with lengths if the model has one, else ``length // 4`` as upstream's
  training code does). Before trusting a model with batches, the first call checks that batched
  tokens equal one-by-one tokens on a few utterances (same lengths, >= 98 % of codes — batched GEMMs may
  flip a rounding-edge code); if not, it warns once and uses batch 1.
  With a fixed batch axis of 1 (the released non-batch file) single calls run on the thread pool.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cosytune.errors import ModelDirError, UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "FORCE_CPU_ENV",
    "CampPlus",
    "ProviderChoice",
    "SpeechTokenizer",
    "resolve_onnx_path",
    "resolve_providers",
]

FORCE_CPU_ENV = "COSYVOICE_ORT_FORCE_CPU"
CAMPPLUS_FILE = "campplus.onnx"
TOKENIZER_FILE = "speech_tokenizer_v3.onnx"
TOKENIZER_FRAMES_PER_TOKEN = 4
DEFAULT_GPU_BATCH = 32
MIN_BATCH_AGREEMENT = 0.98  # share of tokens a batched call must reproduce before batching is trusted


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderChoice:
    """The execution providers to request, and why CUDA is not among them (if it was wanted)."""

    providers: list
    """Argument for ``InferenceSession(providers=...)``."""
    device: str
    """``"cpu"`` or ``"cuda"``: what the session is expected to run on."""
    cuda_problem: str | None = None
    """Why CUDA was wanted but is not used (shown once as a warning), else ``None``."""


def _cuda_provider_problem(capi_dir: Path | None = None, available: Sequence[str] | None = None) -> str | None:
    """Return why onnxruntime's CUDA provider cannot load here, or ``None`` if it can.

    onnxruntime only reports a failed provider through its own C++ log (and then quietly runs on
    CPU), so the reason is found by loading the provider library the way onnxruntime would: the
    dynamic loader's message names the missing dependency (``libcublasLt.so.11: cannot open ...``).

    Args:
        capi_dir: where the provider libraries live (default: onnxruntime's ``capi`` folder).
        available: the build's providers (default: ``onnxruntime.get_available_providers()``).
    """
    import onnxruntime as ort

    available = ort.get_available_providers() if available is None else available
    if "CUDAExecutionProvider" not in available:
        return (f"this onnxruntime build ({ort.__version__}) has no CUDAExecutionProvider; "
                "install the matching onnxruntime-gpu package to use a GPU")
    capi = Path(ort.__file__).parent / "capi" if capi_dir is None else Path(capi_dir)
    libs = sorted(capi.glob("libonnxruntime_providers_cuda*.so*")) + sorted(capi.glob("onnxruntime_providers_cuda*.dll"))
    if not libs:
        return None  # cannot check; let the session decide
    try:
        if hasattr(ort, "preload_dlls") and capi_dir is None:
            # onnxruntime >= 1.21 can preload CUDA/cuDNN from pip-installed nvidia-* wheels or torch.
            try:
                ort.preload_dlls(directory="")
            except Exception as e:  # noqa: BLE001 - best effort only; the load below is the real test
                logger.debug("onnxruntime.preload_dlls failed: %s", e)
        shared = sorted(capi.glob("libonnxruntime_providers_shared*.so*"))
        if shared:
            ctypes.CDLL(str(shared[0]), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(libs[0]))
    except OSError as e:
        return f"onnxruntime's CUDA provider cannot load: {e}"
    return None


def resolve_providers(device: str = "auto", env: Mapping[str, str] | None = None) -> ProviderChoice:
    """Decide which onnxruntime providers to use.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        env: environment to read ``COSYVOICE_ORT_FORCE_CPU`` from (default ``os.environ``).

    Returns:
        A :class:`ProviderChoice`; ``cuda_problem`` is set when CUDA was asked for (explicitly, or by
        ``auto`` on a machine whose onnxruntime has the provider) but cannot be used.

    Raises:
        UsageError: for an unknown device string.
    """
    env = os.environ if env is None else env
    dev = (device or "auto").strip().lower()
    if dev not in ("auto", "cpu", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise UsageError(f"--onnx_device must be cpu, cuda, cuda:N or auto; got {device!r}")
    cpu = ProviderChoice(["CPUExecutionProvider"], "cpu")
    if str(env.get(FORCE_CPU_ENV, "")).strip() not in ("", "0", "false", "False"):
        if dev.startswith("cuda"):
            logger.info("%s is set: onnxruntime runs on CPU although %s was requested", FORCE_CPU_ENV, device)
        return cpu
    if dev == "cpu":
        return cpu
    import onnxruntime as ort

    if dev == "auto" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return cpu  # a CPU-only onnxruntime: nothing to warn about
    problem = _cuda_provider_problem()
    if problem is not None:
        return ProviderChoice(["CPUExecutionProvider"], "cpu", cuda_problem=problem)
    device_id = int(dev[5:]) if dev.startswith("cuda:") else int(env.get("LOCAL_RANK", "0") or 0)
    # HEURISTIC: the default EXHAUSTIVE cuDNN search re-benchmarks every new input length, and utterance
    # lengths all differ (measured on an H200: 18 -> 199 utt/s for a CAM++-sized encoder).
    options = {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}
    return ProviderChoice([("CUDAExecutionProvider", options), "CPUExecutionProvider"], "cuda")


def _make_session(path: Path, device: str, intra_op_threads: int, env: Mapping[str, str] | None):
    import onnxruntime as ort

    choice = resolve_providers(device, env)
    if choice.cuda_problem:
        logger.warning("ONNX model %s runs on CPU: %s", path.name, choice.cuda_problem)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = max(0, int(intra_op_threads))
    opts.log_severity_level = 3  # errors only: provider fallbacks are reported by us, once
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=choice.providers)
    except Exception as e:
        raise ModelDirError(
            f"cannot load ONNX model {path}: {e}. Expected an ONNX file as shipped with Fun-CosyVoice3-0.5B "
            "(or one written by `cosytune init-model`); re-download or rebuild it."
        ) from e
    used = sess.get_providers()
    if choice.device == "cuda" and "CUDAExecutionProvider" not in used:
        logger.warning("ONNX model %s runs on CPU: onnxruntime could not start its CUDA provider", path.name)
    return sess, ("cuda" if "CUDAExecutionProvider" in used else "cpu")


def resolve_onnx_path(path: str | os.PathLike, filename: str) -> Path:
    """Accept either the ONNX file itself or a model directory containing ``filename``.

    Raises:
        ModelDirError: if neither exists.
    """
    p = Path(path)
    if p.is_dir():
        cand = p / filename
        if cand.is_file():
            return cand
        raise ModelDirError(f"model directory {p} has no {filename}; pass the file itself with --onnx_path, "
                            "or a directory that contains it")
    if p.is_file():
        return p
    raise ModelDirError(f"ONNX model {p} does not exist; expected {filename} or a model directory containing it")


def _static_dim(d) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _run_parallel(fn, items: Sequence, num_threads: int) -> list:
    if num_threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        return list(pool.map(fn, items))


# ----------------------------------------------------------------------------------------------
# CAM++
# ----------------------------------------------------------------------------------------------


class CampPlus:
    """CAM++ speaker encoder (``campplus.onnx``) through onnxruntime.

    Args:
        path: ``campplus.onnx`` or a model directory containing it.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        num_threads: concurrent ``session.run`` calls (upstream's ``--num_thread``).
        intra_op_threads: onnxruntime threads per call (0 = onnxruntime's default).
        env: environment for ``COSYVOICE_ORT_FORCE_CPU`` (default ``os.environ``).
    """

    def __init__(self, path: str | os.PathLike, *, device: str = "auto", num_threads: int = 1,
                 intra_op_threads: int = 1, env: Mapping[str, str] | None = None) -> None:
        self.path = resolve_onnx_path(path, CAMPPLUS_FILE)
        self.session, self.device = _make_session(self.path, device, intra_op_threads, env)
        self.num_threads = max(1, int(num_threads))
        inp = self.session.get_inputs()
        if len(inp) < 1 or len(inp[0].shape) != 3:
            raise ModelDirError(f"{self.path}: expected a CAM++ model with one input of shape (B, T, 80); "
                                f"found inputs {[(i.name, i.shape) for i in inp]}")
        self.input_name = inp[0].name
        self.feat_dim = _static_dim(inp[0].shape[2]) or 80
        self.dynamic_batch = _static_dim(inp[0].shape[0]) is None

    def _run(self, feats: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(feats, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32).reshape(feats.shape[0], -1)

    def embed(self, feat: np.ndarray) -> np.ndarray:
        """Embed one utterance.

        Args:
            feat: ``(T, 80)`` float32 CMN fbank.

        Returns:
            ``(D,)`` float32 embedding (D = 192 for the real model).
        """
        return self.embed_many([feat])[0]

    def embed_many(self, feats: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Embed many utterances; results are in input order and equal to one-by-one calls.

        Args:
            feats: ``(T_i, 80)`` float32 arrays.

        Returns:
            One ``(D,)`` float32 array per input.
        """
        for i, f in enumerate(feats):
            if f.ndim != 2 or f.shape[1] != self.feat_dim or f.shape[0] < 1:
                raise ValueError(f"CAM++ input {i}: expected (T>=1, {self.feat_dim}) features; got {f.shape}")
        groups: dict[int, list[int]] = {}
        if self.dynamic_batch:
            for i, f in enumerate(feats):
                groups.setdefault(f.shape[0], []).append(i)  # equal length only: no padding
        else:
            groups = {-i - 1: [i] for i in range(len(feats))}
        jobs = list(groups.values())
        outs = _run_parallel(lambda idx: self._run(np.stack([feats[i] for i in idx])), jobs, self.num_threads)
        result: list[np.ndarray | None] = [None] * len(feats)
        for idx, out in zip(jobs, outs):
            for row, i in enumerate(idx):
                result[i] = out[row]
        return result  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Speech tokenizer
# ----------------------------------------------------------------------------------------------


class SpeechTokenizer:
    """S3 speech tokenizer v3 (``speech_tokenizer_v3.onnx`` or its ``.batch`` variant).

    Args:
        path: the ONNX file, or a model directory containing ``speech_tokenizer_v3.onnx``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        num_threads: concurrent ``session.run`` calls for unbatched work.
        intra_op_threads: onnxruntime threads per call (0 = onnxruntime's default).
        max_batch: most utterances per call when the model takes a dynamic batch (1 disables batching).
            ``None`` (default): 32 on CUDA, 1 on CPU — measured on CPU, padded batches of a
            transformer tokenizer run slower than single calls spread over threads.
        max_batch_frames: padded feature frames per call (``B × T_max``), bounding memory.
        env: environment for ``COSYVOICE_ORT_FORCE_CPU`` (default ``os.environ``).
    """

    def __init__(self, path: str | os.PathLike, *, device: str = "auto", num_threads: int = 1,
                 intra_op_threads: int = 1, max_batch: int | None = None, max_batch_frames: int = 32 * 3000,
                 env: Mapping[str, str] | None = None) -> None:
        self.path = resolve_onnx_path(path, TOKENIZER_FILE)
        self.session, self.device = _make_session(self.path, device, intra_op_threads, env)
        self.num_threads = max(1, int(num_threads))
        inp = self.session.get_inputs()
        if len(inp) < 2 or len(inp[0].shape) != 3:
            raise ModelDirError(
                f"{self.path}: expected a speech tokenizer with inputs feats (B, 128, T) and feats_length (B,); "
                f"found {[(i.name, i.shape) for i in inp]}"
            )
        self.feats_name, self.len_name = inp[0].name, inp[1].name
        self.n_mels = _static_dim(inp[0].shape[1]) or 128
        self.len_dtype = np.int64 if "int64" in inp[1].type else np.int32
        self.dynamic_batch = _static_dim(inp[0].shape[0]) is None
        self.has_len_output = len(self.session.get_outputs()) >= 2
        if max_batch is None:
            max_batch = DEFAULT_GPU_BATCH if self.device == "cuda" else 1
        self.max_batch = max(1, int(max_batch)) if self.dynamic_batch else 1
        self.max_batch_frames = max(1, int(max_batch_frames))
        self._batching_verified = False

    # -- single and batched calls -----------------------------------------------------------

    def _run_one(self, feat: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {
            self.feats_name: np.ascontiguousarray(feat[None], dtype=np.float32),
            self.len_name: np.array([feat.shape[1]], dtype=self.len_dtype),
        })
        return np.asarray(out[0]).reshape(-1).astype(np.int64)

    def _run_batch(self, feats: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(feats) == 1:
            return [self._run_one(feats[0])]
        t_max = max(f.shape[1] for f in feats)
        x = np.zeros((len(feats), self.n_mels, t_max), dtype=np.float32)  # zero padding, as upstream's collate
        for i, f in enumerate(feats):
            x[i, :, : f.shape[1]] = f
        lens = np.array([f.shape[1] for f in feats], dtype=self.len_dtype)
        out = self.session.run(None, {self.feats_name: x, self.len_name: lens})
        codes = np.asarray(out[0]).reshape(len(feats), -1).astype(np.int64)
        if self.has_len_output:
            tok_lens = np.asarray(out[1]).reshape(-1).astype(np.int64)
        else:
            tok_lens = lens.astype(np.int64) // TOKENIZER_FRAMES_PER_TOKEN  # upstream's training rule
        return [codes[i, : int(tok_lens[i])] for i in range(len(feats))]

    def _verify_batching(self, feats: Sequence[np.ndarray]) -> None:
        """Check once that this model gives the same tokens batched and alone; else use batch 1."""
        self._batching_verified = True
        order = sorted(range(len(feats)), key=lambda i: feats[i].shape[1])
        probe = [feats[i] for i in dict.fromkeys([order[0], order[len(order) // 2], order[-1]])]
        if len(probe) < 2:
            self._batching_verified = False  # nothing learned; try again with the next call
            return
        batched = self._run_batch(probe)
        single = [self._run_one(f) for f in probe]
        same_len = all(b.shape == s.shape for b, s in zip(batched, single))
        total = sum(s.size for s in single)
        agree = sum(int(np.sum(b == s)) for b, s in zip(batched, single)) if same_len else 0
        # Batched GEMMs round differently, so an FSQ code can flip now and then even in a correctly
        # masked model (upstream trains on such batched tokens); a model that lets padding leak in
        # changes far more than that, or the lengths.
        if not same_len or agree < MIN_BATCH_AGREEMENT * total:
            logger.warning(
                "%s gives different tokens for padded batches than for single utterances (%d of %d agree); "
                "tokenising one utterance per call (slower, but exactly upstream's result)",
                self.path.name, agree, total)
            self.max_batch = 1
        else:
            logger.debug("%s: batched tokens agree with single calls on %d of %d tokens", self.path.name, agree, total)

    def _batches(self, feats: Sequence[np.ndarray]) -> list[list[int]]:
        order = sorted(range(len(feats)), key=lambda i: feats[i].shape[1])
        batches: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            t = feats[i].shape[1]
            if cur and (len(cur) + 1 > self.max_batch or t * (len(cur) + 1) > self.max_batch_frames):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    def tokenize(self, feat: np.ndarray) -> np.ndarray:
        """Tokenise one utterance: ``(128, T)`` log-mel → ``(T_tok,)`` int64 token ids."""
        return self.tokenize_many([feat])[0]

    def tokenize_many(self, feats: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Tokenise many utterances; results are in input order.

        Batched results equal one-by-one calls except, rarely, a code on a rounding edge (batched GEMMs
        round differently); pass ``max_batch=1`` to the constructor for exact single-call results.

        Args:
            feats: ``(128, T_i)`` float32 Whisper log-mels, each from one utterance.

        Returns:
            One int64 array of token ids per input.
        """
        for i, f in enumerate(feats):
            if f.ndim != 2 or f.shape[0] != self.n_mels or f.shape[1] < 1:
                raise ValueError(f"tokenizer input {i}: expected ({self.n_mels}, T>=1) features; got {f.shape}")
        if self.max_batch > 1 and not self._batching_verified and len(feats) > 1:
            self._verify_batching(feats)
        if self.max_batch <= 1:
            return _run_parallel(self._run_one, list(feats), self.num_threads)
        batches = self._batches(feats)
        outs = _run_parallel(lambda idx: self._run_batch([feats[i] for i in idx]), batches, self.num_threads)
        result: list[np.ndarray | None] = [None] * len(feats)
        for idx, out in zip(batches, outs):
            for i, codes in zip(idx, out):
                result[i] = codes
        return result  # type: ignore[return-value]

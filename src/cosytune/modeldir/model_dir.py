"""A CosyVoice 3 model directory in upstream's layout: validation, configs and strict loading.

Layout (spec §1.1)::

    <model_dir>/
      cosyvoice3.yaml            HyperPyYAML; read safely (modeldir/upstream_yaml.py), never executed
      llm.pt  flow.pt  hift.pt   plain state dicts, upstream key names
      campplus.onnx              speaker encoder  (fbank (1, T, 80) → (1, 192))
      speech_tokenizer_v3.onnx   speech tokenizer (feats (1, 128, T), feats_length (1,) → indices)
      CosyVoice-BlankEN/         Qwen2 config.json + tokenizer files (+ model.safetensors, needed only by upstream)
      spk2info.pt                optional speaker table

:class:`ModelDir` checks every file and reports all problems in one :class:`ModelDirError`; the
``deep`` check also reads each weight file's keys and shapes (memory-mapped) and compares them with
the networks the yaml describes, and parses the ONNX graphs. ``load(kind)`` builds a network from the
yaml (+ BlankEN ``config.json``) and loads its weights strictly, in eval mode.

Upstream reference: ``cosyvoice/cli/cosyvoice.py`` (``CosyVoice3.__init__``), ``cosyvoice/cli/model.py``
(``load``); read for facts only.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from cosytune.errors import CheckpointError, ConfigError, ModelDirError
from cosytune.modeldir.upstream_yaml import CosyVoice3Hparams, parse_cosyvoice3_yaml
from cosytune.weights.io import torch_load_safely

logger = logging.getLogger(__name__)

YAML_NAME = "cosyvoice3.yaml"
WEIGHT_FILES: dict[str, str] = {"llm": "llm.pt", "flow": "flow.pt", "hift": "hift.pt"}
CAMPPLUS_NAME = "campplus.onnx"
SPEECH_TOKENIZER_NAME = "speech_tokenizer_v3.onnx"
BLANKEN_NAME = "CosyVoice-BlankEN"
SPK2INFO_NAME = "spk2info.pt"

Status = Literal["ok", "missing", "malformed", "absent"]


@dataclass(frozen=True)
class FileStatus:
    """Result of checking one entry of a model dir.

    Attributes:
        name: file or folder name relative to the model dir.
        status: ``ok``; ``missing`` (required, not there); ``malformed`` (there but unusable);
            ``absent`` (optional and not there).
        detail: what was found / what is wrong and how to fix it.
        required: whether the entry is required for inference.
    """

    name: str
    status: Status
    detail: str = ""
    required: bool = True

    @property
    def is_problem(self) -> bool:
        """True for required entries that are missing or malformed, and for malformed optional ones."""
        return self.status in ("missing", "malformed")


def _is_torch_file(path: Path) -> bool:
    """Cheap format check: torch.save writes a zip archive (or, before torch 1.6, a pickle stream)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80"  # pickle protocol marker of legacy torch.save files


class ModelDir:
    """A CosyVoice 3 model directory (upstream layout).

    Construction does no I/O; call :meth:`check` to inspect or :meth:`open` to validate.

    Args:
        path: the directory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.yaml_path = self.path / YAML_NAME
        self.campplus_path = self.path / CAMPPLUS_NAME
        self.speech_tokenizer_path = self.path / SPEECH_TOKENIZER_NAME
        self.blanken_path = self.path / BLANKEN_NAME
        self.spk2info_path = self.path / SPK2INFO_NAME

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    def weight_path(self, kind: str) -> Path:
        """``llm.pt``, ``flow.pt`` or ``hift.pt``."""
        return self.path / WEIGHT_FILES[kind]

    # configs -----------------------------------------------------------------------------------
    @functools.cached_property
    def hparams(self) -> CosyVoice3Hparams:
        """The networks' configs from ``cosyvoice3.yaml`` (the LLM backbone from ``CosyVoice-BlankEN/config.json``).

        Raises:
            ModelDirError: the yaml is missing or not understood (every problem listed).
        """
        if not self.yaml_path.is_file():
            raise ModelDirError(f"{self.path}: {YAML_NAME} is missing; this is not a CosyVoice 3 model dir")
        try:
            qwen2 = self.qwen2_config
        except ModelDirError:
            qwen2 = None  # reported by the CosyVoice-BlankEN/ check; the yaml must then fit the released backbone
        try:
            return parse_cosyvoice3_yaml(self.yaml_path, qwen2=qwen2,
                                         overrides={"qwen_pretrain_path": str(self.blanken_path)})
        except ConfigError as e:
            raise ModelDirError(str(e)) from e

    @functools.cached_property
    def qwen2_config(self) -> Any:
        """The Qwen2 backbone config from ``CosyVoice-BlankEN/config.json`` (a ``Qwen2Config``).

        Raises:
            ModelDirError: missing or invalid ``config.json``.
        """
        path = self.blanken_path / "config.json"
        if not path.is_file():
            raise ModelDirError(f"{path} is missing; it holds the Qwen2 backbone sizes the LLM needs")
        try:
            return read_qwen2_config(path)
        except ConfigError as e:
            raise ModelDirError(str(e)) from e

    # checking ----------------------------------------------------------------------------------
    def check(self, deep: bool = False) -> list[FileStatus]:
        """Inspect every expected entry.

        Args:
            deep: also read the weight files' keys and shapes and compare them with the networks the
                configs describe (memory-mapped; a few seconds for the real model), and parse the ONNX
                graphs' inputs and outputs.

        Returns:
            One :class:`FileStatus` per entry, in layout order.
        """
        if not self.path.is_dir():
            return [FileStatus(str(self.path), "missing", "no such directory")]
        out = [self._check_yaml(), self._check_blanken()]
        yaml_ok = out[0].status == "ok"
        blanken_ok = out[1].status == "ok"
        for kind in WEIGHT_FILES:
            out.append(self._check_weights(kind, deep and yaml_ok and (blanken_ok or kind != "llm")))
        out.append(self._check_onnx(self.campplus_path, deep, "campplus"))
        out.append(self._check_onnx(self.speech_tokenizer_path, deep, "speech_tokenizer"))
        out.append(self._check_spk2info())
        return out

    def problems(self, deep: bool = False) -> list[str]:
        """Human-readable problems (empty when the dir is usable)."""
        return [f"{s.name}: {s.status}: {s.detail}" for s in self.check(deep) if s.is_problem]

    @classmethod
    def open(cls, path: str | os.PathLike, *, deep: bool = False) -> ModelDir:
        """Validate ``path`` and return a :class:`ModelDir`.

        Args:
            path: the model dir.
            deep: see :meth:`check`.

        Raises:
            ModelDirError: listing every missing and malformed entry.
        """
        md = cls(path)
        problems = md.problems(deep)
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise ModelDirError(
                f"{md.path} is not a usable CosyVoice 3 model dir ({len(problems)} problem(s)):\n{lines}\n"
                "Use the released Fun-CosyVoice3-0.5B directory, or create a test model with "
                "'cosytune init-model --preset tiny --out DIR'."
            )
        return md

    def _check_yaml(self) -> FileStatus:
        if not self.yaml_path.is_file():
            return FileStatus(YAML_NAME, "missing", "the model config; without it nothing can be built")
        try:
            self.__dict__.pop("hparams", None)
            self.__dict__.pop("qwen2_config", None)
            hp = self.hparams
        except ModelDirError as e:
            return FileStatus(YAML_NAME, "malformed", str(e))
        return FileStatus(YAML_NAME, "ok", f"llm {hp.llm.hidden_size}-d, DiT {hp.flow.dit.dim}-d × "
                                           f"{hp.flow.dit.depth}, HiFT {hp.hift.base_channels} ch")

    def _check_blanken(self) -> FileStatus:
        d = self.blanken_path
        if not d.is_dir():
            return FileStatus(BLANKEN_NAME + "/", "missing", "the Qwen2 config.json and tokenizer files")
        problems = []
        if not (d / "tokenizer.json").is_file() and not ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
            problems.append("no tokenizer (expected tokenizer.json, or vocab.json + merges.txt)")
        if not (d / "tokenizer_config.json").is_file():
            problems.append("tokenizer_config.json missing")
        qwen = None
        try:
            self.__dict__.pop("qwen2_config", None)
            qwen = self.qwen2_config
        except ModelDirError as e:
            problems.append(str(e))
        if problems:
            return FileStatus(BLANKEN_NAME + "/", "malformed", "; ".join(problems))
        note = "" if (d / "model.safetensors").is_file() else " (no model.safetensors: fine for cosytune, " \
                                                              "upstream CosyVoice needs it)"
        return FileStatus(BLANKEN_NAME + "/", "ok", f"Qwen2 {qwen.hidden_size}-d × {qwen.num_hidden_layers}{note}")

    def _check_weights(self, kind: str, deep: bool) -> FileStatus:
        from cosytune.weights.io import (
            TIED_ALIASES,
            check_state_dict,
            normalize_upstream_keys,
            read_state_dict,
        )

        name = WEIGHT_FILES[kind]
        path = self.weight_path(kind)
        if not path.is_file():
            return FileStatus(name, "missing", f"the {kind} weights")
        size = path.stat().st_size
        if size == 0 or not _is_torch_file(path):
            what = "empty" if size == 0 else "not a complete torch.save file (truncated or corrupted?)"
            return FileStatus(name, "malformed", f"{what}, {size} bytes; copy it again")
        if not deep:
            return FileStatus(name, "ok", f"{size / 2**20:.1f} MiB")
        try:
            tensors, meta = read_state_dict(path)
            tensors = normalize_upstream_keys(tensors, kind)  # type: ignore[arg-type]
            expected = expected_shapes(self, kind)
            check_state_dict(expected, tensors, source=str(path), allow_missing=TIED_ALIASES[kind])
        except (CheckpointError, ModelDirError) as e:
            return FileStatus(name, "malformed", str(e))
        extra = f"; training checkpoint entries {meta} will be ignored" if meta else ""
        return FileStatus(name, "ok", f"{size / 2**20:.1f} MiB, {len(tensors)} tensors match the config{extra}")

    def _check_onnx(self, path: Path, deep: bool, which: str) -> FileStatus:
        name = path.name
        if not path.is_file():
            return FileStatus(name, "missing", "speaker encoder" if which == "campplus" else "speech tokenizer")
        size = path.stat().st_size
        if size == 0:
            return FileStatus(name, "malformed", "empty file; copy it again")
        if not deep:
            return FileStatus(name, "ok", f"{size / 2**20:.1f} MiB")
        try:
            import onnx

            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - boundary: any protobuf failure means a corrupted file
            return FileStatus(name, "malformed", f"not a readable ONNX model ({type(e).__name__}: {e})")
        inputs = [(i.name, [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim])
                  for i in model.graph.input]
        initializers = {i.name for i in model.graph.initializer}
        inputs = [i for i in inputs if i[0] not in initializers]
        outputs = [(o.name, [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim])
                   for o in model.graph.output]
        problem = _onnx_interface_problem(which, inputs, outputs)
        if problem:
            return FileStatus(name, "malformed", problem)
        return FileStatus(name, "ok", f"{size / 2**20:.1f} MiB, inputs {inputs}, outputs {outputs}")

    def _check_spk2info(self) -> FileStatus:
        return self._read_spk2info()[1]

    def _read_spk2info(self) -> tuple[dict | None, FileStatus]:
        """The speaker table (None unless it reads safely and is well formed) and its status, in one read."""
        path = self.spk2info_path
        if not path.is_file():
            return None, FileStatus(SPK2INFO_NAME, "absent", "optional speaker table (none: zero-shot prompts only)",
                                    required=False)
        try:
            table = torch_load_safely(path, ModelDirError, what="speaker table")
        except ModelDirError as e:
            return None, FileStatus(SPK2INFO_NAME, "malformed", str(e), required=False)
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            return None, FileStatus(SPK2INFO_NAME, "malformed", "expected {speaker_id: {field: tensor}}",
                                    required=False)
        return table, FileStatus(SPK2INFO_NAME, "ok",
                                 f"{len(table)} speaker(s): {', '.join(sorted(map(str, table))[:5])}", required=False)

    # loading -----------------------------------------------------------------------------------
    def build(self, kind: str, device: str | torch.device = "cpu") -> torch.nn.Module:
        """Build an uninitialised network of the size the configs describe (``device="meta"`` is free).

        Args:
            kind: ``llm``, ``flow`` or ``hift``.
            device: where to allocate parameters.
        """
        from cosytune.modeldir.builders import build_network

        if kind == "llm":
            self.qwen2_config  # noqa: B018 - the backbone must come from config.json, not the released default
        return build_network(kind, self.hparams, device=device)

    def load(self, kind: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             weights: str | os.PathLike | None = None) -> torch.nn.Module:
        """Build a network and load its weights strictly, in eval mode.

        Args:
            kind: ``llm``, ``flow`` or ``hift``.
            device: target device.
            dtype: cast floating parameters to this dtype after loading (None: keep float32).
            weights: a weight file to load instead of the dir's own (e.g. a training checkpoint).

        Returns:
            The network, on ``device``, in eval mode.

        Raises:
            ModelDirError: configs missing or invalid.
            CheckpointError: weights unreadable or not matching (every key listed).
        """
        from cosytune.weights.io import load_weights

        path = Path(weights) if weights is not None else self.weight_path(kind)
        module = self.build(kind, device="cpu")
        load_weights(module, path, kind)  # type: ignore[arg-type]
        module = module.to(device)
        if dtype is not None:
            module = module.to(dtype)
        # Upstream's load() calls eval(); left in train mode, HiFT would use random instead of fixed noise.
        return module.eval()

    def load_tokenizer(self) -> Any:
        """The text tokenizer (``CosyVoice3Tokenizer``) from ``CosyVoice-BlankEN``."""
        from cosytune.text.tokenizer import load_tokenizer

        skip = self.hparams.skip_special_tokens if self.yaml_path.is_file() else True
        return load_tokenizer(self.blanken_path, skip_special_tokens=skip)

    def load_spk2info(self) -> dict[str, dict[str, torch.Tensor]]:
        """``spk2info.pt`` as a dict (``{}`` when the file is absent, like upstream).

        Raises:
            ModelDirError: the file exists but cannot be read safely or has the wrong structure.
        """
        table, status = self._read_spk2info()
        if status.status == "absent":
            return {}
        if table is None:
            raise ModelDirError(status.detail if status.detail.startswith(str(self.spk2info_path))
                                else f"{self.spk2info_path}: {status.detail}")
        return table


def read_qwen2_config(path: str | os.PathLike) -> Any:
    """A ``Qwen2Config`` from a transformers ``config.json`` file (e.g. ``CosyVoice-BlankEN/config.json``).

    Raises:
        ConfigError: unreadable JSON, or a config ``Qwen2Config.from_hf_dict`` rejects.
    """
    from cosytune.models.qwen2 import Qwen2Config

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read a JSON object from {path}: {e}", source=str(path)) from e
    if not isinstance(data, dict):
        raise ConfigError(f"expected a JSON object, found {type(data).__name__}", source=str(path))
    return Qwen2Config.from_hf_dict(data, source=str(path))


def expected_shapes(model_dir: ModelDir, kind: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of the network the dir's configs describe (built on the meta device, no memory).

    Raises:
        ModelDirError: configs missing or invalid.
    """
    module = model_dir.build(kind, device="meta")
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


_ONNX_INTERFACES = {
    # which → (min inputs, feature dim of input 0 and its axis)
    "campplus": (1, 80, -1),
    "speech_tokenizer": (2, 128, 1),
}


def _onnx_interface_problem(which: str, inputs: list[tuple[str, list]], outputs: list[tuple[str, list]]) -> str:
    """Check an ONNX graph's inputs against the interface upstream calls it with (spec §5.4, §5.5)."""
    n_in, feat, axis = _ONNX_INTERFACES[which]
    if len(inputs) < n_in or not outputs:
        return f"expected {n_in} input(s) and an output, found inputs {inputs} and outputs {outputs}"
    dims = inputs[0][1]
    if len(dims) != 3:
        return f"input {inputs[0][0]!r} should be rank 3, found shape {dims}"
    if isinstance(dims[axis], int) and dims[axis] != feat:
        return f"input {inputs[0][0]!r} should have {feat} features on axis {axis}, found shape {dims}"
    if which == "campplus":
        out = outputs[0][1]
        if out and isinstance(out[-1], int) and out[-1] != 192:
            return f"output {outputs[0][0]!r} should be a 192-d embedding, found shape {out}"
    return ""

"""Shared fixtures: the golden-fixture directory and its tolerance table, seeding, offline mode.

Golden fixtures are read from ``$COSYTUNE_GOLDEN_DIR`` (default: ``tests/golden``). Tests take
every size, input and tolerance from the fixture files, so another fixture set in the same
format passes too. A ``<stem>.sparse.safetensors`` stands in for an absent ``<stem>.safetensors``:
its sparsely stored embedding table (see ``scripts/sparsify_golden.py``) is expanded into a
session-temporary full file, so tests always see the regular format.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS_DIR = Path(__file__).parent
REPO_DIR = TESTS_DIR.parent

#: Test tiers: the folder a test file sits in gives its marker (``make test-fast`` = unit + golden).
TIER_MARKERS = {"unit": "unit", "parity": "golden", "integration": "integration", "cli": "cli"}


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier (from its folder) and skip ``gpu`` tests where CUDA is absent."""
    cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        rel = Path(str(item.path)).resolve().relative_to(TESTS_DIR.resolve())
        tier = TIER_MARKERS.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if tier is None:
            raise pytest.UsageError(f"{rel}: every test file belongs in one of tests/{{{','.join(TIER_MARKERS)}}}/")
        item.add_marker(getattr(pytest.mark, tier))
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(skip_gpu)


class Golden:
    """Access to one golden fixture directory: tensors, JSON, metadata and tolerances."""

    def __init__(self, root: Path, scratch: Path | None = None) -> None:
        self.root = root
        self.scratch = scratch  # where expanded sparse fixtures are written
        tol_path = root / "tolerances.json"
        self.tolerances = json.loads(tol_path.read_text()) if tol_path.exists() else {}

    def path(self, name: str) -> Path:
        p = self.root / name
        if p.exists():
            return p
        sparse = self.root / name.replace(".safetensors", ".sparse.safetensors")
        if name.endswith(".safetensors") and sparse.exists() and self.scratch is not None:
            return self._expand(sparse, self.scratch / name)
        pytest.skip(f"golden fixture {p} not present in COSYTUNE_GOLDEN_DIR")

    @staticmethod
    def _expand(sparse: Path, out: Path) -> Path:
        """Write the full-format file of a sparse fixture: each ``K@rows``/``K@values`` pair becomes K,
        zeros in the rows that were not kept (no fixture input reaches them)."""
        if out.exists():
            return out
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(sparse))
        with safe_open(str(sparse), "pt") as f:
            meta = dict(f.metadata() or {})
        for key, shape in json.loads(meta.pop("sparse_rows")).items():
            rows, values = tensors.pop(f"{key}@rows"), tensors.pop(f"{key}@values")
            full = torch.zeros(shape, dtype=values.dtype)
            full[rows] = values
            tensors[key] = full
        save_file(tensors, str(out), metadata=meta)
        return out

    def tensors(self, stem: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path(f"{stem}.safetensors")))

    def meta(self, stem: str) -> dict:
        from safetensors import safe_open

        with safe_open(str(self.path(f"{stem}.safetensors")), "pt") as f:
            m = f.metadata() or {}
        return json.loads(m["golden_meta"]) if "golden_meta" in m else {}

    def json(self, stem: str) -> dict:
        return json.loads(self.path(f"{stem}.json").read_text(encoding="utf-8"))

    # The tiny networks' configs, read from the recorded upstream constructor arguments by the same
    # readers that read cosyvoice3.yaml (cosytune.modeldir.upstream_yaml).
    def llm_config(self, **overrides):
        import dataclasses

        from cosytune.modeldir.upstream_yaml import llm_config

        cfg = self.json("llm_tiny_config")
        args = {k: v for k, v in cfg["CosyVoice3LM"].items() if k != "sampling"}  # recorded as text only
        return dataclasses.replace(llm_config(args, cfg["qwen2_config_written"]), **overrides)

    def flow_config(self):
        from cosytune.modeldir.upstream_yaml import flow_config

        cfg = self.json("flow_tiny_config")
        decoder = {**cfg["CausalConditionalCFM"], "estimator": cfg["DiT"]}
        return flow_config({**cfg["CausalMaskedDiffWithDiT"], "pre_lookahead_layer": cfg["PreLookaheadLayer"],
                            "decoder": decoder})

    def hift_config(self):
        from cosytune.modeldir.upstream_yaml import hift_config

        cfg = self.json("hift_tiny_config")
        return hift_config(cfg["CausalHiFTGenerator"], cfg["CausalConvRNNF0Predictor"])

    def tol(self, stem: str, key: str) -> str | dict:
        table = self.tolerances.get(stem, {})
        suffix = key.rsplit(".", 1)[-1]
        for k in (key, suffix):
            if k in table:
                return table[k]
        return table.get("default", {"atol": 1e-5, "rtol": 0})

    def check(self, stem: str, key: str, actual, expected, tol_key: str | None = None) -> None:
        """Assert ``actual`` matches ``expected`` within the tolerance of ``stem``/``key``."""
        tol = self.tol(stem, tol_key or key)
        actual = torch.as_tensor(actual)
        expected = torch.as_tensor(expected)
        assert tuple(actual.shape) == tuple(expected.shape), (
            f"{stem}/{key}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
        )
        if tol == "exact":
            if actual.dtype.is_floating_point or expected.dtype.is_floating_point:
                ok = torch.equal(actual.to(expected.dtype), expected)
            else:
                ok = torch.equal(actual.long(), expected.long())
            if not ok:
                diff = (actual.double() - expected.double()).abs()
                raise AssertionError(f"{stem}/{key}: not exactly equal (max abs diff {diff.max().item():.3g}, "
                                     f"{int((diff > 0).sum())} of {diff.numel()} differ)")
            return
        atol, rtol = float(tol.get("atol", 0)), float(tol.get("rtol", 0))
        a, e = actual.double(), expected.double()
        diff = (a - e).abs()
        bound = atol + rtol * e.abs()
        bad = diff > bound
        if bool(bad.any()):
            idx = int(torch.argmax((diff - bound).flatten()))
            raise AssertionError(
                f"{stem}/{key}: {int(bad.sum())} of {diff.numel()} values outside atol={atol} rtol={rtol}; "
                f"max abs diff {diff.max().item():.3g} (worst at flat index {idx}: "
                f"got {a.flatten()[idx].item():.8g}, expected {e.flatten()[idx].item():.8g})"
            )


@pytest.fixture(scope="session")
def golden(tmp_path_factory) -> Golden:
    root = Path(os.environ.get("COSYTUNE_GOLDEN_DIR", TESTS_DIR / "golden"))
    if not root.is_dir():
        pytest.skip(f"golden fixture directory {root} does not exist")
    return Golden(root, tmp_path_factory.mktemp("golden_expanded"))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def sample_speaker_dir() -> Path:
    """The real-speech sample shipped in the package (28 mp3 clips + transcripts)."""
    from importlib.resources import files

    return Path(str(files("cosytune") / "assets" / "sample_speaker"))


@pytest.fixture(scope="session", autouse=True)
def shipped_assets_stay_untouched():
    """No test may write into the package's shipped sample (a test once re-encoded one of its mp3s)."""
    import hashlib
    from importlib.resources import files

    root = Path(str(files("cosytune") / "assets"))

    def digest() -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    before = digest()
    yield
    changed = sorted(k for k, v in digest().items() if before.get(k) != v)
    assert not changed, f"tests modified shipped assets: {changed}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """One tiny random-weight model dir (preset ``tiny``, seed 0) for the whole session: building one takes
    ~8 s, most of it the tokenizer. Tests read it, use it as a base model, copy it, or build their own dirs
    with ``write_model_dir(..., tokenizer_from=tiny_model_dir / "CosyVoice-BlankEN")`` (~0.3 s). Nothing may
    write into it: at the end of the session every file must still be the one written, and no file added."""
    from cosytune.modeldir import presets

    d = presets.write_model_dir(tmp_path_factory.getbasetemp() / "cosytune_tiny_seed0", "tiny", seed=0)
    yield d
    files = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}
    added = sorted(files - set(presets.read_init_info(d)["sha256"]) - {presets.INIT_INFO_NAME})
    assert presets.is_complete_model_dir(d, "tiny", 0) and not added, (
        f"a test changed the shared tiny model dir {d} (files added: {added}); copy it before changing it")

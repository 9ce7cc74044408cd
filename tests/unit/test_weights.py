"""Weight files: safe reading, strict loading with named keys, upstream-format saving, round trips."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from cosytune.errors import CheckpointError
from cosytune.models.hift import HiFTConfig, HiFTGenerator
from cosytune.models.llm import CosyVoice3LM
from cosytune.weights import (
    load_weights,
    normalize_upstream_keys,
    read_state_dict,
    save_state_dict,
    save_weights,
    strict_load,
    upstream_state_dict,
)


@pytest.fixture(scope="module")
def hift():
    torch.manual_seed(1)
    return HiFTGenerator(HiFTConfig.tiny()).eval()


def _llm_from_golden(golden) -> CosyVoice3LM:
    return CosyVoice3LM(golden.llm_config())


class _NotATensor:  # instances cannot be loaded with weights_only=True
    pass


def test_read_plain_and_training_checkpoint(tmp_path, hift):
    sd = hift.state_dict()
    save_state_dict(tmp_path / "hift.pt", sd)
    tensors, meta = read_state_dict(tmp_path / "hift.pt")
    assert meta == {} and list(tensors) == list(sd)
    save_state_dict(tmp_path / "epoch_3_whole.pt", sd, meta={"epoch": 3, "step": 120})
    tensors, meta = read_state_dict(tmp_path / "epoch_3_whole.pt")
    assert meta == {"epoch": 3, "step": 120} and set(tensors) == set(sd)
    # the upstream training format: plain dict with int epoch/step entries, loaded strictly
    torch.save({**sd, "epoch": 1, "step": 7}, tmp_path / "epoch_1_whole.pt")
    assert load_weights(HiFTGenerator(HiFTConfig.tiny()), tmp_path / "epoch_1_whole.pt", "hift") == {"epoch": 1, "step": 7}


@pytest.mark.parametrize("case, match", [
    ("missing", "not found"),
    ("empty", "empty"),
    ("truncated", "truncated or corrupted"),
    ("object", "refusing to load"),
    ("extra", "non-tensor entries 'note'"),
    ("nested", "nested under 'state_dict'"),
    ("dir", "DeepSpeed"),
    ("list", "expected a dict of tensors"),
])
def test_unreadable_files_are_clear_errors(tmp_path, hift, case, match):
    path = tmp_path / "w.pt"
    sd = {k: v.clone() for k, v in list(hift.state_dict().items())[:3]}
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "object":
        torch.save({"x": _NotATensor()}, path)
    elif case == "extra":
        torch.save({**sd, "note": "hello"}, path)
    elif case == "nested":
        torch.save({"state_dict": sd, "epoch": 1}, path)
    elif case == "dir":
        path.mkdir()
    elif case == "list":
        torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(path)


def test_mismatch_names_missing_unexpected_and_misshaped_keys(hift):
    sd = OrderedDict((k, v.clone()) for k, v in hift.state_dict().items())
    del sd["conv_post.bias"]
    sd["discriminator.mpd.weight"] = torch.zeros(3)
    sd["f0_predictor.classifier.weight"] = torch.zeros(2, 7)
    with pytest.raises(CheckpointError) as e:
        strict_load(HiFTGenerator(HiFTConfig.tiny()), sd, source="hift.pt")
    msg = str(e.value)
    assert "missing keys (1): conv_post.bias" in msg
    assert "unexpected keys (1): discriminator.mpd.weight" in msg
    assert "f0_predictor.classifier.weight: file [2, 7] vs model [1, 32]" in msg


def test_wrong_size_model_is_named(tmp_path, hift):
    save_weights(hift, tmp_path / "hift.pt", "hift")
    with pytest.raises(CheckpointError, match="mis-shaped keys .*another size|model of another size"):
        load_weights(HiFTGenerator(HiFTConfig(base_channels=32, f0_cond_channels=32)), tmp_path / "hift.pt", "hift")


def test_wrong_network_file_is_named(tmp_path, hift, golden):
    save_weights(hift, tmp_path / "hift.pt", "hift")
    with pytest.raises(CheckpointError, match="another network"):
        load_weights(_llm_from_golden(golden), tmp_path / "hift.pt", "llm")


def test_hift_generator_prefix_and_legacy_weight_norm_names(tmp_path, hift):
    """CHECKPOINT-COMPAT: upstream strips 'generator.'; old weight_norm stored weight_g / weight_v."""
    sd = {}
    for k, v in hift.state_dict().items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v")
        sd["generator." + k] = v
    assert "generator.conv_pre.weight_g" in sd
    norm = normalize_upstream_keys(sd, "hift")
    assert set(norm) == set(hift.state_dict())
    torch.save(sd, tmp_path / "hifigan_generator.pt")
    fresh = HiFTGenerator(HiFTConfig.tiny())
    load_weights(fresh, tmp_path / "hifigan_generator.pt", "hift")
    for k, v in hift.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert normalize_upstream_keys({"generator.x": torch.zeros(1)}, "llm") == {"generator.x": torch.zeros(1)}
    # upstream removes the substring everywhere in the key (str.replace), not only a leading prefix
    # (spec §1.1); this is the function load_weights and ModelDir.load run.
    z = torch.zeros(1)
    assert list(normalize_upstream_keys({"hift.generator.m_source.l_linear.bias": z}, "hift")) == [
        "hift.m_source.l_linear.bias"]


def test_hift_roundtrip_identical_output(tmp_path, hift):
    path = save_weights(hift, tmp_path / "hift.pt", "hift")
    fresh = HiFTGenerator(HiFTConfig.tiny())
    load_weights(fresh, path, "hift")
    fresh.eval()
    mel = torch.randn(1, 80, 12)
    with torch.no_grad():
        a, b = hift.inference(mel), fresh.inference(mel)
    a = a[0] if isinstance(a, tuple) else getattr(a, "wav", a)
    b = b[0] if isinstance(b, tuple) else getattr(b, "wav", b)
    assert torch.equal(a, b)


def test_llm_golden_weights_load_and_upstream_key_order(golden, tmp_path):
    """The golden file omits the tied lm_head (allowed); our save restores upstream's 29-key layout."""
    cfg = golden.json("llm_tiny_config")
    model = _llm_from_golden(golden)
    load_weights(model, golden.path("llm_tiny_weights.safetensors"), "llm")
    sd = upstream_state_dict(model, "llm")
    assert list(sd) == cfg["state_dict_keys_in_order"]
    assert {k: list(v.shape) for k, v in sd.items()} == cfg["state_dict_shapes"]
    for alias, src in cfg["tied_keys"].items():
        assert sd[alias].data_ptr() == sd[src].data_ptr()
    path = save_weights(model, tmp_path / "llm.pt", "llm")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == cfg["state_dict_keys_in_order"]
    # the file is exactly what upstream's loader needs: strict load into a same-shaped module works
    fresh = _llm_from_golden(golden)
    fresh.load_state_dict(raw, strict=True)
    emb = torch.randn(2, 9, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(model.eval().hidden_states(emb), fresh.eval().hidden_states(emb))


def test_llm_tied_alias_must_agree(golden, tmp_path):
    model = _llm_from_golden(golden)
    sd = {k: v.clone() for k, v in upstream_state_dict(model, "llm").items()}
    sd["llm.model.lm_head.weight"] += 1.0
    torch.save(sd, tmp_path / "llm.pt")
    with pytest.raises(CheckpointError, match="tied"):
        load_weights(_llm_from_golden(golden), tmp_path / "llm.pt", "llm")


def test_safetensors_save_and_load(tmp_path, golden):
    model = _llm_from_golden(golden)
    path = save_weights(model, tmp_path / "llm.safetensors", "llm")
    fresh = _llm_from_golden(golden)
    load_weights(fresh, path, "llm")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(CheckpointError, match="epoch/step"):
        save_state_dict(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, meta={"epoch": 1})


def test_save_rejects_bad_meta(tmp_path):
    with pytest.raises(CheckpointError, match="only"):
        save_state_dict(tmp_path / "x.pt", {"a": torch.zeros(1)}, meta={"lr": 1e-5})
    assert not (tmp_path / "x.pt").exists()

"""Model dirs: tiny preset round trip (all three networks), all-at-once problem reports, full-size inventory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cosytune.errors import CheckpointError, ModelDirError, UsageError
from cosytune.modeldir.builders import build_network
from cosytune.modeldir.model_dir import ModelDir
from cosytune.modeldir.presets import is_complete_model_dir, preset_hparams, write_model_dir
from cosytune.modeldir.upstream_yaml import parse_cosyvoice3_yaml
from cosytune.weights import save_state_dict, save_weights


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir) -> Path:
    return tiny_model_dir  # the session's tiny dir (tests/conftest.py), written by write_model_dir


def _copy_dir(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy a model dir; the big unchanged files are hard-linked (read-only use)."""
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if rel.parts[0] in skip:
            continue
        target = dst / rel
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.hardlink_to(p)
            except OSError:
                shutil.copy2(p, target)
    return dst


def _run_networks(md: ModelDir, nets: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """A deterministic output of each network (eval mode, fixed inputs)."""
    g = torch.Generator().manual_seed(7)
    hp = md.hparams
    out = {}
    with torch.no_grad():
        llm = nets["llm"]
        emb = torch.randn(2, 11, hp.llm.hidden_size, generator=g)
        out["llm"] = llm.llm_decoder(llm.hidden_states(emb, torch.tensor([11, 8])))
        flow = nets["flow"]
        token = torch.randint(0, hp.flow.vocab_size, (1, 12), generator=g)
        prompt_token = torch.randint(0, hp.flow.vocab_size, (1, 4), generator=g)
        prompt_feat = torch.randn(1, 4 * hp.token_mel_ratio, hp.flow.output_size, generator=g) - 6
        spk = torch.randn(1, hp.flow.spk_embed_dim, generator=g)
        out["flow"] = flow.inference(token=token, prompt_token=prompt_token, prompt_feat=prompt_feat,
                                     embedding=spk, n_timesteps=2)
        if isinstance(out["flow"], tuple):
            out["flow"] = out["flow"][0]
        mel = torch.randn(1, hp.hift.in_channels, 10, generator=g) - 5
        out["hift"] = nets["hift"].inference(mel).wav
    return out


def test_tiny_dir_is_complete_and_valid(tiny_dir):
    for name in ("cosyvoice3.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v3.onnx",
                 "speech_tokenizer_v3.batch.onnx", "CosyVoice-BlankEN/config.json",
                 "CosyVoice-BlankEN/tokenizer.json", "CosyVoice-BlankEN/model.safetensors"):
        assert (tiny_dir / name).is_file(), name
    md = ModelDir.open(tiny_dir, deep=True)
    statuses = {s.name: s.status for s in md.check(deep=True)}
    assert statuses == {"cosyvoice3.yaml": "ok", "CosyVoice-BlankEN/": "ok", "llm.pt": "ok", "flow.pt": "ok",
                        "hift.pt": "ok", "campplus.onnx": "ok", "speech_tokenizer_v3.onnx": "ok",
                        "spk2info.pt": "absent"}
    assert md.hparams == preset_hparams("tiny")
    assert md.qwen2_config.hidden_size == md.hparams.llm.hidden_size
    tok = md.load_tokenizer()
    assert tok.endofprompt_id == 151646 and tok.encode("<|endofprompt|>") == [151646]
    assert md.load_spk2info() == {}


def test_blanken_backbone_matches_llm_pt(tiny_dir):
    """CosyVoice-BlankEN/model.safetensors holds the same backbone (what upstream's Qwen2Encoder loads)."""
    from safetensors.torch import load_file

    hf = load_file(str(tiny_dir / "CosyVoice-BlankEN" / "model.safetensors"))
    llm = torch.load(tiny_dir / "llm.pt", weights_only=True)
    assert set(hf) == {k[len("llm.model."):] for k in llm if k.startswith("llm.model.")} - {"lm_head.weight"}
    assert torch.equal(hf["model.norm.weight"], llm["llm.model.model.norm.weight"])


def test_roundtrip_init_save_load_identical_outputs(tiny_dir, tmp_path):
    """Done-when: init → save in upstream format → strict load → identical outputs, all three networks."""
    md = ModelDir.open(tiny_dir)
    nets = {k: md.load(k) for k in ("llm", "flow", "hift")}
    for net in nets.values():
        assert not net.training
    before = _run_networks(md, nets)
    copy = _copy_dir(tiny_dir, tmp_path / "copy", skip=("llm.pt", "flow.pt", "hift.pt"))
    for kind, net in nets.items():
        save_weights(net, copy / f"{kind}.pt", kind)
        saved = torch.load(copy / f"{kind}.pt", weights_only=True)
        original = torch.load(tiny_dir / f"{kind}.pt", weights_only=True)
        assert list(saved) == list(original), kind  # same keys, same order as the file we started from
        assert all(torch.equal(saved[k], original[k]) for k in saved), kind
    md2 = ModelDir.open(copy, deep=True)
    after = _run_networks(md2, {k: md2.load(k) for k in ("llm", "flow", "hift")})
    for kind in before:
        assert torch.equal(before[kind], after[kind]), kind
        assert torch.isfinite(before[kind]).all(), kind


def test_training_checkpoint_loads_in_place_of_weights(tiny_dir, tmp_path):
    sd = torch.load(tiny_dir / "hift.pt", weights_only=True)
    save_state_dict(tmp_path / "epoch_2_whole.pt", sd, meta={"epoch": 2, "step": 40})
    md = ModelDir(tiny_dir)
    a = md.load("hift", weights=tmp_path / "epoch_2_whole.pt")
    b = md.load("hift")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_every_problem_is_reported_at_once(tiny_dir, tmp_path):
    bad = _copy_dir(tiny_dir, tmp_path / "bad", skip=("campplus.onnx", "flow.pt", "hift.pt", "llm.pt"))
    # flow.pt truncated; hift.pt with a key removed and one mis-shaped; llm.pt with a table of another size
    (bad / "flow.pt").write_bytes((tiny_dir / "flow.pt").read_bytes()[:1000])
    hift = torch.load(tiny_dir / "hift.pt", weights_only=True)
    del hift["conv_post.bias"]
    hift["m_source.l_linear.weight"] = torch.zeros(1, 5)
    torch.save(hift, bad / "hift.pt")
    llm = torch.load(tiny_dir / "llm.pt", weights_only=True)
    llm["speech_embedding.weight"] = torch.zeros(100, 32)
    torch.save(llm, bad / "llm.pt")
    with pytest.raises(ModelDirError) as e:
        ModelDir.open(bad, deep=True)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "campplus.onnx: missing" in msg
    assert "flow.pt: malformed" in msg and "truncated or corrupted" in msg
    assert "conv_post.bias" in msg and "m_source.l_linear.weight: file [1, 5] vs model [1, 9]" in msg
    assert "speech_embedding.weight: file [100, 32] vs model [6761, 32]" in msg
    # the strict loader names the same keys
    with pytest.raises(CheckpointError, match="conv_post.bias"):
        ModelDir(bad).load("hift")


def test_shallow_check_and_bad_onnx_and_spk2info(tiny_dir, tmp_path):
    bad = _copy_dir(tiny_dir, tmp_path / "bad2", skip=("speech_tokenizer_v3.onnx",))
    shutil.copy2(tiny_dir / "campplus.onnx", bad / "speech_tokenizer_v3.onnx")  # wrong interface
    (bad / "spk2info.pt").write_bytes(b"not a torch file")
    status = {s.name: s for s in ModelDir(bad).check(deep=True)}
    assert status["speech_tokenizer_v3.onnx"].status == "malformed"
    assert "expected 2 input(s)" in status["speech_tokenizer_v3.onnx"].detail
    assert status["spk2info.pt"].status == "malformed"
    assert ModelDir(bad).check(deep=False)[-2].status == "ok"  # shallow: exists and non-empty only
    with pytest.raises(ModelDirError, match="spk2info.pt"):
        ModelDir(bad).load_spk2info()
    table = {"spk1": {"embedding": torch.randn(1, 192)}}
    torch.save(table, bad / "spk2info.pt")
    assert set(ModelDir(bad).load_spk2info()) == {"spk1"}


def test_yaml_and_blanken_mismatch(tiny_dir, tmp_path):
    bad = _copy_dir(tiny_dir, tmp_path / "bad3", skip=("cosyvoice3.yaml", "CosyVoice-BlankEN"))
    text = (tiny_dir / "cosyvoice3.yaml").read_text().replace("llm_input_size: 32", "llm_input_size: 64").replace(
        "llm_output_size: 32", "llm_output_size: 64")
    (bad / "cosyvoice3.yaml").write_text(text)
    _copy_dir(tiny_dir / "CosyVoice-BlankEN", bad / "CosyVoice-BlankEN", skip=("config.json",))
    cfg = json.loads((tiny_dir / "CosyVoice-BlankEN" / "config.json").read_text())
    (bad / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(cfg))
    problems = ModelDir(bad).problems()
    assert any("hidden_size 32 != yaml llm_input_size 64" in p for p in problems)


def test_not_a_dir():
    assert ModelDir("/nonexistent/x").problems() == ["/nonexistent/x: missing: no such directory"]


def test_write_model_dir_reuse_refuse_and_seed(tiny_dir, tmp_path):
    mtime = (tiny_dir / "llm.pt").stat().st_mtime_ns
    assert write_model_dir(tiny_dir, "tiny", seed=0) == tiny_dir  # intact, same preset/seed: kept
    assert (tiny_dir / "llm.pt").stat().st_mtime_ns == mtime
    with pytest.raises(UsageError, match="not empty"):
        write_model_dir(tiny_dir, "tiny", seed=1)
    other = write_model_dir(tmp_path / "seed1", "tiny", seed=1, tokenizer_from=tiny_dir / "CosyVoice-BlankEN")
    assert is_complete_model_dir(other, "tiny", 1) and not is_complete_model_dir(other, "tiny", 0)
    a = torch.load(tiny_dir / "flow.pt", weights_only=True)
    b = torch.load(other / "flow.pt", weights_only=True)
    assert not torch.equal(a["input_embedding.weight"], b["input_embedding.weight"])
    with pytest.raises(UsageError, match="unknown preset"):
        write_model_dir(tmp_path / "x", "huge")
    assert not (tmp_path / "x").exists()


def test_full_size_architecture_matches_upstream_inventory(golden):
    """Done-when: the full-size networks built from *our yaml mapping* match upstream key for key."""
    from cosytune.modeldir.presets import preset_hparams as hparams
    from cosytune.modeldir.upstream_yaml import dump_cosyvoice3_yaml
    from cosytune.models.qwen2 import Qwen2Config

    inv = golden.json("fullsize_keys")
    qwen2 = Qwen2Config.from_hf_dict(inv["qwen2_config"])
    hp = parse_cosyvoice3_yaml("full.yaml", text=dump_cosyvoice3_yaml(hparams("full")), qwen2=qwen2)
    total = 0
    for kind in ("llm", "flow", "hift"):
        net = build_network(kind, hp, device="meta")
        sd = net.state_dict()
        want = inv[kind]
        assert list(sd) == list(want["keys"]), kind
        for k, v in sd.items():
            assert list(v.shape) == want["keys"][k]["shape"], k
            assert str(v.dtype).replace("torch.", "") == want["keys"][k]["dtype"], k
        assert len(sd) == want["n_state_dict_tensors"]
        params = {id(p): p.numel() for p in net.parameters()}
        assert sum(params.values()) == want["n_parameters_dedup"] == inv["spec_param_counts"][kind], kind
        total += len(sd)
    assert total == inv["total_state_dict_tensors"]

"""Checkpoint averaging, model-dir assembly and spk2info writing on hand-built state dicts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from cosytune.cli.main import main
from cosytune.errors import CheckpointError, DataError
from cosytune.modeldir.package import assemble
from cosytune.train.average import average_checkpoints


def _write_ckpt(run: Path, epoch: int, step: int, value: float, loss: float, dtype=torch.float32) -> None:
    sd = {"a.weight": torch.full((3, 2), value, dtype=dtype), "b.bias": torch.full((2,), -value, dtype=dtype),
          "epoch": epoch, "step": step}
    torch.save(sd, run / f"epoch_{epoch}_whole.pt")
    (run / f"epoch_{epoch}_whole.yaml").write_text(yaml.safe_dump(
        {"epoch": epoch, "step": step, "tag": "CV", "loss_dict": {"loss": loss, "acc": 0.5}}))


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "exp"
    run.mkdir()
    for e, (v, loss) in enumerate([(1.0, 3.0), (2.0, 1.0), (4.0, 2.0), (8.0, 5.0)]):
        _write_ckpt(run, e, 10 * (e + 1), v, loss)
    return run


def test_average_val_best_picks_lowest_cv_loss(run_dir, tmp_path):
    res = average_checkpoints(run_dir, tmp_path / "avg.pt", num=2, val_best=True)
    assert sorted(c.epoch for c in res.sources) == [1, 2]
    sd = torch.load(tmp_path / "avg.pt", weights_only=True)
    assert set(sd) == {"a.weight", "b.bias"}  # epoch/step stripped
    assert torch.equal(sd["a.weight"], torch.full((3, 2), 3.0))
    import json

    meta = json.loads((tmp_path / "avg.json").read_text())
    assert [m["epoch"] for m in meta["averaged_from"]] == [1, 2]


def test_average_last_n(run_dir, tmp_path):
    res = average_checkpoints(run_dir, tmp_path / "avg.pt", num=3, val_best=False)
    assert [c.epoch for c in res.sources] == [1, 2, 3]
    assert torch.allclose(torch.load(tmp_path / "avg.pt", weights_only=True)["a.weight"], torch.full((3, 2), 14 / 3))


def test_average_accumulates_in_float32(tmp_path):
    run = tmp_path / "exp"
    run.mkdir()
    # bf16 sums of these values lose precision; float32 accumulation keeps the exact mean.
    for e, v in enumerate([256.0, 1.0, 1.0, 1.0]):
        _write_ckpt(run, e, e + 1, v, float(e), dtype=torch.bfloat16)
    average_checkpoints(run, tmp_path / "avg.pt", num=4, val_best=False)
    sd = torch.load(tmp_path / "avg.pt", weights_only=True)
    assert sd["a.weight"].dtype == torch.bfloat16
    assert sd["a.weight"][0, 0].item() == pytest.approx(259 / 4, rel=1e-2)


def test_average_refuses_mismatched_keys(run_dir, tmp_path):
    torch.save({"a.weight": torch.zeros(3, 2), "c": torch.zeros(1), "epoch": 9, "step": 99},
               run_dir / "epoch_9_whole.pt")
    (run_dir / "epoch_9_whole.yaml").write_text(yaml.safe_dump({"epoch": 9, "step": 99, "loss_dict": {"loss": 0.1}}))
    with pytest.raises(CheckpointError, match="missing keys.*b.bias"):
        average_checkpoints(run_dir, tmp_path / "avg.pt", num=2, val_best=True)


def test_average_cli_reports_and_errors(run_dir, tmp_path, capsys):
    assert main(["average", "--dst_model", str(tmp_path / "x.pt"), "--src_path", str(run_dir), "--num", "2",
                 "--val_best"]) == 0
    assert "epoch_1_whole" in capsys.readouterr().out
    assert main(["average", "--dst_model", str(tmp_path / "y.pt"), "--src_path", str(tmp_path / "nope")]) == 1
    assert "not a directory" in capsys.readouterr().err


def _base_dir(root: Path) -> Path:
    base = root / "base"
    (base / "CosyVoice-BlankEN").mkdir(parents=True)
    torch.save({"w": torch.zeros(4, 4), "v": torch.zeros(4)}, base / "llm.pt")
    torch.save({"f": torch.zeros(2, 2)}, base / "flow.pt")
    torch.save({"h": torch.zeros(3)}, base / "hift.pt")
    for name in ("campplus.onnx", "speech_tokenizer_v3.onnx", "cosyvoice3.yaml", "CosyVoice-BlankEN/config.json"):
        (base / name).write_bytes(os.urandom(64))
    return base


def test_assemble_links_base_and_writes_tuned(tmp_path):
    base = _base_dir(tmp_path)
    llm = tmp_path / "llm_avg.pt"
    torch.save({"w": torch.ones(4, 4), "v": torch.ones(4), "epoch": 3, "step": 7}, llm)
    spk = tmp_path / "spk2embedding.pt"
    torch.save({"alice": [0.5] * 192, "bob": [0.1] * 192}, spk)
    out = tmp_path / "model"
    res = assemble(base, out, llm, spk2embedding_pt=spk, spk_ids=["alice"])
    assert res.written == ["llm.pt", "spk2info.pt"]
    for name in ("hift.pt", "flow.pt"):  # linked or cloned, not duplicated
        assert (out / name).read_bytes() == (base / name).read_bytes()
        assert (res.linked[name] == "hardlink") == (out / name).samefile(base / name), res.linked
    assert not (out / "llm.pt").samefile(base / "llm.pt")
    sd = torch.load(out / "llm.pt", weights_only=True)
    assert set(sd) == {"w", "v"} and torch.equal(sd["w"], torch.ones(4, 4))
    assert torch.equal(torch.load(base / "llm.pt", weights_only=True)["w"], torch.zeros(4, 4))  # base untouched
    info = torch.load(out / "spk2info.pt", weights_only=True)
    assert list(info) == ["alice"] and info["alice"]["embedding"].shape == (1, 192)
    with pytest.raises(DataError, match="--overwrite"):
        assemble(base, out, llm)
    assemble(base, out, llm, flow_pt=base / "flow.pt", overwrite=True)
    assert not (out / "flow.pt").samefile(base / "flow.pt")


def test_shared_files_are_named_by_assemble_and_doctor(tmp_path, capsys):
    """Hard links share the base model's files: assemble's summary and doctor say so (a `cp` onto one would
    rewrite the base model's file); a reflinked or copied dir has nothing to report."""
    from cosytune.modeldir.package import shared_files

    base = _base_dir(tmp_path)
    llm = tmp_path / "llm_avg.pt"
    torch.save({"w": torch.ones(4, 4), "v": torch.ones(4)}, llm)
    out = tmp_path / "model"
    assert main(["assemble", "--base_model_dir", str(base), "--out_model_dir", str(out), "--llm_pt", str(llm)]) == 0
    summary = capsys.readouterr().out
    methods = set(__import__("json").loads((out / "cosytune_manifest.json").read_text())["linked"].values())
    if "hardlink" in methods:
        assert "hift.pt" in shared_files(out) and "llm.pt" not in shared_files(out)
        assert "change the base model too" in summary
        (out / "CosyVoice-BlankEN" / "config.json").unlink()  # the fake base's random bytes are no json
        (out / "CosyVoice-BlankEN" / "config.json").write_text("{}")
        main(["doctor", "--model_dir", str(out), "--quick"])
        assert "shared files" in capsys.readouterr().out
    else:
        assert "warning" not in summary and not shared_files(out)


def test_assemble_refuses_mismatched_weights(tmp_path):
    base = _base_dir(tmp_path)
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.ones(4, 5), "extra": torch.ones(1)}, bad)
    with pytest.raises(CheckpointError) as e:
        assemble(base, tmp_path / "m", bad)
    msg = str(e.value)
    assert "missing keys" in msg and "'v'" in msg and "unexpected keys" in msg and "extra" in msg and "(4, 5)" in msg
    assert not (tmp_path / "m").exists()


def test_spk2info_cli_merges_entries(tmp_path, capsys):
    spk = tmp_path / "spk2embedding.pt"
    torch.save({"alice": [0.5] * 192, "bob": [0.25] * 192}, spk)
    out = tmp_path / "spk2info.pt"
    assert main(["spk2info", "--spk2embedding_pt", str(spk), "--spk_id", "alice", "--out_spk2info_pt", str(out)]) == 0
    assert main(["spk2info", "--spk2embedding_pt", str(spk), "--spk_id", "bob", "--out_spk2info_pt", str(out)]) == 0
    table = torch.load(out, weights_only=True)
    assert sorted(table) == ["alice", "bob"] and torch.allclose(table["bob"]["embedding"], torch.full((1, 192), 0.25))
    assert main(["spk2info", "--spk2embedding_pt", str(spk), "--spk_id", "carol", "--out_spk2info_pt", str(out)]) == 1
    assert "available" in capsys.readouterr().err


def test_average_keeps_tied_weights_tied(tmp_path):
    """The LLM's text embedding and lm_head are one tensor in a checkpoint; the average keeps them one."""
    from cosytune.train.average import average_state_dicts

    paths = []
    for i in range(3):
        emb = torch.full((256, 64), float(i))
        torch.save({"emb.weight": emb, "head.weight": emb, "b": torch.full((2,), float(i)), "epoch": i, "step": i},
                   tmp_path / f"e{i}.pt")
        paths.append(tmp_path / f"e{i}.pt")
    avg = average_state_dicts(paths)
    assert avg["emb.weight"] is avg["head.weight"] and torch.equal(avg["emb.weight"], torch.full((256, 64), 1.0))
    torch.save(avg, tmp_path / "avg.pt")
    torch.save({k: v.clone() for k, v in avg.items()}, tmp_path / "untied.pt")
    assert (tmp_path / "avg.pt").stat().st_size < 0.6 * (tmp_path / "untied.pt").stat().st_size
    # untied in one input: averaged separately, each key its own mean
    torch.save({"emb.weight": torch.full((256, 64), 9.0), "head.weight": torch.zeros(256, 64), "b": torch.zeros(2)},
               tmp_path / "u.pt")
    avg = average_state_dicts([*paths, tmp_path / "u.pt"])
    assert torch.equal(avg["emb.weight"], torch.full((256, 64), 12 / 4)) and torch.equal(avg["head.weight"],
                                                                                       torch.full((256, 64), 3 / 4))

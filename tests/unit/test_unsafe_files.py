"""No file cosytune reads can run code: a crafted pickle is refused by every loader, with a clear
message and without the payload ever running.

Each file kind the tool reads is covered through the function the commands call (weights, averaged
and epoch checkpoints, resume state, spk2info, spk2embedding, utt2embedding / utt2speech_token), and
the commands users type (``assemble``, ``average``, ``spk2info``, ``make-parquet``, ``infer``) are run
on such files too. The resume state through ``cosytune train --resume`` is in ``test_train.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from unsafe_payload import write_evil

from cosytune.cli.main import main
from cosytune.errors import CheckpointError


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "the crafted pickle's payload ran"


def _assert_refused(err: BaseException, path: Path) -> None:
    msg = str(err)
    assert str(path) in msg and "refusing to load" in msg, msg
    assert "weights_only=False" not in msg and "can still be loaded" not in msg, msg  # never torch's advice
    assert "\x1b[" not in msg, msg  # nor its terminal colour codes


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """The test file is what it claims: loading it unsafely runs the command (so the tests below can fail)."""
    m = tmp_path / "ran"
    p = write_evil(tmp_path / "x.pt", m)
    torch.load(p, weights_only=False)
    assert m.exists()


def test_weight_files_refused(tmp_path, marker):
    from cosytune.weights.io import read_state_dict

    p = write_evil(tmp_path / "llm.pt", marker)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(p)
    _assert_refused(e.value, p)


def test_epoch_and_averaged_checkpoints_refused(tmp_path, marker):
    from cosytune.train.average import average_state_dicts
    from cosytune.train.checkpoint import read_checkpoint_weights

    good = tmp_path / "epoch_0_whole.pt"
    torch.save({"w": torch.zeros(2), "epoch": 0, "step": 1}, good)
    evil = write_evil(tmp_path / "epoch_1_whole.pt", marker)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint_weights(evil)
    _assert_refused(e.value, evil)
    with pytest.raises(CheckpointError) as e:
        average_state_dicts([good, evil])
    _assert_refused(e.value, evil)


def test_resume_state_refused(tmp_path, marker):
    from cosytune.train.checkpoint import load_resume_state

    p = write_evil(tmp_path / "epoch_0_whole.state.pt", marker)
    with pytest.raises(CheckpointError) as e:
        load_resume_state(p)
    _assert_refused(e.value, p)


def test_resume_state_round_trips_with_weights_only(tmp_path):
    """The resume state we write is made of tensors and plain values only, and restores every RNG."""
    import random

    import numpy as np

    from cosytune.train.checkpoint import load_resume_state, rng_state, set_rng_state

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)
    st = {"optimizer": {}, "scheduler": {}, "scaler": None, "train_state": {"epoch": 1}, "rng": rng_state()}
    expect = (random.random(), float(np.random.normal()), float(torch.rand(1)))
    torch.save(st, tmp_path / "s.state.pt")
    loaded = load_resume_state(tmp_path / "s.state.pt")  # weights_only=True inside
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.normal()), float(torch.rand(1))) == expect


def test_old_numpy_resume_state_refused_clearly(tmp_path):
    import numpy as np

    from cosytune.train.checkpoint import load_resume_state

    p = tmp_path / "old.state.pt"
    torch.save({"optimizer": {}, "scheduler": {}, "scaler": None, "train_state": {},
                "rng": {"numpy": np.random.get_state()}}, p)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_resume_state(p)


def test_spk2info_refused(tmp_path, marker):
    from cosytune.errors import DataError, ModelDirError
    from cosytune.modeldir.model_dir import ModelDir
    from cosytune.modeldir.package import save_spk2info

    d = tmp_path / "model"
    p = write_evil(d / "spk2info.pt", marker)
    with pytest.raises(ModelDirError) as e:
        ModelDir(d).load_spk2info()
    _assert_refused(e.value, p)
    with pytest.raises(DataError) as e:  # merging into an existing table reads it first
        save_spk2info(p, {"a": {"embedding": torch.zeros(1, 4)}})
    _assert_refused(e.value, p)


def test_spk2embedding_and_feature_tables_refused(tmp_path, marker):
    from cosytune.data.frontend_common import load_pt_map
    from cosytune.errors import DataError
    from cosytune.modeldir.package import load_spk2embedding

    for name in ("spk2embedding.pt", "utt2embedding.pt", "utt2speech_token.pt"):
        p = write_evil(tmp_path / name, marker)
        loader = load_spk2embedding if name.startswith("spk") else load_pt_map
        with pytest.raises(DataError) as e:
            loader(p)
        _assert_refused(e.value, p)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_commands_refuse_crafted_files(tmp_path, marker, capsys):
    """What a user sees: each command fails with the message (no traceback) and the payload never runs."""
    evil_pt = write_evil(tmp_path / "evil" / "llm_avg.pt", marker)
    evil_emb = write_evil(tmp_path / "evil" / "spk2embedding.pt", marker)
    runs = [
        ["spk2info", "--spk2embedding_pt", str(evil_emb), "--spk_id", "a", "--out_spk2info_pt",
         str(tmp_path / "o" / "spk2info.pt")],
        ["average", "--src_path", str(_run_dir_with_evil(tmp_path / "run", marker)), "--dst_model",
         str(tmp_path / "avg.pt"), "--num", "2"],
    ]
    for argv in runs:
        rc, out = _cli(argv, capsys)
        assert rc != 0 and "refusing to load" in out and "Traceback" not in out, (argv, out)
    assert not (tmp_path / "avg.pt").exists()
    assert evil_pt.exists()


def _run_dir_with_evil(run: Path, marker: Path) -> Path:
    import yaml

    run.mkdir(parents=True)
    for e in (0, 1):
        (run / f"epoch_{e}_whole.yaml").write_text(yaml.safe_dump({"epoch": e, "step": e + 1,
                                                                    "loss_dict": {"loss": 1.0 - e / 10}}))
        (run / f"epoch_{e}_whole.state.pt").write_bytes(b"")
    torch.save({"w": torch.zeros(2), "epoch": 0, "step": 1}, run / "epoch_0_whole.pt")
    write_evil(run / "epoch_1_whole.pt", marker)
    return run


@pytest.mark.slow
def test_model_dir_commands_refuse_crafted_files(tmp_path, marker, capsys, tiny_model_dir):
    """``assemble`` with a crafted tuned file and ``infer`` on a model dir whose spk2info.pt is crafted."""
    import logging

    from cosytune.modeldir.presets import write_model_dir

    logging.getLogger().handlers.clear()  # an earlier main() bound logging to a capture that is closed now
    base = write_model_dir(tmp_path / "base", preset="tiny", seed=0, tokenizer_from=tiny_model_dir / "CosyVoice-BlankEN")
    evil = write_evil(tmp_path / "evil" / "llm_avg.pt", marker)
    rc, out = _cli(["assemble", "--base_model_dir", str(base), "--out_model_dir", str(tmp_path / "m"),
                    "--llm_pt", str(evil)], capsys)
    assert rc != 0 and "refusing to load" in out and "Traceback" not in out, out
    write_evil(base / "spk2info.pt", marker)
    rc, out = _cli(["infer", "--model_dir", str(base), "--spk_id", "x", "--text", "hi", "--device", "cpu",
                    "--out_wav", str(tmp_path / "o.wav")], capsys)
    assert rc != 0 and "refusing to load" in out and "Traceback" not in out, out


def test_written_files_follow_the_umask(tmp_path):
    """Files we write are readable by others under umask 022 (mkstemp alone would make them 0600)."""
    import stat

    from cosytune.fileio import atomic_path, file_mode, write_text

    write_text(tmp_path / "a.txt", "x")
    with atomic_path(tmp_path / "b.wav") as tmp:
        tmp.write_bytes(b"RIFF")
    for name in ("a.txt", "b.wav"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == file_mode(), oct(mode)
    old = os.umask(0o022)
    os.umask(old)
    assert file_mode() == 0o666 & ~old


def test_a_locked_folder_names_its_holder(tmp_path):
    """Two processes never work in one folder: the second is refused at once and told who holds it."""
    import subprocess
    import sys

    from cosytune.errors import BusyError
    from cosytune.fileio import exclusive_lock

    code = ("import sys, time; from cosytune.fileio import exclusive_lock\n"
            f"with exclusive_lock({str(tmp_path)!r}, 'work dir'):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError) as e, exclusive_lock(tmp_path, "work dir"):
            pass
        assert f"pid {holder.pid}" in str(e.value) and "work dir" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(tmp_path, "work dir"):  # a killed holder leaves nothing behind
        pass


def test_disk_estimate_and_free_space_check(tmp_path):
    from cosytune.errors import DataError
    from cosytune.train.checkpoint import check_free_space, estimate_run_bytes

    assert estimate_run_bytes(100, keep_best=5, max_epoch=40) == int((6 * 100 + 200) * 1.05)
    assert estimate_run_bytes(100, keep_best=0, max_epoch=3) == int((3 * 100 + 200) * 1.05)
    check_free_space(tmp_path / "new" / "run", 1)
    with pytest.raises(DataError, match="GiB are free there"):
        check_free_space(tmp_path, 1 << 62)

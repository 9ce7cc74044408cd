"""`cosytune run`: all stages on the shipped sample with the tiny model; an interrupted run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import pytest
import soundfile as sf

from cosytune.cli.main import main
from cosytune.pipeline import STAGES, scaled_epochs

pytestmark = pytest.mark.slow

SAMPLE = Path(str(files("cosytune") / "assets" / "sample_speaker"))


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir) -> Path:
    return tiny_model_dir  # the session's tiny dir (tests/conftest.py): read-only


def _argv(work: Path, base: Path, *extra: str) -> list[str]:
    return ["run", "--audio", str(SAMPLE / "audio"), "--speaker", "allison", "--base_model", str(base),
            "--work", str(work), "--transcripts", str(SAMPLE / "transcripts.txt"), "--llm_epochs", "3",
            "--num_average", "2", "--device", "cpu", "--no_progress", *extra]


def test_interrupted_run_resumes_and_yields_a_usable_model_dir(tiny_base, tmp_path, capsys):
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "cosytune", *_argv(work, tiny_base)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = work / "exp" / "llm" / "epoch_0_whole.state.pt"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    state = json.loads((work / "state.json").read_text())
    assert "make-parquet" in state and "train-llm" not in state

    assert main(_argv(work, tiny_base)) == 0
    out = capsys.readouterr().out
    for stage in ("prepare-audio", "transcribe", "extract-embedding", "extract-speech-token", "make-parquet"):
        assert any(line.strip().startswith(stage) and "skipped" in line for line in out.splitlines()), stage
    assert (work / "exp" / "llm" / "epoch_2_whole.pt").exists()
    model = work / "models" / "allison"
    assert (model / "llm.pt").exists() and (model / "spk2info.pt").exists()
    audio, sr = sf.read(work / "out" / "tuned" / "sample.wav")
    assert sr == 24000 and len(audio) > 0

    # A third run with nothing changed skips every stage.
    assert main(_argv(work, tiny_base)) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        if stage != "train-flow":
            assert any(line.strip().startswith(stage) and "skipped" in line for line in out.splitlines()), stage
    # infer uses the assembled dir
    wav = tmp_path / "x.wav"
    assert main(["infer", "--model_dir", str(model), "--spk_id", "allison", "--text", "Hello there.",
                 "--out_wav", str(wav), "--device", "cpu"]) == 0
    assert wav.exists()


def test_force_and_stage_names(tiny_base, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(_argv(work, tiny_base, "--until", "transcribe")) == 0
    capsys.readouterr()
    assert main(_argv(work, tiny_base, "--until", "transcribe", "--force", "transcribe")) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    status = {ln[0]: ln[1] for ln in lines if len(ln) > 1 and ln[0] in STAGES}
    assert status == {"prepare-audio": "skipped", "transcribe": "done"}
    assert main(_argv(work, tiny_base, "--until", "nonsense")) == 2
    assert "stages are" in capsys.readouterr().err


def test_scaled_epochs():
    assert scaled_epochs(10) == 15 and scaled_epochs(60) == 10 and scaled_epochs(1) == 40 and scaled_epochs(0) == 10


# --- the skip rule: a changed input or setting re-runs its stage and everything after it ----------

CLIPS = ("conf-getchannel", "conf-getconfno", "conf-invalid", "invalid", "auth-incorrect", "agent-user")


def _stage_lines(out: str) -> dict[str, str]:
    """{stage: its line of the run summary} (status and note)."""
    rows = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[0] in STAGES and line.startswith("  "):
            rows[parts[0]] = parts[1]
    return rows


def _weights(path: Path) -> dict:
    from cosytune.train.checkpoint import read_checkpoint_weights

    return read_checkpoint_weights(path)


def _same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def small_run(tiny_base, tmp_path_factory):
    """A finished run on six short clips (1 epoch); tests below change one thing each and re-run."""
    root = tmp_path_factory.mktemp("skip")
    audio = root / "audio"
    audio.mkdir()
    lines = {ln.split("|", 1)[0]: ln for ln in (SAMPLE / "transcripts.txt").read_text().splitlines() if "|" in ln}
    for c in CLIPS:
        (audio / f"{c}.mp3").write_bytes((SAMPLE / "audio" / f"{c}.mp3").read_bytes())
    transcripts = root / "transcripts.txt"
    transcripts.write_text("\n".join(lines[f"{c}.mp3"] for c in CLIPS) + "\n")
    work = root / "work"

    def argv(*extra: str, base: Path = tiny_base) -> list[str]:
        return ["run", "--audio", str(audio), "--speaker", "allison", "--base_model", str(base), "--work", str(work),
                "--transcripts", str(transcripts), "--llm_epochs", "1", "--num_average", "1", "--device", "cpu",
                "--no_progress", *extra, "accum_grad=1"]

    assert main(argv()) == 0
    return {"work": work, "audio": audio, "transcripts": transcripts, "argv": argv}


def _llm_ckpt(work: Path) -> Path:
    return work / "exp" / "llm" / "epoch_0_whole.pt"


def test_unchanged_rerun_skips_everything(small_run, capsys):
    capsys.readouterr()
    assert main(small_run["argv"]()) == 0
    rows = _stage_lines(capsys.readouterr().out)
    assert set(rows) == set(STAGES)
    assert all(r.startswith("skipped") for r in rows.values()), rows


def test_run_dir_yamls_are_what_upstream_averaging_reads(small_run):
    """Upstream's average_model.py reads every *.yaml of the run dir not starting with train/init as a
    checkpoint record (KeyError 'loss_dict' otherwise); the resolved config is train_config.yaml."""
    import glob

    import yaml

    run = small_run["work"] / "exp" / "llm"
    assert (run / "train_config.yaml").is_file()
    yamls = [f for f in glob.glob(f"{run}/*.yaml")
             if not (os.path.basename(f).startswith("train") or os.path.basename(f).startswith("init"))]
    assert yamls
    for y in yamls:
        with open(y) as f:
            d = yaml.load(f, Loader=yaml.BaseLoader)
        float(d["loss_dict"]["loss"]), int(d["epoch"]), int(d["step"]), d["tag"]


def test_changed_transcript_retrains_and_says_why(small_run, capsys):
    work, tr = small_run["work"], small_run["transcripts"]
    before = _weights(_llm_ckpt(work))
    text = tr.read_text()
    tr.write_text(text.replace("Please enter the channel number", "Please enter the channel code"))
    capsys.readouterr()
    assert main(small_run["argv"]("--until", "train-llm")) == 0
    rows = _stage_lines(capsys.readouterr().out)
    assert rows["prepare-audio"].startswith("skipped")
    assert rows["transcribe"].startswith("done") and "transcripts.txt changed" in rows["transcribe"], rows
    for stage in ("extract-embedding", "extract-speech-token", "make-parquet", "train-llm"):
        assert rows[stage].startswith("done"), rows
    assert "after make-parquet re-ran" in rows["train-llm"], rows
    assert not _same_weights(before, _weights(_llm_ckpt(work)))


def test_changed_learning_rate_retrains(small_run, capsys):
    work = small_run["work"]
    assert main(small_run["argv"]("--until", "train-llm")) == 0
    before = _weights(_llm_ckpt(work))
    capsys.readouterr()
    assert main(small_run["argv"]("--until", "train-llm", "optim.lr=1e-3")) == 0
    out = capsys.readouterr().out
    rows = _stage_lines(out)
    assert rows["make-parquet"].startswith("skipped")
    assert rows["train-llm"].startswith("done") and "overrides changed" in rows["train-llm"], rows
    assert "cleared the earlier run" in rows["train-llm"]
    assert "lr: 0.001" in (work / "exp" / "llm" / "train_config.yaml").read_text()
    assert not _same_weights(before, _weights(_llm_ckpt(work)))


def test_rerecorded_clip_gets_new_speech_tokens_and_retrains(small_run, capsys):
    from cosytune.data.frontend_common import load_pt_map

    work, audio = small_run["work"], small_run["audio"]
    assert main(small_run["argv"]("--until", "train-llm")) == 0

    def tokens() -> dict:
        return {**load_pt_map(work / "data" / "train" / "utt2speech_token.pt"),
                **load_pt_map(work / "data" / "dev" / "utt2speech_token.pt")}

    old, before = tokens(), _weights(_llm_ckpt(work))
    # A different recording under the same name (similar length, so the old transcript still passes).
    (audio / "conf-getchannel.mp3").write_bytes((SAMPLE / "audio" / "conf-onlyone.mp3").read_bytes())
    capsys.readouterr()
    assert main(small_run["argv"]("--until", "train-llm")) == 0
    rows = _stage_lines(capsys.readouterr().out)
    assert "audio/conf-getchannel.mp3 changed" in rows["prepare-audio"], rows
    new = tokens()
    assert old.keys() == new.keys()
    changed = sorted(u for u in old if list(old[u]) != list(new[u]))
    assert changed and all("conf-getchannel" in u for u in changed), changed
    assert rows["train-llm"].startswith("done")
    assert not _same_weights(before, _weights(_llm_ckpt(work)))


def test_force_train_llm_retrains(small_run, capsys):
    work = small_run["work"]
    assert main(small_run["argv"]("--until", "train-llm")) == 0
    stamp = _llm_ckpt(work).stat().st_mtime_ns
    capsys.readouterr()
    assert main(small_run["argv"]("--from", "train-llm", "--until", "train-llm", "--force", "train-llm")) == 0
    out = capsys.readouterr().out
    assert _stage_lines(out)["train-llm"].startswith("done") and "forced" in _stage_lines(out)["train-llm"]
    steps = [int(ln.split()[-1]) for ln in out.splitlines() if ln.strip().startswith("optimizer steps")]
    assert steps and steps[-1] > 0, out
    assert _llm_ckpt(work).stat().st_mtime_ns != stamp
    # What depends on it runs again too.
    capsys.readouterr()
    assert main(small_run["argv"]()) == 0
    rows = _stage_lines(capsys.readouterr().out)
    assert rows["train-llm"].startswith("skipped")
    assert all(rows[s].startswith("done") for s in ("average", "assemble", "synthesize")), rows


def test_typed_error_of_a_stage_reaches_the_user(small_run, tiny_base, tmp_path, capsys):
    """A base model whose llm.pt lacks a tensor: the loader's CheckpointError (naming the key) is what the
    user sees, not 'stage failed (exit 1)'."""
    import shutil

    import torch

    from cosytune.weights.io import torch_load_safely

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    sd = torch_load_safely(base / "llm.pt")
    dropped = max(k for k in sd if isinstance(sd[k], torch.Tensor))
    del sd[dropped]
    torch.save(sd, base / "llm.pt")
    capsys.readouterr()
    assert main(small_run["argv"]("--until", "train-llm", base=base)) != 0
    err = capsys.readouterr().err
    assert dropped in err and "failed (exit" not in err, err


def test_damaged_model_file_is_assembled_again(small_run, capsys):
    """A truncated models/<speaker>/llm.pt is not trusted as "unchanged": assemble and synthesize run again."""
    llm = small_run["work"] / "models" / "allison" / "llm.pt"
    before = {k: v.clone() for k, v in _weights(llm).items()}  # copies: the file is mmapped, then truncated
    whole = llm.read_bytes()
    llm.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    assert main(small_run["argv"]()) == 0
    rows = _stage_lines(capsys.readouterr().out)
    assert rows["assemble"].startswith("done") and "changed since they were written" in rows["assemble"], rows
    assert rows["synthesize"].startswith("done") and _same_weights(_weights(llm), before)


def test_review_stops_after_transcription_and_overrides_go_anywhere(small_run, tmp_path, capsys):
    work = tmp_path / "w"
    argv = ["run", "optim.lr=2e-5", "--audio", str(small_run["audio"]), "--speaker", "allison", "max_epoch=1",
            "--base_model", str(small_run["argv"]()[6]), "--work", str(work), "--transcripts",
            str(small_run["transcripts"]), "--device", "cpu", "--no_progress", "--review"]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert set(_stage_lines(out)) == {"prepare-audio", "transcribe"}
    assert "stopped for review" in out and "apply-review --dir" in out and (work / "data" / "review.tsv").is_file()
    assert "optim.lr=2e-5" in (work / "run.yaml").read_text() and "max_epoch=1" in (work / "run.yaml").read_text()


def test_bad_settings_fail_before_any_work(small_run, tmp_path, capsys):
    """A bad --speaker and a work dir inside the recordings are refused before any stage runs."""
    base = str(small_run["argv"]()[6])

    def run(audio: Path, work: Path, speaker: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = main(["run", "--audio", str(audio), "--speaker", speaker, "--base_model", base, "--work", str(work),
                   "--device", "cpu", "--no_progress"])
        return rc, capsys.readouterr().err

    rc, err = run(small_run["audio"], tmp_path / "w1", "my voice")
    assert rc == 2 and "speaker" in err and not (tmp_path / "w1" / "data").exists(), err
    rc, err = run(small_run["audio"], small_run["audio"] / "work", "allison")
    assert rc == 2 and "inside --audio" in err and not (small_run["audio"] / "work" / "data").exists(), err


def test_two_runs_never_share_a_work_dir(small_run, capsys):
    import subprocess
    import sys

    work = small_run["work"]
    code = ("import time; from cosytune.fileio import exclusive_lock\n"
            f"with exclusive_lock({str(work)!r}, 'work dir'):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(small_run["argv"]()) == 1
        err = capsys.readouterr().err
        assert "is in use by another cosytune process" in err and f"pid {holder.pid}" in err, err
    finally:
        holder.kill()
        holder.wait()


def test_every_file_of_a_run_is_readable_by_others(small_run):
    """Under the usual umask 022 every file a run writes (wavs, reports, checkpoints, the model dir) is 0644,
    not mkstemp's 0600, so a web server, a container or another user can read the results."""
    import os
    import stat

    from cosytune.fileio import file_mode

    old = os.umask(0o022)
    os.umask(old)
    assert old == 0o022, "this test needs the usual umask 022"
    private = [str(p.relative_to(small_run["work"])) for p in small_run["work"].rglob("*")
               if p.is_file() and not p.is_symlink() and stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
    assert not private, private[:10]
    assert file_mode() == 0o644


def test_a_first_run_does_not_claim_to_clear_anything(small_run):
    """The first training of a work dir found nothing to clear (its run dir held only the lock); the demo's
    summary used to say "cleared the earlier run (restart requested)" on a fresh work dir."""
    from cosytune.train.api import TrainRequest, _clear_reason

    empty = small_run["work"] / "exp" / "fresh"
    empty.mkdir(parents=True)
    (empty / ".cosytune.lock").write_text("{}")
    assert _clear_reason(TrainRequest(model="llm", train_data=empty, run_dir=empty, restart=True)) == ""

"""The scorecard's real models on real speech: Resemblyzer's voice encoder and DNSMOS from the weights shipped
in their pip packages, on the sample speaker shipped with cosytune (English, Allison Smith) and the Mandarin
AISHELL clips of the golden fixtures; the install trap (webrtcvad → pkg_resources) stays closed; the dataset
QA flags a clip of another speaker planted among the sample's clips."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cosytune.audio.io import load_audio, to_mono
from cosytune.evaluation.models import Dnsmos, VoiceEncoder, cosine, to_16k

REPO = Path(__file__).resolve().parents[2]
MANDARIN = [REPO / "tests" / "golden" / "frontend_wavs" / f"aishell_BAC009S0764W012{i}_16k.wav" for i in (1, 2)]
ENGLISH = ["demo-thanks.mp3", "vm-intro.mp3", "invalid.mp3", "conf-invalid.mp3"]


@pytest.fixture(scope="module")
def encoder() -> VoiceEncoder:
    return VoiceEncoder()


@pytest.fixture(scope="module")
def dnsmos() -> Dnsmos:
    return Dnsmos()


def _clip(path: Path) -> np.ndarray:
    a, r = load_audio(path)
    return to_16k(to_mono(a), r)


def test_same_speaker_is_more_similar_than_another_speaker(encoder, sample_speaker_dir):
    en = [encoder.embed(_clip(sample_speaker_dir / "audio" / n)) for n in ENGLISH]
    zh = [encoder.embed(_clip(p)) for p in MANDARIN]
    same_en = [cosine(en[i], en[j]) for i in range(len(en)) for j in range(i + 1, len(en))]
    cross = [cosine(a, b) for a in en for b in zh]
    same_zh = cosine(zh[0], zh[1])
    assert min(same_en) > 0.7 and same_zh > 0.7, (same_en, same_zh)
    assert max(cross) < 0.65 and min(same_en) - max(cross) > 0.15, (same_en, cross)
    assert all(abs(np.linalg.norm(e) - 1) < 1e-5 for e in en + zh)


def test_voice_encoder_matches_resemblyzers_own_code(encoder, sample_speaker_dir):
    """Our loader of pretrained.pt against resemblyzer's VoiceEncoder on the same (already prepared) audio."""
    pytest.importorskip("resemblyzer")
    from resemblyzer import VoiceEncoder as Theirs

    wav = _clip(sample_speaker_dir / "audio" / "demo-moreinfo.mp3")
    theirs = Theirs(device="cpu", verbose=False).embed_utterance(wav)
    ours = encoder.embed(wav, preprocess=False)
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_dnsmos_prefers_clean_speech_and_matches_speechmos(dnsmos, sample_speaker_dir):
    clean = _clip(sample_speaker_dir / "audio" / "demo-echotest.mp3")  # 20 s: several 9 s windows
    noisy = clean + 0.05 * np.random.default_rng(0).standard_normal(clean.size).astype(np.float32)
    c, n = dnsmos.score(clean), dnsmos.score(noisy)
    assert c["ovrl"] > n["ovrl"] + 0.5 and c["bak"] > n["bak"] + 1.0 and c["p808"] > n["p808"], (c, n)
    assert 2.5 < c["ovrl"] < 4.5 and 1.0 <= n["ovrl"]
    pytest.importorskip("requests")  # speechmos.dnsmos imports it (we do not)
    from speechmos import dnsmos as theirs

    # One 9.5 s window (on longer clips speechmos drops windows whose float-computed end rounds one sample short).
    one = clean[: int(9.5 * 16000)]
    ours, ref = dnsmos.score(one), theirs.run(one, 16000)
    for k, key in (("ovrl", "ovrl_mos"), ("sig", "sig_mos"), ("bak", "bak_mos"), ("p808", "p808_mos")):
        assert ours[k] == pytest.approx(float(ref[key]), abs=1e-3), (k, ours[k], ref[key])


def test_scoring_models_load_without_pkg_resources_or_the_packages_themselves():
    """resemblyzer imports webrtcvad, whose old release imports pkg_resources (gone from current
    setuptools): the models must load without importing either package; the webrtcvad module installed
    (webrtcvad-wheels) must import cleanly too; and the lock must not bring back plain webrtcvad."""
    code = ("import sys\n"
            "from cosytune.evaluation.models import VoiceEncoder, Dnsmos\n"
            "import numpy as np\n"
            "e = VoiceEncoder().embed(np.random.default_rng(0).standard_normal(16000).astype('float32') * 0.1)\n"
            "d = Dnsmos().score(np.zeros(16000, 'float32'))\n"
            "bad = [m for m in ('pkg_resources', 'resemblyzer', 'webrtcvad', 'speechmos', 'requests') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "import webrtcvad\n"
            "assert 'pkg_resources' not in sys.modules\n"
            "print('ok', e.shape)\n")
    out = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], check=False,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok (256,)" in out.stdout, out.stderr[-2000:]
    lock = (REPO / "requirements.lock").read_text()
    assert "\nwebrtcvad-wheels==" in lock and "\nwebrtcvad==" not in lock and "\ntyping==" not in lock


@pytest.mark.slow
def test_dataset_qa_flags_a_planted_speaker(sample_speaker_dir, tmp_path, capsys):
    """A folder of the sample's clips with one Mandarin clip of another speaker: dataset-report flags it
    (and only it) in review.tsv."""
    from cosytune.cli.main import main
    from cosytune.data.review import read_review
    from cosytune.data.transcribe import TranscribeConfig, transcribe_dataset

    audio = tmp_path / "audio"
    audio.mkdir()
    lines = (sample_speaker_dir / "transcripts.txt").read_text().splitlines()[:9]
    for line in lines:
        shutil.copy(sample_speaker_dir / "audio" / line.split("|")[0], audio)
    shutil.copy(MANDARIN[0], audio / "planted.wav")
    tf = tmp_path / "t.txt"
    tf.write_text("\n".join(lines + ["planted.wav|而对楼市成交抑制作用最大的限购。"]) + "\n", encoding="utf-8")
    out = tmp_path / "ds"
    transcribe_dataset(audio, out, TranscribeConfig(backend="transcripts", transcripts=tf))
    assert main(["dataset-report", str(out), "--qa", "on", "--no_progress"]) == 0
    text = capsys.readouterr().out
    assert "QA flags       1 clip(s)" in text and "other_speaker" in text
    rows = read_review(out / "review.tsv")
    flagged = {u for u, r in rows.items() if "other_speaker" in r.flags}
    assert len(flagged) == 1 and "planted" in next(iter(flagged)), flagged
    import json

    rep = json.loads((out / "dataset_report.json").read_text())
    assert rep["qa"]["flags"] == {"other_speaker": 1} and len(rep["qa_clips"]) == 10
    assert all(2.0 < c["dnsmos_ovrl"] < 4.5 for c in rep["qa_clips"].values())

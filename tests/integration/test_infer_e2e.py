"""End-to-end synthesis on the tiny random-weight model dir, on CPU: every mode and every flag.

A tiny random model produces noise, not speech, so these tests check properties: lengths, determinism,
which weights were used, what run.json holds, chunk joins, and the error messages.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from speaker_models import speaker_model_dir

from cosytune.cli.main import main
from cosytune.errors import DataError, UsageError
from cosytune.infer.synthesizer import SynthesisOptions, Synthesizer

HOP = 480  # samples per mel frame at 24 kHz
INSTRUCT = "You are a helpful assistant.<|endofprompt|>"
SECRET = "Seven secret swans sang softly."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, sample_speaker_dir, tiny_model_dir):
    """Model dir A (seed 0) with an SFT speaker and a stored zero-shot speaker, and model dir B (seed 1)."""
    from cosytune.modeldir.presets import write_model_dir

    root = tmp_path_factory.mktemp("models")
    clip = sample_speaker_dir / "audio" / "agent-user.mp3"
    a = speaker_model_dir(root / "a", zero_shot_clip=clip, tokenizer_from=tiny_model_dir / "CosyVoice-BlankEN")
    b = write_model_dir(root / "b", "tiny", seed=1, tokenizer_from=a / "CosyVoice-BlankEN")
    return {"a": a, "b": b, "root": root, "clip": clip}


@pytest.fixture(scope="module")
def synth(dirs):
    return Synthesizer.from_dir(dirs["a"], device="cpu")


def _opts(**kw) -> SynthesisOptions:
    kw.setdefault("seed", 11)
    return SynthesisOptions(**kw)


# ----------------------------------------------------------------------------------------- API
def test_sft_seed_reproduces_and_length_is_tokens_times_960(synth):
    r1 = synth.synthesize("Hello there, how are you?", spk_id="alice", options=_opts())
    r2 = synth.synthesize("Hello there, how are you?", spk_id="alice", options=_opts())
    assert r1.info["mode"] == "sft" and r1.sample_rate == 24000
    assert np.array_equal(r1.audio, r2.audio) and r1.tokens == r2.tokens and r1.seed == 11
    assert r1.audio.shape[0] == r1.info["flow_tokens"] * 2 * HOP
    assert np.isfinite(r1.audio).all() and np.abs(r1.audio).max() <= 0.99 + 1e-6
    # min_len: at least 2 tokens per text token.
    assert len(r1.tokens) >= 2 * r1.info["text_tokens"]
    r3 = synth.synthesize("Hello there, how are you?", spk_id="alice", options=_opts(seed=12))
    assert r3.tokens != r1.tokens


def test_speed_changes_duration(synth):
    base = synth.synthesize("Speed test sentence.", spk_id="alice", options=_opts())
    frames = base.audio.shape[0] // HOP
    for speed in (2.0, 0.5):
        r = synth.synthesize("Speed test sentence.", spk_id="alice", options=_opts(speed=speed))
        assert r.tokens == base.tokens
        assert r.audio.shape[0] == int(frames / speed) * HOP


def test_text_is_never_split(synth):
    text = "First sentence here. Second one follows! And a third, with 3 numbers: 12 and 7?"
    req = synth.prepare(text, spk_id="alice", options=_opts())
    [normalised] = synth.normalizer.normalize(text, split=False)
    assert req.spoken_text == normalised and req.text_ids == synth.tokenizer.encode(normalised)
    assert "twelve" in req.spoken_text
    raw = synth.prepare(text, spk_id="alice", options=_opts(text_frontend=False))
    assert raw.spoken_text == text


def test_prompt_layouts_per_mode(synth, dirs):
    eop = synth.endofprompt_id
    sft = synth.prepare("Hi.", spk_id="alice")
    assert sft.mode == "sft" and sft.llm_prompt_ids[-1] == eop and not sft.llm_prompt_speech and not sft.flow_prompt
    zs = synth.prepare("Hi.", prompt_wav=dirs["clip"], prompt_text=INSTRUCT + "Agent logged on.")
    assert zs.mode == "zero_shot" and zs.llm_prompt_speech and zs.flow_prompt
    assert len(zs.llm_prompt_speech) == zs.speaker.num_prompt_tokens
    xl = synth.prepare("Hi.", prompt_wav=dirs["clip"])
    assert xl.mode == "cross_lingual" and not xl.llm_prompt_speech and xl.flow_prompt
    assert xl.llm_prompt_ids == synth.tokenizer.encode(INSTRUCT)
    i2 = synth.prepare("Hi.", mode="instruct2", prompt_wav=dirs["clip"], prompt_text="Speak slowly.<|endofprompt|>")
    assert i2.mode == "instruct2" and not i2.llm_prompt_speech
    assert i2.llm_prompt_ids == synth.tokenizer.encode("Speak slowly.<|endofprompt|>")
    stored = synth.prepare("Hi.", spk_id="bob")
    assert stored.mode == "zero_shot" and stored.llm_prompt_ids == zs.llm_prompt_ids
    assert stored.llm_prompt_speech == zs.llm_prompt_speech
    guide = synth.prepare("Hi.", spk_id="alice", prompt_text="Once upon a time.<|endofprompt|>",
                          options=_opts(prompt_strategy="guide_prefix", guide_sep=" ... "))
    assert guide.spoken_text.startswith("Once upon a time.") and guide.spoken_text.endswith("Hi.")
    assert guide.llm_prompt_ids == synth.tokenizer.encode(INSTRUCT)
    upstream_style = synth.prepare(INSTRUCT + "Hi.", spk_id="alice")
    assert upstream_style.llm_prompt_ids == [] and eop in upstream_style.text_ids


def test_stored_zero_shot_speaker_equals_prompt_wav(synth, dirs):
    a = synth.synthesize("Reuse me.", spk_id="bob", options=_opts())
    b = synth.synthesize("Reuse me.", prompt_wav=dirs["clip"], prompt_text=INSTRUCT + "Agent logged on.",
                         options=_opts())
    assert a.info["mode"] == b.info["mode"] == "zero_shot"
    assert np.array_equal(a.audio, b.audio)


def test_errors_are_clear(synth, dirs, tmp_path):
    with pytest.raises(DataError, match=r"unknown speaker id 'nobody'.*alice, bob"):
        synth.synthesize("Hi.", spk_id="nobody")
    for text in ("", "   ", "?!...", "……"):
        with pytest.raises(DataError, match="empty|punctuation|nothing"):
            synth.prepare(text, spk_id="alice")
    with pytest.raises(DataError, match="nothing to speak"):
        synth.prepare(INSTRUCT, spk_id="alice")
    with pytest.raises(DataError, match="lacks <\\|endofprompt\\|>.*assistant"):
        synth.prepare("Hi.", prompt_wav=dirs["clip"], prompt_text="Agent logged on.")
    with pytest.raises(DataError, match="lacks <\\|endofprompt\\|>"):
        synth.prepare("Hi.", spk_id="alice", prompt_text="Speak slowly.")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio" * 100)
    with pytest.raises(DataError, match="cannot use prompt wav"):
        synth.prepare("Hi.", prompt_wav=bad, prompt_text=INSTRUCT + "x")
    with pytest.raises(UsageError, match="only one"):
        synth.prepare("Hi.", spk_id="alice", prompt_wav=dirs["clip"])
    with pytest.raises(UsageError, match="no voice"):
        synth.prepare("Hi.")
    with pytest.raises(UsageError, match="instruct2 needs --prompt_text"):
        synth.prepare("Hi.", mode="instruct2", prompt_wav=dirs["clip"])
    with pytest.raises(UsageError, match="SFT entry"):
        synth.prepare("Hi.", mode="zero_shot", spk_id="alice")
    with pytest.raises(UsageError, match="stream"):
        next(synth.stream("Hi.", spk_id="alice", options=_opts(speed=1.5)))


def _border_jumps(audio: np.ndarray, borders: list[int], window: int = HOP) -> list[tuple[float, float]]:
    """(|jump at border|, largest |jump| within ±window around it, border excluded) per border."""
    d = np.abs(np.diff(audio.astype(np.float64)))
    out = []
    for b in borders:
        i = b - 1  # d[i] = |x[b] - x[b-1]|
        lo, hi = max(0, i - window), min(d.shape[0], i + window + 1)
        around = np.concatenate([d[lo:i], d[i + 1:hi]])
        out.append((float(d[i]), float(around.max())))
    return out


def test_streaming_matches_length_and_joins_without_clicks(synth):
    # min_len = 2 tokens per text token: this text guarantees at least two full chunks before the last.
    text = ("Streaming needs a text long enough for several chunks of speech tokens to arrive in turn, "
            "so this sentence keeps going for a while, with commas, clauses and a few more words, "
            "until the language model has produced well over a hundred tokens in one single request.")
    opts = _opts()
    chunks = list(synth.stream(text, spk_id="alice", options=opts))
    result = chunks[-1].result
    assert chunks[-1].final and all(not c.final for c in chunks[:-1]) and len(chunks) >= 3
    joined = np.concatenate([c.audio for c in chunks])
    assert np.array_equal(joined, result.audio)
    one_shot = synth.synthesize(text, spk_id="alice", options=opts)
    assert result.tokens == one_shot.tokens
    assert abs(joined.shape[0] - one_shot.audio.shape[0]) <= HOP
    assert result.timings["first_chunk_s"] <= result.timings["total_s"]
    borders = list(np.cumsum([c.audio.shape[0] for c in chunks[:-1]]))
    borders = [b for b in borders if 0 < b < joined.shape[0]]
    assert borders
    for jump, around in _border_jumps(joined, borders):
        assert jump <= around, f"click at a chunk border: jump {jump:.4f} > local max {around:.4f}"
    # The first chunk covers upstream's first hop (25 tokens, no prompt padding for SFT) minus the
    # vocoder's held-back look-ahead frames.
    hop = synth.schedule.token_hop_len
    assert chunks[0].audio.shape[0] == (hop * 2 - synth.hift.config.chunk_trim_frames) * HOP


def test_interleaved_streams_share_no_state(synth, dirs):
    """Two requests consumed alternately give exactly what each gives alone (per-request state only)."""
    long = ("A first request that is long enough to be cut into several streamed chunks, so that the two "
            "generators really take turns while both are still producing audio, chunk after chunk.")
    alone_a = [c.audio for c in synth.stream(long, spk_id="alice", options=_opts(seed=1))]
    alone_b = [c.audio for c in synth.stream(long, spk_id="bob", options=_opts(seed=2))]
    gen_a = synth.stream(long, spk_id="alice", options=_opts(seed=1))
    gen_b = synth.stream(long, spk_id="bob", options=_opts(seed=2))
    got_a, got_b = [], []
    for a, b in zip(gen_a, gen_b):
        got_a.append(a.audio)
        got_b.append(b.audio)
    got_a += [c.audio for c in gen_a]
    got_b += [c.audio for c in gen_b]
    assert len(got_a) == len(alone_a) and len(got_b) == len(alone_b)
    assert all(np.array_equal(x, y) for x, y in zip(got_a, alone_a))
    assert all(np.array_equal(x, y) for x, y in zip(got_b, alone_b))


def test_cross_lingual_and_instruct2_synthesise(synth, dirs):
    xl = synth.synthesize("Cross lingual.", prompt_wav=dirs["clip"], options=_opts())
    i2 = synth.synthesize("Instructed.", mode="instruct2", prompt_wav=dirs["clip"],
                          prompt_text="Please speak slowly.<|endofprompt|>", options=_opts())
    for r, mode in ((xl, "cross_lingual"), (i2, "instruct2")):
        assert r.info["mode"] == mode and r.info["flow_prompt_tokens"] > 0 and r.info["llm_prompt_speech_tokens"] == 0
        assert r.audio.shape[0] == r.info["flow_tokens"] * 2 * HOP


# ----------------------------------------------------------------------------------------- weights
def test_llm_and_flow_ckpt_really_swap_weights(dirs):
    a, b, root = dirs["a"], dirs["b"], dirs["root"]
    opts = _opts()
    text = "Swap test."

    def run(model_dir, **kw):
        s = Synthesizer.from_dir(model_dir, device="cpu", **kw)
        return s.synthesize(text, spk_id="alice", options=opts), s

    base, _ = run(a)
    swapped, s = run(a, llm_ckpt=b / "llm.pt", flow_ckpt=b / "flow.pt")
    assert s.model_files["llm"]["swapped"] and s.model_files["llm"]["path"] == str((b / "llm.pt").resolve())
    mixed = root / "mixed"
    shutil.copytree(a, mixed)
    shutil.copy2(b / "llm.pt", mixed / "llm.pt")
    shutil.copy2(b / "flow.pt", mixed / "flow.pt")
    reference, _ = run(mixed)
    assert np.array_equal(swapped.audio, reference.audio) and swapped.tokens == reference.tokens
    assert swapped.tokens != base.tokens
    # A training checkpoint (epoch/step entries beside the weights) loads the same weights.
    ckpt = root / "epoch_3_whole.pt"
    sd = torch.load(b / "llm.pt", map_location="cpu", weights_only=True)
    torch.save({**sd, "epoch": 3, "step": 120}, ckpt)
    from_ckpt, _ = run(a, llm_ckpt=ckpt, flow_ckpt=b / "flow.pt")
    assert np.array_equal(from_ckpt.audio, reference.audio)
    # Upstream's construction-time vocoder noise: same tokens and length, other noise values.
    upstream, s_up = run(a, upstream_noise=True)
    assert s_up.hift.fixed_noise(1).seed is None and upstream.tokens == base.tokens
    assert upstream.audio.shape == base.audio.shape and not np.array_equal(upstream.audio, base.audio)
    # Flow only: same tokens as the base (same LLM), other audio.
    flow_only, _ = run(a, flow_ckpt=b / "flow.pt")
    assert flow_only.tokens == base.tokens and not np.array_equal(flow_only.audio, base.audio)


# ----------------------------------------------------------------------------------------- CLI
def test_cli_infer_out_dir_and_run_json(dirs, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["infer", "--model_dir", str(dirs["a"]), "--spk_id", "alice", "--text", SECRET, "--out_dir", str(out),
               "--seed", "5", "--top_k", "10", "--device", "cpu", "--no_progress"])
    assert rc == 0
    wav, sr = sf.read(str(out / "chunk_0000.wav"))
    assert sr == 24000 and wav.shape[0] > 0
    raw = (out / "run.json").read_text(encoding="utf-8")
    assert "swans" not in raw.lower()
    info = json.loads(raw)
    assert info["seed"] == 5 and info["settings"]["top_k"] == 10 and info["request"]["sampling"]["top_k"] == 10
    assert info["settings"]["text"]["chars"] == len(SECRET)
    for name in ("cosyvoice3.yaml", "llm", "flow", "hift", "spk2info.pt"):
        assert len(info["model_files"][name]["sha256"]) == 64
    t = info["timings"]
    assert t["rtf"] > 0 and t["audio_s"] == pytest.approx(wav.shape[0] / 24000, abs=1e-3) and t["load_s"] > 0
    assert info["outputs"][0]["path"].endswith("chunk_0000.wav")


def test_cli_stream_out_wav_text_file_zero_shot(dirs, tmp_path):
    text_file = tmp_path / "t.txt"
    text_file.write_text("Zero shot from a file, streamed in pieces as they come out of the model.\n",
                         encoding="utf-8-sig")  # with a byte-order mark, as Windows editors write
    out_wav = tmp_path / "deep" / "exact.wav"
    rc = main(["infer", "--model_dir", str(dirs["a"]), "--prompt_wav", str(dirs["clip"]), "--prompt_text",
               INSTRUCT + "Agent logged on.", "--text_file", str(text_file), "--out_wav", str(out_wav),
               "--stream", "--seed", "3", "--device", "cpu"])
    assert rc == 0 and out_wav.is_file()
    info = json.loads((out_wav.parent / "run.json").read_text(encoding="utf-8"))
    assert info["request"]["mode"] == "zero_shot" and info["request"]["stream"]
    assert info["timings"]["first_chunk_s"] > 0
    pieces = sorted(out_wav.parent.glob("piece_*.wav"))
    assert pieces
    joined = np.concatenate([sf.read(str(p), dtype="int16")[0] for p in pieces])
    assert np.array_equal(joined, sf.read(str(out_wav), dtype="int16")[0])
    assert "Agent" not in json.dumps(info["settings"])


def test_cli_errors_exit_codes(dirs, tmp_path, capsys):
    base = ["infer", "--model_dir", str(dirs["a"]), "--out_dir", str(tmp_path / "e"), "--device", "cpu"]
    assert main(base + ["--spk_id", "nobody", "--text", "Hi."]) == 2  # a usage error, listing the ids
    assert "alice, bob" in capsys.readouterr().err
    assert main(base + ["--spk_id", "alice", "--text", "...!?"]) == 1
    assert "punctuation" in capsys.readouterr().err
    assert main(base + ["--prompt_wav", str(tmp_path / "missing.wav"), "--prompt_text", INSTRUCT + "x",
                        "--text", "Hi."]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(base + ["--prompt_wav", str(dirs["clip"]), "--prompt_text", "no marker", "--text", "Hi."]) == 1
    assert "<|endofprompt|>" in capsys.readouterr().err
    assert main(base + ["--spk_id", "alice", "--text", "Hi.", "--stream", "--speed", "1.2"]) == 2
    assert main(base + ["--spk_id", "alice", "--text", "Hi.", "--top_p", "1.5"]) == 2


def test_cli_checks_flags_and_outputs_before_loading(dirs, tmp_path, capsys):
    """Bad flags and unwritable outputs are refused before the model loads (a missing model dir is not even
    reached), and a failed run leaves no empty output folder behind."""
    missing = ["infer", "--model_dir", str(tmp_path / "no_model"), "--device", "cpu", "--text", "Hi."]
    cases = [
        (["--spk_id", "alice", "--stream", "--speed", "1.2", "--out_dir", str(tmp_path / "o1")], "--stream"),
        (["--spk_id", "alice", "--top_p", "1.5", "--out_dir", str(tmp_path / "o2")], "top_p"),
        (["--out_dir", str(tmp_path / "o3")], "no voice given"),
        (["--spk_id", "alice", "--out_wav", str(tmp_path / "x.mp3")], ".wav name"),
        (["--spk_id", "alice", "--out_wav", str(tmp_path)], "is a folder"),
    ]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases.append((["--spk_id", "alice", "--out_dir", str(a_file)], "is a file"))
    for extra, message in cases:
        capsys.readouterr()
        assert main(missing + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "no_model" not in err, (extra, err)
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
    # a run that fails after loading leaves no empty folder either
    assert main(["infer", "--model_dir", str(dirs["a"]), "--device", "cpu", "--spk_id", "alice", "--text", "?!",
                 "--out_dir", str(tmp_path / "o4")]) == 1
    assert not (tmp_path / "o4").exists()


def test_too_long_text_says_how_long_a_segment_may_be(synth):
    with pytest.raises(DataError, match="too long for one segment.*infer-batch") as e:
        synth.prepare("word " * 20000, spk_id="alice", options=_opts(text_frontend=False))
    assert "characters" in str(e.value)


def test_cli_infer_batch_resume_rejects_and_join(dirs, tmp_path):
    lines = tmp_path / "in.jsonl"
    rows = [{"text": "First line.", "name": "one"}, {"text": "Second, faster.", "speed": 2.0},
            {"text": "?!", "name": "bad"}]
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "batch"
    args = ["infer-batch", "--model_dir", str(dirs["a"]), "--spk_id", "alice", "--input", str(lines),
            "--out_dir", str(out), "--seed", "9", "--join", "all.wav", "--gap_s", "0.5", "--device", "cpu",
            "--no_progress"]
    assert main(args) == 1  # one line failed, the others were written
    assert (out / "one.wav").is_file() and (out / "seg_0001.wav").is_file() and not (out / "bad.wav").exists()
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rejects) == 1 and rejects[0]["input"].endswith(":3")
    assert not (out / "all.wav").exists()  # a joined file with a hole would pass for the whole text
    n1 = sf.info(str(out / "one.wav")).frames
    n2 = sf.info(str(out / "seg_0001.wav")).frames
    manifest = [json.loads(x) for x in (out / "batch.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["name"] for m in manifest] == ["one", "seg_0001"] and all(m["seed"] == 9 for m in manifest)
    assert "First" not in (out / "batch.jsonl").read_text(encoding="utf-8")
    mtime = (out / "one.wav").stat().st_mtime_ns
    assert main(args) == 1
    assert (out / "one.wav").stat().st_mtime_ns == mtime  # unchanged settings: skipped
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["request"]["skipped"] == 2 and info["command"] == "infer-batch"
    lines.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n", encoding="utf-8")  # the bad line fixed
    assert main(args) == 0
    assert sf.info(str(out / "all.wav")).frames == n1 + n2 + 12000
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\nnot json\n{"text": "a", "speed": "fast", "seed": true}\n', encoding="utf-8")
    assert main(["infer-batch", "--model_dir", str(dirs["a"]), "--spk_id", "alice", "--input", str(bad),
                 "--out_dir", str(tmp_path / "b2")]) == 1


def test_cli_infer_batch_line_voice_wins_over_the_flag(dirs, tmp_path, capsys):
    """--spk_id is the default voice; a line with its own prompt_wav speaks in that voice instead (no clash)."""
    lines = tmp_path / "in.jsonl"
    rows = [{"text": "In the default voice.", "name": "sft"},
            {"text": "In the line's own voice.", "name": "own", "prompt_wav": str(dirs["clip"]),
             "prompt_text": INSTRUCT + "Agent logged on."}]
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "voices"
    assert main(["infer-batch", "--model_dir", str(dirs["a"]), "--spk_id", "alice", "--input", str(lines),
                 "--out_dir", str(out), "--seed", "4", "--device", "cpu", "--no_progress"]) == 0, capsys.readouterr()
    modes = {m["name"]: m["mode"] for m in map(json.loads, (out / "batch.jsonl").read_text().splitlines())}
    assert modes == {"sft": "sft", "own": "zero_shot"}


def test_batch_input_problems_are_all_listed(tmp_path):
    from cosytune.cli.infer_batch import read_segments

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\nnot json\n{"text": "a", "speed": "fast", "seed": true}\n'
                   '{"text": "b", "name": "n"}\n{"text": "c", "name": "n"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_segments(bad)
    msg = str(e.value)
    for part in ("line 1: unknown key", "line 2: not JSON", '"speed" must be', '"seed" must be int',
                 "already used on line 4"):
        assert part in msg
    txt = tmp_path / "lines.txt"
    txt.write_text("\ufeffone\n\n  two  \n", encoding="utf-8")
    rows = read_segments(txt)
    assert [(r["text"], r["name"]) for r in rows] == [("one", "seg_0000"), ("two", "seg_0001")]
    sub = tmp_path / "req"
    sub.mkdir()
    (sub / "ref.wav").write_bytes(b"x")
    (sub / "r.jsonl").write_text('{"text": "hi", "prompt_wav": "ref.wav"}\n', encoding="utf-8")
    assert read_segments(sub / "r.jsonl")[0]["prompt_wav"] == str(sub / "ref.wav")

"""Tiny random-weight model dirs with speakers, shared by the synthesis tests (built offline, on CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from cosytune.cli.main import main

INSTRUCT = "You are a helpful assistant.<|endofprompt|>"


def speaker_model_dir(path: Path, *, seed: int = 0, zero_shot_clip: Path | None = None,
                      tokenizer_from: Path | None = None) -> Path:
    """``write_model_dir(path, "tiny")`` plus an SFT speaker ``alice`` (a fixed random embedding) and, when
    ``zero_shot_clip`` is given, a zero-shot speaker ``bob`` made from that clip through the real CLI."""
    from cosytune.modeldir.presets import write_model_dir

    d = write_model_dir(path, "tiny", seed=seed, tokenizer_from=tokenizer_from)
    spk = path.parent / f"{path.name}_spk2embedding.pt"
    torch.save({"alice": torch.randn(192, generator=torch.Generator().manual_seed(3)).tolist()}, spk)
    assert main(["spk2info", "--spk2embedding_pt", str(spk), "--spk_id", "alice",
                 "--out_spk2info_pt", str(d / "spk2info.pt")]) == 0
    if zero_shot_clip is not None:
        assert main(["spk2info", "--model_dir", str(d), "--spk_id", "bob", "--prompt_wav", str(zero_shot_clip),
                     "--prompt_text", INSTRUCT + "Agent logged on."]) == 0
    return d


def same_networks(synth, **settings):
    """Another ``Synthesizer`` over ``synth``'s loaded networks, tokenizer, speakers and stream schedule, with
    other settings (``fast_decode``, ``batch_decode``, ...): any difference between the two comes from those."""
    from cosytune.infer.synthesizer import Synthesizer

    return Synthesizer(synth.llm, synth.flow, synth.hift, tokenizer=synth.tokenizer, spk2info=synth.spk2info,
                       sample_rate=synth.sample_rate, schedule=synth.schedule, **settings)


def assert_same_takes(a, b, text: str, seeds, decoders: tuple[str, str]) -> list:
    """Synthesise ``text`` with speaker ``alice`` for each seed on ``a`` and on ``b`` (no text front end: wetext's
    grammar load would dominate and adds nothing), check each used the LLM decoder named in ``decoders`` and that
    both gave the same tokens and bit-identical audio. Returns the (a, b) result pairs for further checks."""
    import numpy as np

    from cosytune.infer.synthesizer import SynthesisOptions

    pairs = []
    for seed in seeds:
        opts = SynthesisOptions(seed=seed, text_frontend=False)
        ra, rb = a.synthesize(text, spk_id="alice", options=opts), b.synthesize(text, spk_id="alice", options=opts)
        assert (ra.info["llm_decoder"], rb.info["llm_decoder"]) == decoders
        assert ra.tokens == rb.tokens, seed
        assert np.array_equal(ra.audio, rb.audio), seed
        pairs.append((ra, rb))
    return pairs

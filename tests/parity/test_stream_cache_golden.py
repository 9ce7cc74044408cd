"""The cached streaming flow (``inference_chunk``: each chunk computes only its own frames) against upstream's
streaming fixture and against the recomputing path.

The fixture's streaming chunk (``flow_tiny_infer`` ``chunk_stream``: prompt + tokens over two 50-frame DiT
blocks) is produced here in two cached calls, one block each; the joined mel must equal upstream's within
the fixture's tolerance. A longer random stream on the same weights, cut by our chunk schedule, must give
each chunk the mel of the recomputing path (``inference(streaming=True)`` on the whole prefix).
"""

from __future__ import annotations

import pytest
import torch

from cosytune.infer.streaming import StreamSchedule, StreamState
from cosytune.models.flow import FlowStreamCache, build_flow
from cosytune.weights.io import strict_load

STEM = "flow_tiny_infer"


@pytest.fixture(scope="module")
def flow(golden):
    model = build_flow(golden.flow_config()).eval()
    strict_load(model, golden.tensors("flow_tiny_weights"), source="flow_tiny_weights")
    return model


def test_cached_chunks_give_upstreams_streaming_chunk(golden, flow):
    info, t = golden.json(STEM)["chunk_stream"], golden.tensors(STEM)
    token, p_tok, p_feat, emb = t["token"], t["prompt_token"], t["prompt_feat"], t["embedding"]
    p, look = p_tok.shape[1], flow.config.pre_lookahead_len
    block = flow.config.dit.static_chunk_size // flow.config.token_mel_ratio  # tokens per DiT block
    first = block - p  # prompt + first part = one whole block
    assert 0 < first < token.shape[1] - look
    cache = FlowStreamCache(info["n_timesteps"])
    with torch.inference_mode():
        a = flow.inference_chunk(token[:, : first + look], p_tok, p_feat, emb, cache)
        b = flow.inference_chunk(token, p_tok, p_feat, emb, cache)
    mel = torch.cat((a, b), dim=2)
    assert a.shape[2] == 2 * first and mel.shape[2] == info["mel_frames_out"]
    golden.check(STEM, "chunk_stream.mel", mel, t["chunk_stream.mel"])
    assert cache.frames == info["mu_frames"] and cache.memory_bytes() > 0


def test_cached_chunks_equal_the_recomputing_path(golden, flow):
    t = golden.tensors(STEM)
    p_tok, p_feat, emb = t["prompt_token"], t["prompt_feat"], t["embedding"]
    vocab = flow.config.vocab_size
    tokens = torch.randint(0, vocab, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    state = StreamState(StreamSchedule(), p_tok.shape[1])
    cache = FlowStreamCache(flow.config.n_timesteps)
    chunks = 0
    for tok in tokens:
        state.tokens.append(tok)
        chunk = state.next_chunk()
        if chunk is None:
            continue
        part = torch.tensor([state.tokens[: chunk.end]])
        with torch.inference_mode():
            want = flow.inference(part, p_tok, p_feat, emb, streaming=True, finalize=False)[:, :, 2 * chunk.offset:]
            got = flow.inference_chunk(part, p_tok, p_feat, emb, cache)
        assert got.shape == want.shape == (1, 80, 2 * chunk.hop)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
        chunks += 1
    assert chunks >= 3  # hops of 25 (+ prompt padding), 50 and 100 tokens: the cache is reused twice
    with pytest.raises(Exception, match="already reached"):
        flow.inference_chunk(torch.tensor([state.tokens[:10]]), p_tok, p_feat, emb, cache)

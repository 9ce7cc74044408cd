"""Flow (DiT + CFM) against upstream's golden fixtures, the full-size inventory, and properties.

Every config, input and tolerance comes from the fixture files (``flow_tiny_*``, tolerances.json).
"""

from __future__ import annotations

import random

import pytest
import torch

from cosytune.modeldir.upstream_yaml import flow_config
from cosytune.models.dit import apply_rotary, attention_mask
from cosytune.models.flow import FlowConfig, build_flow


@pytest.fixture(scope="module")
def model(golden):
    net = build_flow(golden.flow_config()).eval()
    sd = golden.tensors("flow_tiny_weights")
    net.load_state_dict(sd, strict=True)
    order = golden.meta("flow_tiny_weights").get("state_dict_keys_in_order")
    if order:
        assert list(net.state_dict()) == order
    return net


def test_estimator_outputs_and_intermediates(golden, model):
    est = golden.tensors("flow_tiny_estimator")
    d = model.decoder.estimator
    golden.check("flow_tiny_estimator", "rope_freqs_T120", d.rotary_embed(est["rope_freqs_T120"].shape[1]),
                 est["rope_freqs_T120"])
    for mode, streaming in (("full", False), ("stream", True)):
        inter: dict[str, torch.Tensor] = {}
        hooks = [
            d.time_embed.register_forward_hook(lambda m, i, o, inter=inter: inter.__setitem__("t_emb", o)),
            d.input_embed.register_forward_hook(lambda m, i, o, inter=inter: inter.__setitem__("input_embed_out", o)),
            d.norm_out.register_forward_hook(lambda m, i, o, inter=inter: inter.__setitem__("norm_out", o)),
        ]
        for j, blk in enumerate(d.transformer_blocks):
            hooks.append(blk.register_forward_hook(lambda m, i, o, j=j, inter=inter: inter.__setitem__(f"block{j}_out", o)))
        with torch.no_grad():
            out = d(est["x"], est["mask"], est["mu"], est["t"], est["spks"], est["cond"], streaming)
        for h in hooks:
            h.remove()
        golden.check("flow_tiny_estimator", f"out_{mode}", out, est[f"out_{mode}"])
        for key in [k for k in est if k.startswith(f"inter_{mode}.")]:
            golden.check("flow_tiny_estimator", key, inter[key.split(".", 1)[1]], est[key])
    x = est["b1.out_stream_t0d"]
    n = x.shape[2]
    with torch.no_grad():
        out = d(est["x"][:1, :, :n], est["mask"][:1, :, :n], est["mu"][:1, :, :n], torch.tensor(0.5),
                est["spks"][:1], est["cond"][:1, :, :n], True)
    golden.check("flow_tiny_estimator", "b1.out_stream_t0d", out, x)


def test_training_loss_replays_upstream_draws(golden, model):
    tr = golden.tensors("flow_tiny_train")
    runs = golden.json("flow_tiny_train")
    batch = {k: tr[k] for k in ("speech_token", "speech_token_len", "speech_feat", "speech_feat_len", "embedding")}
    for run, info in runs.items():
        train = info["module_mode"] == "train"
        model.train(train)
        hooks = []
        if train:  # replay the recorded dropout keep-masks in call order
            masks = iter(tr[f"{run}.dropout{j}.keep_mask"] for j in range(len(info["dropout_modules_in_call_order"])))
            p = model.config.dit.dropout
            for mod in (m for m in model.modules() if isinstance(m, torch.nn.Dropout)):
                hooks.append(mod.register_forward_hook(
                    lambda m, i, o, masks=masks, p=p: i[0] * next(masks).to(i[0].dtype) / (1 - p)))
        random.seed(info["seed_python_random"])
        torch.manual_seed(info["seed_torch"])
        rec: dict = {}
        try:
            with torch.no_grad():
                out = model(batch, random, record=rec)
        finally:
            for h in hooks:
                h.remove()
            model.eval()
        assert rec["streaming"] == info["streaming"]
        golden.check("flow_tiny_train", f"{run}.mu_pre_upsample", rec["mu_pre_upsample"], tr[f"{run}.mu_pre_upsample"])
        golden.check("flow_tiny_train", f"{run}.t", rec["t"], tr[f"{run}.t"])
        golden.check("flow_tiny_train", f"{run}.z", rec["z"], tr[f"{run}.z"])
        for k in ("x", "mu", "spks", "cond"):
            golden.check("flow_tiny_train", f"{run}.estimator_in.{k}", rec["y" if k == "x" else k],
                         tr[f"{run}.estimator_in.{k}"])
        golden.check("flow_tiny_train", f"{run}.pred", rec["pred"], tr[f"{run}.pred"])
        golden.check("flow_tiny_train", f"{run}.loss", out["loss"].reshape(1), tr[f"{run}.loss"])


def test_inference_runs(golden, model):
    inf = golden.tensors("flow_tiny_infer")
    runs = golden.json("flow_tiny_infer")
    noise = inf["rand_noise_prefix"]
    golden.check("flow_tiny_infer", "rand_noise_prefix",
                 model.decoder.fixed_noise(noise.shape[2], torch.device("cpu"), torch.float32), noise)
    mels = {}
    for run, info in runs.items():
        if not isinstance(info, dict):
            continue
        rec: dict = {}
        mel = model.inference(inf["token"], inf["prompt_token"], inf["prompt_feat"], inf["embedding"],
                              streaming=info["streaming"], finalize=info["finalize"],
                              n_timesteps=info["n_timesteps"], cfg_rate=info["cfg_rate"],
                              temperature=info["temperature"], record=rec)
        assert rec["mu"].shape[2] == info["mu_frames"] and mel.shape[2] == info["mel_frames_out"]
        golden.check("flow_tiny_infer", f"{run}.mu", rec["mu"], inf[f"{run}.mu"])
        golden.check("flow_tiny_infer", f"{run}.spks", rec["spks"], inf[f"{run}.spks"])
        golden.check("flow_tiny_infer", f"{run}.cond", rec["cond"], inf[f"{run}.cond"])
        golden.check("flow_tiny_infer", f"{run}.mel", mel, inf[f"{run}.mel"])
        if f"{run}.estimator_out_per_step" in inf:
            golden.check("flow_tiny_infer", f"{run}.estimator_out_per_step", torch.stack(rec["estimator_out"]),
                         inf[f"{run}.estimator_out_per_step"])
        mels[run] = mel
    # A non-final streaming chunk equals the prefix of the finalized streaming run (up to float rounding:
    # the two runs multiply matrices of different lengths, which BLAS may block differently).
    if "chunk_stream" in mels and "final_stream" in mels:
        n = mels["chunk_stream"].shape[2]
        golden.check("flow_tiny_infer", "final_stream.mel", mels["chunk_stream"], mels["final_stream"][:, :, :n])


def test_fullsize_keys_shapes_and_count(golden):
    inv = golden.json("fullsize_keys")["flow"]
    with torch.device("meta"):
        net = build_flow(FlowConfig.fun_cosyvoice3())
    sd = net.state_dict()
    expected = inv["state_dict"] if "state_dict" in inv else inv["keys"]
    shapes = {k: list(v["shape"]) if isinstance(v, dict) else list(v) for k, v in expected.items()}
    assert list(sd) == list(shapes), "key order differs from upstream flow.pt"
    assert {k: list(v.shape) for k, v in sd.items()} == shapes
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == inv["n_parameters_dedup"]


def test_rotary_touches_only_head0_channels():
    # CHECKPOINT-COMPAT: RoPE on the flattened q/k rotates the first dim_head channels only.
    x = torch.randn(1, 5, 32)
    freqs = torch.randn(1, 5, 8)
    out = apply_rotary(x, freqs)
    assert torch.equal(out[..., 8:], x[..., 8:]) and not torch.allclose(out[..., :8], x[..., :8])


def test_streaming_mask_is_block_causal():
    m = attention_mask(torch.ones(1, 1, 7), streaming=True, chunk=3)[0, 0]
    assert m[0].tolist() == [True] * 3 + [False] * 4 and m[3].tolist() == [True] * 6 + [False]
    assert m[6].all()


def test_config_errors_are_collected():
    from cosytune.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        flow_config({"bogus": 1, "decoder": {"estimator": {"dim": 64, "heads": 3, "dim_head": 16, "nope": 2}}})
    msg = str(e.value)
    assert "bogus" in msg and "nope" in msg


def test_training_dropout_draws_follow_upstream_rng_stream(golden, model):
    """Without replay hooks, our dropout consumes the global torch RNG exactly as upstream's did."""
    tr = golden.tensors("flow_tiny_train")
    runs = golden.json("flow_tiny_train")
    batch = {k: tr[k] for k in ("speech_token", "speech_token_len", "speech_feat", "speech_feat_len", "embedding")}
    train_runs = [r for r, info in runs.items() if info["module_mode"] == "train"]
    if not train_runs:
        pytest.skip("fixture has no train-mode run")
    for run in train_runs:
        info = runs[run]
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        hooks = [m.register_forward_hook(lambda m, i, o, seen=seen: seen.append((i[0].clone(), o.clone())))
                 for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        model.train()
        random.seed(info["seed_python_random"])
        torch.manual_seed(info["seed_torch"])
        try:
            with torch.no_grad():
                out = model(batch, random)
        finally:
            for h in hooks:
                h.remove()
            model.eval()
        assert len(seen) == len(info["dropout_modules_in_call_order"])
        for j, (inp, outp) in enumerate(seen):
            keep = tr[f"{run}.dropout{j}.keep_mask"].bool()
            nz = inp != 0
            assert torch.equal((outp != 0)[nz], keep[nz]), f"{run}: dropout {j} mask differs from upstream's draw"
        golden.check("flow_tiny_train", f"{run}.loss", out["loss"].reshape(1), tr[f"{run}.loss"])


def test_bad_inputs_give_clear_errors(golden, model):
    from cosytune.errors import DataError
    from cosytune.models.flow import NOISE_FRAMES

    with pytest.raises(DataError, match="at most"):
        model.decoder.fixed_noise(NOISE_FRAMES + 1, torch.device("cpu"), torch.float32)
    inf = golden.tensors("flow_tiny_infer")
    with pytest.raises(DataError, match="2 per token"):
        model.inference(inf["token"], inf["prompt_token"], inf["prompt_feat"][:, :-1], inf["embedding"])
    look = model.config.pre_lookahead_len
    with pytest.raises(DataError, match="non-final chunk"):
        model.inference(inf["token"][:, :look], inf["prompt_token"], inf["prompt_feat"], inf["embedding"],
                        streaming=True, finalize=False)
    tr = golden.tensors("flow_tiny_train")
    batch = {k: tr[k] for k in ("speech_token", "speech_token_len", "speech_feat", "speech_feat_len", "embedding")}
    batch["speech_feat"] = batch["speech_feat"][:, :-2]
    with pytest.raises(DataError, match="2 mel frames per token"):
        model(batch, random.Random(0))
    with pytest.raises(DataError, match="lacks"):
        model({"speech_token": tr["speech_token"]}, random.Random(0))

"""Inference speed of the CosyVoice 3 pipeline (issue 8, inference figures), eager vs fast paths.

Builds the three networks with random weights (speed does not depend on weight values) and times,
in one run:
  * LLM decode: ms/token at batch 1 and tokens/s at batch ``--llm_batch`` (fixed token count, greedy
    on the device, stop disabled), for each of ``--llm_modes`` (eager static step, CUDA graph);
  * flow: 10 Euler steps with CFG (cond+uncond rows in one DiT call), ms per second of audio for a
    ``--utt_s`` utterance with a 3 s prompt, for each of ``--flow_modes`` (eager fp32, eager at
    ``--dtype``, torch.compile at ``--dtype``), and the bf16-vs-fp32 mel error;
  * HiFT: ms per second of audio (eager, compiled);
  * end-to-end RTF for a ``--utt_s`` utterance (prefill + tokens + flow + HiFT chained on the models);
  * first streaming chunk (prefill + 28 tokens + non-final flow chunk + HiFT chunk);
  * offline throughput (x real time) for ``--offline_batch`` segments decoded, rendered and vocoded
    as one batch;
  * with ``--train_frames N``: LLM and flow SFT samples/s and MFU at that frame budget (bench_train.py).
Writes a JSON (``--out``) and prints a table.

GPU:        python benchmarks/bench_infer.py --preset full --device cuda --dtype bf16 --out bench_infer.json
GPU, compile comparison:  add --flow_modes fp32,eager,compile --hift_modes eager,compile \
            --compile_mode max-autotune-no-cudagraphs   (or reduce-overhead)
CPU (tiny): python benchmarks/bench_infer.py --preset tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from cosytune.fileio import write_json
from cosytune.infer.fast import (
    GraphedDecoder,
    GraphedFlowSampler,
    GraphedVocoder,
    autocast_ctx,
    batched_cfg_sample,
    compile_flow_estimator,
    compile_hift,
    fast_estimator,
)
from cosytune.modeldir.builders import build_network
from cosytune.modeldir.presets import preset_hparams

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKEN_RATE = 25  # speech tokens per second of audio
MEL_RATE = 50  # mel frames per second


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall seconds of ``fn`` over ``iters`` runs after ``warmup`` runs (device-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="LLM weights/cache dtype and DiT autocast dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--utt_s", type=float, default=10.0, help="seconds of audio per utterance")
    p.add_argument("--prompt_s", type=float, default=3.0, help="prompt speech seconds (tokens + mel)")
    p.add_argument("--prompt_text", type=int, default=25, help="text positions in the LLM prompt")
    p.add_argument("--llm_batch", type=int, default=32)
    p.add_argument("--offline_batch", default=None,
                   help="comma list of segments per offline batch (default 32,64,128 on cuda, 2 on cpu)")
    p.add_argument("--llm_modes", default=None,
                   help="comma list of eager,graph,compiled (compiled = torch.compile'd step in a CUDA graph; "
                        "default: all three on cuda); a ':KIND' suffix such as graph:matmul sets the cache "
                        "attention (sdpa, efficient, matmul, reduce)")
    p.add_argument("--llm_compile_mode", default="default", help="torch.compile mode of the compiled LLM step")
    p.add_argument("--flow_modes", default=None,
                   help="comma list of fp32,eager,compile,graph,fast (eager/compile/graph/fast use --dtype; graph = "
                        "the whole 10-step solve as one CUDA graph, over the compiled estimator when compile ran; "
                        "fast = graph over fast_estimator: a compiled DiT copy with --dtype parameters and GEMM "
                        "position convolutions)")
    p.add_argument("--hift_modes", default=None,
                   help="comma list of eager,compile,graph (graph = the whole call from a CUDA graph per shape)")
    p.add_argument("--compile_mode", default="default",
                   help="torch.compile mode for flow/HiFT (e.g. default, reduce-overhead, max-autotune-no-cudagraphs)")
    p.add_argument("--n_timesteps", type=int, default=10)
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (default 5 cuda, 2 cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here (atomic)")
    p.add_argument("--llm_only", action="store_true", help="measure the LLM decode modes only")
    p.add_argument("--train_frames", type=int, default=0,
                   help="also measure LLM and flow SFT samples/s and MFU (bench_train.py) at this frame budget "
                        "(e.g. 2000 = the recipe's, 32000 on an H200); 0 skips")
    p.add_argument("--train_compile", action="store_true", help="torch.compile the models in the SFT figures")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.offline_batch = [int(b) for b in str(args.offline_batch or ("32,64,128" if cuda else "2")).split(",")]
    args.iters = args.iters or (5 if cuda else 2)
    args.llm_modes = (args.llm_modes or ("eager,graph,compiled" if cuda else "eager")).split(",")
    args.flow_modes = (args.flow_modes or ("fp32,eager,compile,graph,fast" if cuda else "eager")).split(",")
    args.hift_modes = (args.hift_modes or ("eager,compile,graph" if cuda else "eager")).split(",")
    if not cuda:
        args.llm_batch = min(args.llm_batch, 4)
    return args


def build(args: argparse.Namespace, device: torch.device) -> tuple:
    hp = preset_hparams(args.preset)
    torch.manual_seed(args.seed)
    llm = build_network("llm", hp, device).eval()
    llm.to(DTYPES[args.dtype])
    flow = build_network("flow", hp, device=device).eval()
    hift = build_network("hift", hp, device=device).eval()
    for m in (llm, flow, hift):
        m.requires_grad_(False)
    return llm, flow, hift


def bench_llm(args, llm, device, results: dict) -> dict[str, GraphedDecoder]:
    """Decode ms/token (batch 1) and tokens/s (batch B); returns the batch-1 decoders per mode."""
    n_tok = int(args.utt_s * TOKEN_RATE)
    plen = 1 + args.prompt_text + 1 + int(args.prompt_s * TOKEN_RATE)
    d = llm.config.hidden_size
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    prompt = (0.02 * torch.randn(1, plen, d, generator=g)).to(device, dtype)
    decoders: dict[str, GraphedDecoder] = {}
    # "graph:matmul" etc.: the graphed step with that cache attention (see qwen2.CACHED_ATTENTION).
    for mode in args.llm_modes:
        base, _, attention = mode.partition(":")
        for b in sorted({1, args.llm_batch}):
            dec = GraphedDecoder(llm, b, plen + n_tok + 2, use_graph=(base != "eager"),
                                 compile_mode=args.llm_compile_mode if base == "compiled" else None,
                                 attention=attention or None)

            def run(dec=dec, b=b) -> None:
                dec.prefill([prompt] * b)
                for _ in range(n_tok):
                    dec.step_argmax()

            t_prefill = timeit(lambda dec=dec, b=b: dec.prefill([prompt] * b), device, 1, args.iters)
            t = timeit(run, device, 1, args.iters)
            per_tok = (t - t_prefill) / n_tok
            key = f"llm_{mode}_b{b}"
            results[key] = {"batch": b, "tokens": n_tok, "prompt_positions": plen,
                            "prefill_ms": 1e3 * t_prefill, "ms_per_token": 1e3 * per_tok,
                            "tokens_per_s": b / per_tok, "x_realtime": b / per_tok / TOKEN_RATE}
            if b == 1:
                decoders[mode] = dec
    ref = decoders.get("graph") or decoders.get("eager")
    if ref is not None and "compiled" in decoders:
        # The compiled step must give the reference step's logits. Teacher-forced: both decoders are fed
        # the reference's greedy ids, so one near-tie flipped by bf16 rounding cannot derail the rest.
        fast = decoders["compiled"]
        for d in (ref, fast):
            d.prefill([prompt])
        diffs, same, scale = [], 0, 0.0
        feed = ref.logp.argmax(-1)
        for _ in range(32):
            a, b_ = ref.step(feed).clone(), fast.step(feed).clone()
            top = a.argmax(-1)
            diffs.append(float((a - b_).abs().max()))
            same += int(torch.equal(top, b_.argmax(-1)))
            scale = max(scale, float(a.std()))
            feed = top
        results["llm_compiled_parity"] = {"max_abs_logp_diff": max(diffs), "logp_std": scale,
                                          "same_argmax_steps": f"{same}/32"}
    # The product's sampler (RAS, top-p 0.8 / top-k 25, host-side bookkeeping) per row and token.
    from cosytune.models.sampling import SamplingConfig, ras_sample, ras_sample_rows

    gen = torch.Generator(device=device).manual_seed(args.seed)
    logp_row = torch.log_softmax(torch.randn(llm.config.speech_vocab_size, device=device), dim=-1)
    history = list(range(10))
    t = timeit(lambda: ras_sample(logp_row, history, SamplingConfig(), generator=gen), device, 3, 50)
    results["ras_sample"] = {"us_per_row_token": 1e6 * t}
    rows = args.llm_batch
    logp_rows = torch.log_softmax(torch.randn(rows, llm.config.speech_vocab_size, device=device), dim=-1)
    gens = [torch.Generator(device=device).manual_seed(args.seed + i) for i in range(rows)]
    t = timeit(lambda: ras_sample_rows(logp_rows, [history] * rows, SamplingConfig(), generators=gens), device, 3, 20)
    results["ras_sample_rows"] = {"rows": rows, "us_per_row_token": 1e6 * t / rows}
    return decoders


def _flow_inputs(args, flow, device, batch: int) -> dict:
    cfg = flow.config
    n_tok, n_ptok = int(args.utt_s * TOKEN_RATE), int(args.prompt_s * TOKEN_RATE)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    return {
        "token": torch.randint(0, cfg.vocab_size, (1, n_tok), generator=g).to(device),
        "prompt_token": torch.randint(0, cfg.vocab_size, (1, n_ptok), generator=g).to(device),
        "prompt_feat": torch.randn(1, 2 * n_ptok, cfg.output_size, generator=g).to(device),
        "embedding": torch.randn(1, cfg.spk_embed_dim, generator=g).to(device),
        "T": 2 * (n_tok + n_ptok),
        "mu_b": torch.randn(batch, cfg.output_size, 2 * (n_tok + n_ptok), generator=g).to(device),
        "spks_b": torch.randn(batch, cfg.output_size, generator=g).to(device),
    }


def flow_call(flow, inp, args, dtype, *, token=None, streaming=False, finalize=True, sampler=None):
    with autocast_ctx(inp["token"].device, dtype):
        return flow.inference(inp["token"] if token is None else token, inp["prompt_token"], inp["prompt_feat"],
                              inp["embedding"], streaming=streaming, finalize=finalize, n_timesteps=args.n_timesteps,
                              sampler=sampler)


def bench_flow(args, flow, device, results: dict) -> tuple[str, GraphedFlowSampler | None]:
    """Flow ms per audio second per mode; returns the fastest mode name (and its graphed sampler)."""
    inp = _flow_inputs(args, flow, device, 1)
    ref = None
    best, best_t = "fp32", float("inf")
    graphed: GraphedFlowSampler | None = None
    for mode in args.flow_modes:
        dtype = None if mode == "fp32" else DTYPES[args.dtype]
        original = flow.decoder.estimator
        if mode == "compile" and not getattr(flow, "_bench_compiled", False):
            compile_flow_estimator(flow, args.compile_mode, force=True)
            flow._bench_compiled = True
        sampler = None
        if mode == "graph":
            graphed = sampler = GraphedFlowSampler(flow.decoder, autocast_dtype=dtype)
        elif mode == "fast":
            plain = getattr(original, "_orig_mod", original)
            est = fast_estimator(plain, param_dtype=dtype, compile_mode=args.compile_mode)
            sampler = GraphedFlowSampler(flow.decoder, autocast_dtype=dtype, estimator=est)
        t0 = time.perf_counter()
        try:
            mel = flow_call(flow, inp, args, dtype, sampler=sampler).clone()
        except Exception as exc:  # noqa: BLE001 -- a failed compile must not sink the other figures
            flow.decoder.estimator = original
            if mode in ("graph", "fast"):
                graphed = None
            results[f"flow_{mode}"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            continue
        _sync(device)
        first_call_s = time.perf_counter() - t0
        t = timeit(lambda dtype=dtype, sampler=sampler: flow_call(flow, inp, args, dtype, sampler=sampler), device, 1,
                   args.iters)
        entry = {"ms_per_audio_s": 1e3 * t / args.utt_s, "ms_per_utterance": 1e3 * t, "dtype": str(dtype or "fp32"),
                 "dit_frames": inp["T"], "first_call_s": first_call_s}
        if mode == "fp32":
            ref = mel.float()
        elif ref is not None:
            err = (mel.float() - ref).abs()
            entry.update(max_abs_err_vs_fp32=float(err.max()), mean_abs_err_vs_fp32=float(err.mean()),
                         rel_rms_err_vs_fp32=float(err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()))
        results[f"flow_{mode}"] = entry
        if t < best_t:
            best, best_t = mode, t
            graphed = sampler
    return best, (graphed if best in ("graph", "fast") else None)


def bench_hift(args, hift, device, results: dict) -> tuple[str, Callable]:
    """HiFT ms per audio second per mode; returns the fastest mode and its ``vocode(mel, finalize)``.

    Modes: eager, compile (``hift.decode`` compiled), graph (the whole call replayed from a CUDA graph
    per shape, over the compiled decode when compile ran first).
    """
    frames = int(args.utt_s * MEL_RATE)
    mel = torch.randn(1, hift.config.in_channels, frames, device=device)
    best, best_t, best_fn = "eager", float("inf"), hift.inference
    for mode in args.hift_modes:
        if mode == "compile" and not getattr(hift, "_bench_compiled", False):
            compile_hift(hift, args.compile_mode, force=True)
            hift._bench_compiled = True
        fn = GraphedVocoder(hift) if mode == "graph" else hift.inference  # same call signature
        t0 = time.perf_counter()
        try:
            fn(mel)
        except Exception as exc:  # noqa: BLE001 -- fall back to eager for the pipeline figures
            if mode == "compile" and "decode" in vars(hift):
                del hift.decode
            results[f"hift_{mode}"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            continue
        _sync(device)
        first = time.perf_counter() - t0
        t = timeit(lambda fn=fn: fn(mel), device, 1, args.iters)
        results[f"hift_{mode}"] = {"ms_per_audio_s": 1e3 * t / args.utt_s, "mel_frames": frames, "first_call_s": first}
        if t < best_t:
            best, best_t, best_fn = mode, t, fn
    return best, best_fn


@torch.inference_mode()
def bench_pipeline(args, llm, flow, vocode: Callable, dec: GraphedDecoder, flow_dtype, device, results: dict,
                   sampler: GraphedFlowSampler | None = None) -> None:
    n_tok, plen = int(args.utt_s * TOKEN_RATE), dec.cache.capacity - int(args.utt_s * TOKEN_RATE) - 2
    d = llm.config.hidden_size
    prompt = (0.02 * torch.randn(1, plen, d)).to(device, DTYPES[args.dtype])
    inp = _flow_inputs(args, flow, device, 1)
    vocab = flow.config.vocab_size

    def chained(n: int, stages: dict, *, streaming: bool) -> None:
        """Prefill, n greedy tokens, flow, HiFT; records each stage's wall ms (device-synchronised)."""
        marks = [time.perf_counter()]
        dec.prefill([prompt])
        _sync(device)
        marks.append(time.perf_counter())
        toks = [dec.step_argmax().clone() for _ in range(n)]
        token = torch.stack(toks, dim=1) % vocab  # random weights: fold stop ids into the vocabulary
        _sync(device)
        marks.append(time.perf_counter())
        mel = flow_call(flow, inp, args, flow_dtype, token=token, streaming=streaming, finalize=not streaming,
                        sampler=sampler)
        _sync(device)
        marks.append(time.perf_counter())
        vocode(mel, finalize=not streaming)
        _sync(device)
        marks.append(time.perf_counter())
        stages.update({f"{k}_ms": 1e3 * (marks[i + 1] - marks[i])
                       for i, k in enumerate(("prefill", "tokens", "flow", "hift"))})

    stages: dict[str, float] = {}
    t = timeit(lambda: chained(n_tok, stages, streaming=False), device, 1, args.iters)
    results["e2e"] = {"audio_s": args.utt_s, "wall_ms": 1e3 * t, "rtf": t / args.utt_s, **stages}

    first_tok = 25 + flow.config.pre_lookahead_len
    stages = {}
    t = timeit(lambda: chained(first_tok, stages, streaming=True), device, 1, args.iters)
    results["first_chunk"] = {"tokens": first_tok, "latency_ms": 1e3 * t, **stages}

    # Offline: one LLM batch, one batched CFG flow call, one batched HiFT call, per batch size.
    dec_flow = flow.decoder
    n_prompt_frames = 2 * int(args.prompt_s * TOKEN_RATE)
    results["offline"] = {}
    for b in args.offline_batch:
        inp_b = _flow_inputs(args, flow, device, b)
        bdec = GraphedDecoder(llm, b, dec.cache.capacity, use_graph=dec.use_graph,
                              compile_mode=args.llm_compile_mode if dec.compiled else None)
        T = inp_b["T"]
        t_span = dec_flow.time_grid(args.n_timesteps, torch.float32, device)
        noise = dec_flow.fixed_noise(T, device, torch.float32).expand(b, -1, -1)
        mask = torch.ones(b, 1, T, device=device)
        cond = torch.zeros(b, flow.config.output_size, T, device=device)
        cond[:, :, :n_prompt_frames] = 0.5
        stages: dict[str, float] = {}

        def offline(b=b, bdec=bdec, inp_b=inp_b, mask=mask, cond=cond, noise=noise, t_span=t_span,
                    stages=stages) -> None:
            marks = [time.perf_counter()]
            bdec.prefill([prompt] * b)
            for _ in range(n_tok):
                bdec.step_argmax()
            _sync(device)
            marks.append(time.perf_counter())
            if sampler is not None:
                mel = sampler(inp_b["mu_b"], mask, inp_b["spks_b"], cond, n_timesteps=args.n_timesteps)
            else:
                mel = batched_cfg_sample(dec_flow.estimator, inp_b["mu_b"], mask, inp_b["spks_b"], cond, noise,
                                         t_span, flow.config.inference_cfg_rate, autocast_dtype=flow_dtype)
            _sync(device)
            marks.append(time.perf_counter())
            vocode(mel[:, :, n_prompt_frames:])
            _sync(device)
            marks.append(time.perf_counter())
            stages.update(llm_ms=1e3 * (marks[1] - marks[0]), flow_ms=1e3 * (marks[2] - marks[1]),
                          hift_ms=1e3 * (marks[3] - marks[2]))

        try:
            t = timeit(offline, device, 1, max(1, args.iters // 2))
        except torch.OutOfMemoryError as exc:
            results["offline"][f"b{b}"] = {"error": f"out of memory: {exc}"[:500]}
            break
        results["offline"][f"b{b}"] = {"segments": b, "audio_s": b * args.utt_s, "wall_ms": 1e3 * t,
                                       "x_realtime": b * args.utt_s / t, **stages}
        del bdec
        if device.type == "cuda":
            torch.cuda.empty_cache()


def table(results: dict) -> str:
    rows = []
    flat: list[tuple[str, dict]] = []
    for key, val in results.items():
        if isinstance(val, dict) and key in ("offline", "train"):
            flat += [(f"{key}_{k}", v) for k, v in val.items() if isinstance(v, dict)]
        elif isinstance(val, dict):
            flat.append((key, val))
    for key, val in flat:
        for metric in ("ms_per_token", "tokens_per_s", "ms_per_audio_s", "rtf", "latency_ms", "x_realtime",
                       "rel_rms_err_vs_fp32", "max_abs_logp_diff", "us_per_row_token", "prefill_ms", "tokens_ms", "llm_ms", "flow_ms",
                       "hift_ms", "samples_per_s", "mfu", "error"):
            if metric in val:
                v = val[metric]
                rows.append(f"| {key} | {metric} | {v:.4g} |" if isinstance(v, (int, float)) else
                            f"| {key} | {metric} | {str(v)[:120]} |")
    return "\n".join(["| stage | metric | value |", "|---|---|---|", *rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()
    llm, flow, hift = build(args, device)
    results: dict = {"config": {k: v for k, v in vars(args).items()},
                     "torch": torch.__version__,
                     "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    sections: dict[str, float] = {}
    t0 = time.perf_counter()
    decoders = bench_llm(args, llm, device, results)
    sections["llm"] = time.perf_counter() - t0
    if args.llm_only:
        return finish(args, results, sections, t_start)
    best_flow, sampler = bench_flow(args, flow, device, results)
    sections["flow"] = time.perf_counter() - t0 - sum(sections.values())
    hift_path, vocode = bench_hift(args, hift, device, results)
    sections["hift"] = time.perf_counter() - t0 - sum(sections.values())
    dec = decoders.get("compiled") or decoders.get("graph") or decoders[args.llm_modes[-1]]
    flow_dtype = None if best_flow == "fp32" else DTYPES[args.dtype]
    results["pipeline_paths"] = {"llm": "compiled" if dec.compiled else "graph" if dec.use_graph else "eager",
                                 "flow": best_flow,
                                 "hift": hift_path}
    bench_pipeline(args, llm, flow, vocode, dec, flow_dtype, device, results, sampler)
    sections["pipeline"] = time.perf_counter() - t0 - sum(sections.values())
    if args.train_frames:
        import bench_train

        argv = ["--model", "both", "--preset", args.preset, "--device", args.device, "--max_frames",
                str(args.train_frames), "--steps", "5" if device.type == "cuda" else "2", "--warmup", "2"]
        results["train"] = {r["model"]: r for r in bench_train.main(argv + (["--compile"] if args.train_compile else []))}
        sections["train"] = time.perf_counter() - t0 - sum(sections.values())
    return finish(args, results, sections, t_start)


def finish(args: argparse.Namespace, results: dict, sections: dict[str, float], t_start: float) -> int:
    results["section_wall_s"] = sections
    results["wall_s"] = time.perf_counter() - t_start
    print(table(results))
    print(json.dumps(results, indent=1, default=str))
    if args.out:
        write_json(args.out, json.loads(json.dumps(results, default=str)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where the GPU time of one decode step, one streaming flow chunk and one HiFT chunk goes (issue 8).

For each part it reports the wall time per call, the number of GPU kernels per call, the summed kernel
time per call (what the GPU computes; wall minus that is launch and dependency latency) and the
kernels that take the most time, from ``torch.profiler``. Decode variants compare ``torch.compile``
settings of the batch-1 step (all replayed from a CUDA graph):

  default        the product's compiled step (``GraphedDecoder(compile_mode="default")``)
  autotune       ``max-autotune-no-cudagraphs`` (Triton GEMM templates with fused epilogues)
  cdt            default + inductor coordinate-descent tuning of the kernels' launch parameters
  graph          the uncompiled step in a graph (no fusion)

The compiled variants run the cache attention as fused reductions (``step_logp(attention="reduce")``;
session 3 measured default 1.30 -> 1.24 ms/token with it, autotune 1.31).

Flow variants (a streaming first chunk, compiled DiT, whole solve replayed from a graph):

  base           fp32 parameters under bf16 autocast (the cast of every weight is re-run each step)
  bf16w          a copy of the DiT with bf16 parameters (fp32 buffers), same autocast
  bf16w_gemm     + the position convolutions as one batched GEMM at this size (``fast_estimator``'s default)
  bf16w_bench    + cudnn.benchmark for the grouped convolutions instead
(each variant is a compiled ``fast_estimator`` copy of the DiT.)

GPU: python benchmarks/profile_infer.py --device cuda --out profile.json
CPU (tiny, plumbing only): python benchmarks/profile_infer.py --preset tiny --device cpu --variants graph
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_infer import DTYPES, TOKEN_RATE, _flow_inputs, _sync, build, flow_call

from cosytune.fileio import write_json
from cosytune.infer.fast import GraphedDecoder, GraphedFlowSampler, GraphedVocoder, fast_estimator


def kernel_profile(fn, device: torch.device, calls: int, top: int = 12) -> dict:
    """Wall ms per call, kernels per call, summed kernel ms per call and the top kernels (by time)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    wall = (time.perf_counter() - t0) / calls
    out = {"wall_ms": 1e3 * wall}
    if device.type != "cuda":
        return out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    per_name: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.name and not ev.name.startswith("Memcpy") \
                and ev.device_time > 0:
            per_name[ev.name].append(ev.device_time)
    n = sum(len(v) for v in per_name.values())
    busy = sum(sum(v) for v in per_name.values())
    ranked = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    out.update(kernels_per_call=n / calls, kernel_ms_per_call=busy / 1e3 / calls,
               top=[{"kernel": k[:110], "per_call": len(v) / calls, "us_per_call": sum(v) / calls,
                     "us_each": sum(v) / len(v)} for k, v in ranked])
    return out


def decode_variant(args, llm, device, name: str, prompt: torch.Tensor, capacity: int) -> dict:
    import torch._inductor.config as ic

    torch._dynamo.reset()
    saved = {"coordinate_descent_tuning": ic.coordinate_descent_tuning}
    mode = {"default": "default", "cdt": "default", "autotune": "max-autotune-no-cudagraphs", "graph": None}[name]
    if name == "cdt":
        ic.coordinate_descent_tuning = True
    try:
        t0 = time.perf_counter()
        dec = GraphedDecoder(llm, 1, capacity, compile_mode=mode)
        dec.prefill([prompt])
        dec.step_argmax()
        _sync(device)
        build_s = time.perf_counter() - t0
        n = int(args.utt_s * TOKEN_RATE)

        def tokens() -> None:
            dec.prefill([prompt])
            for _ in range(n):
                dec.step_argmax()

        res = kernel_profile(tokens, device, 3)
        res = {"ms_per_token": res["wall_ms"] / n, "build_s": build_s,
               **{k: (v / n if k in ("kernels_per_call", "kernel_ms_per_call") else v)
                  for k, v in res.items() if k != "wall_ms"}}
        res["note"] = "kernels_per_call / kernel_ms_per_call are per token (prefill included, amortised)"
        return res
    except Exception as exc:  # noqa: BLE001 -- one failed variant must not sink the others
        return {"error": f"{type(exc).__name__}: {exc}"[:1500]}
    finally:
        ic.coordinate_descent_tuning = saved["coordinate_descent_tuning"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("tiny", "full"), default="full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--variants", default="default,autotune,cdt", help="decode variants (see above); '' skips")
    p.add_argument("--flow_variants", default="base,bf16w,bf16w_gemm,bf16w_bench", help="flow variants (see above)")
    p.add_argument("--parts", default="decode,flow,hift")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    args = argparse.Namespace(preset=a.preset, dtype=a.dtype, seed=0, utt_s=10.0, prompt_s=3.0, prompt_text=25,
                              n_timesteps=10)
    device = torch.device(a.device)
    llm, flow, hift = build(args, device)
    parts = set(a.parts.split(","))
    results: dict = {"torch": torch.__version__,
                     "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    dtype = DTYPES[a.dtype]
    if "decode" in parts:
        plen = 1 + args.prompt_text + 1 + int(args.prompt_s * TOKEN_RATE)
        prompt = (0.02 * torch.randn(1, plen, llm.config.hidden_size)).to(device, dtype)
        for name in filter(None, a.variants.split(",")):
            results[f"decode_{name}"] = r = decode_variant(args, llm, device, name, prompt,
                                                           plen + int(args.utt_s * TOKEN_RATE) + 2)
            print(name, json.dumps(r, indent=1)[:3000], flush=True)
    if "flow" in parts:
        inp = _flow_inputs(args, flow, device, 1)
        look = flow.config.pre_lookahead_len
        token = inp["token"][:, :25 + look]
        eager = kernel_profile(lambda: flow_call(flow, inp, args, dtype, token=token, streaming=True, finalize=False),
                               device, 2)
        results["flow_chunk_eager"] = eager
        original = flow.decoder.estimator
        ref = None
        for name in filter(None, a.flow_variants.split(",")):
            torch._dynamo.reset()
            torch.backends.cudnn.benchmark = name.endswith("bench")
            try:
                t0 = time.perf_counter()
                est = fast_estimator(original, param_dtype=dtype if name.startswith("bf16w") else None,
                                     gemm_conv=name.endswith("gemm"), compile_mode="default")
                sampler = GraphedFlowSampler(flow.decoder, autocast_dtype=dtype, estimator=est)
                mel = flow_call(flow, inp, args, dtype, token=token, streaming=True, finalize=False,
                                sampler=sampler).clone()
                build_s = time.perf_counter() - t0
                r = kernel_profile(lambda s=sampler: flow_call(flow, inp, args, dtype, token=token, streaming=True,
                                                               finalize=False, sampler=s), device, 5)
                r["build_s"] = build_s
                ref = mel if ref is None else ref
                r["max_abs_diff_vs_first_variant"] = float((mel - ref).abs().max())
            except Exception as exc:  # noqa: BLE001
                r = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
            finally:
                torch.backends.cudnn.benchmark = False
            results[f"flow_chunk_{name}"] = r
            print(name, json.dumps(r, indent=1)[:3000], flush=True)
        mu = flow.sampler_inputs(token, inp["prompt_token"], inp["prompt_feat"],
                                                      inp["embedding"], finalize=False)
        results["flow_chunk_inputs"] = kernel_profile(
            lambda: flow.sampler_inputs(token, inp["prompt_token"], inp["prompt_feat"], inp["embedding"],
                                        finalize=False), device, 5)
        results["flow_chunk_frames"] = int(mu[0].shape[2])
    if "hift" in parts:
        mel = torch.randn(1, hift.config.in_channels, 2 * 25 + hift.config.chunk_trim_frames, device=device)
        results["hift_chunk_eager"] = kernel_profile(lambda: hift.inference(mel, finalize=False), device, 5)
        voc = GraphedVocoder(hift)
        results["hift_chunk_graph"] = kernel_profile(lambda: voc(mel, finalize=False), device, 5)
        ref = hift.inference(mel, finalize=False).wav
        results["hift_chunk_graph"]["max_abs_diff_vs_eager"] = float((voc(mel, finalize=False).wav - ref).abs().max())
        mel10 = torch.randn(1, hift.config.in_channels, int(args.utt_s * 50), device=device)
        results["hift_10s_eager"] = kernel_profile(lambda: hift.inference(mel10), device, 3)
        results["hift_10s_graph"] = kernel_profile(lambda: voc(mel10), device, 3)
    print(json.dumps(results, indent=1))
    if a.out:
        write_json(a.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

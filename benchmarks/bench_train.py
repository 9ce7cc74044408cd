"""SFT training throughput of the CosyVoice 3 LLM and flow (issue 6 / issue 8 training figures).

Builds the full-size (or ``--preset tiny``) architecture with random weights — speed does not depend
on the weight values — and times optimiser steps on synthetic batches shaped like the recipe's:
utterances of ``--utt_s`` seconds packed under the dynamic frame budget (``--max_frames``, recipe
2000 mel frames at 50 Hz), bf16 autocast, Adam (fused on CUDA), grad clip 5. Reports samples/s,
audio-seconds/s, tokens or frames/s, model-FLOPs utilisation (6 × parameters × tokens or frames per
step against ``--peak_tflops``) and peak memory, as a table and JSON.

Single GPU:   python benchmarks/bench_train.py --model llm --device cuda
Two GPUs:     torchrun --nproc_per_node=2 benchmarks/bench_train.py --model llm --device cuda
CPU (tiny):   python benchmarks/bench_train.py --preset tiny --device cpu --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import time

import torch

from cosytune.fileio import write_json
from cosytune.modeldir.builders import build_network
from cosytune.modeldir.presets import preset_hparams
from cosytune.ranks import Ranks, leave_process_group
from cosytune.train.build import STEP_FUNCTIONS
from cosytune.train.distributed import init_distributed, pick_device


def synthetic_batch(kind: str, batch: int, utt_s: float, text_per_s: float, gen: torch.Generator) -> dict:
    n_tok = int(utt_s * 25)
    n_text = max(1, int(utt_s * text_per_s))
    out = {
        "text_token": torch.randint(0, 151643, (batch, n_text), generator=gen),
        "text_token_len": torch.full((batch,), n_text, dtype=torch.int32),
        "instruct_token": torch.randint(0, 151643, (batch, 8), generator=gen),
        "instruct_token_len": torch.full((batch,), 8, dtype=torch.int32),
        "speech_token": torch.randint(0, 6561, (batch, n_tok), generator=gen),
        "speech_token_len": torch.full((batch,), n_tok, dtype=torch.int32),
    }
    if kind == "flow":
        out["speech_feat"] = torch.randn(batch, 2 * n_tok, 80, generator=gen)
        out["speech_feat_len"] = torch.full((batch,), 2 * n_tok, dtype=torch.int32)
        out["embedding"] = torch.randn(batch, 192, generator=gen)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns one result dict per model (also printed, and written with --json)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llm", "flow", "both"], default="both")
    ap.add_argument("--preset", choices=["full", "tiny"], default="full")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max_frames", type=int, default=2000, help="frame budget per batch (recipe: 2000)")
    ap.add_argument("--utt_s", type=float, default=5.0, help="seconds per synthetic utterance")
    ap.add_argument("--text_per_s", type=float, default=4.0, help="text tokens per second of speech")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    ap.add_argument("--peak_tflops", type=float, default=790.0, help="bf16 dense peak for MFU (H200 ~790)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)

    dist = Ranks.from_env()
    device = pick_device(dist, args.device)
    init_distributed(dist, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    hp = preset_hparams(args.preset)
    results = []
    kinds = ["llm", "flow"] if args.model == "both" else [args.model]
    for kind in kinds:
        torch.manual_seed(0)
        random.seed(0)
        model = build_network(kind, hp, device=device)
        model.train()
        n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        fwd = model
        if dist.distributed:
            kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
            fwd = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, **kw)
        if args.compile:
            fwd = torch.compile(fwd)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        frames_per_utt = int(args.utt_s * 50)
        batch_size = max(1, args.max_frames // frames_per_utt)
        gen = torch.Generator().manual_seed(dist.rank)
        step_fn = STEP_FUNCTIONS[kind]
        ac = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16"
              else contextlib.nullcontext())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(args.warmup + args.steps):
            batch = {k: v.to(device, non_blocking=True) for k, v in
                     synthetic_batch(kind, batch_size, args.utt_s, args.text_per_s, gen).items()}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with ac:
                out = step_fn(fwd, batch)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        step_s = sum(times) / len(times)
        world = dist.world_size
        samples_s = batch_size * world / step_s
        units = int(args.utt_s * (25 if kind == "llm" else 50))  # LLM: speech tokens; flow: mel frames
        text_units = int(args.utt_s * args.text_per_s) + 8 + 2 if kind == "llm" else 0
        flops = 6 * n_params * (units + text_units) * batch_size  # per rank per step
        mfu = flops / step_s / (args.peak_tflops * 1e12) if device.type == "cuda" else None
        # Embedding tables are looked up, not multiplied: MFU over the parameters that do matmuls too.
        n_lookup = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
        mfu_mm = mfu * (n_params - n_lookup) / n_params if mfu is not None else None
        res = {
            "model": kind, "preset": args.preset, "device": str(device), "world_size": world,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "params": n_params, "batch_per_rank": batch_size, "utt_s": args.utt_s, "max_frames": args.max_frames,
            "step_ms": round(step_s * 1000, 2), "samples_per_s": round(samples_s, 2),
            "audio_s_per_s": round(samples_s * args.utt_s, 1),
            "mfu": round(mfu, 4) if mfu is not None else None,
            "mfu_matmul_params": round(mfu_mm, 4) if mfu_mm is not None else None, "embedding_params": n_lookup,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
            "amp": args.amp, "compile": args.compile,
        }
        results.append(res)
        del model, fwd, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if dist.is_main:
        print(f"{'model':5} {'world':>5} {'batch':>5} {'step ms':>9} {'samples/s':>10} {'audio s/s':>10} "
              f"{'MFU':>6} {'mem GB':>7}")
        for r in results:
            print(f"{r['model']:5} {r['world_size']:>5} {r['batch_per_rank']:>5} {r['step_ms']:>9} "
                  f"{r['samples_per_s']:>10} {r['audio_s_per_s']:>10} {r['mfu']!s:>6} {r['peak_mem_gb']!s:>7}")
        if args.json:
            write_json(args.json, results)
    leave_process_group()
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""Serve a model dir over HTTP: an OpenAI-compatible speech API with streaming, and the listening lab.

The model is loaded once; requests run on --workers threads with a bounded --max_queue (one more gets
429 + Retry-After). Checkpoint variants of --run_dir (epoch_N, llm_avg) and the base model's files
(base) are loaded on first use when a request names them. The page at /lab compares takes side by side,
runs blind A/B rounds (ratings in <run dir>/lab/ratings.jsonl) and, with --data_dir, edits review.tsv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cosytune.cli.common import flag, print_summary

EPILOG = """examples:
  cosytune serve --model_dir models/alice
  cosytune serve --model_dir models/alice --run_dir work --data_dir work/data/transcribed
  cosytune serve --model_dir models/alice --host 0.0.0.0 --api_key "$KEY"
  curl -s localhost:8000/v1/audio/speech -H 'Content-Type: application/json' \\
       -d '{"model": "cosytune", "input": "Hello there.", "voice": "alice", "response_format": "wav"}' -o hello.wav
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    """Add serve's arguments."""
    flag(p, "model_dir", type=Path, required=True, metavar="DIR", help="the model dir to serve (loaded once)")
    flag(p, "host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    flag(p, "port", type=int, default=8000, help="port (default %(default)s)")
    flag(p, "run_dir", type=Path, default=None, metavar="DIR",
         help="training run dir (exp/llm) or work dir: its checkpoints become variants; the lab's ratings go "
              "to DIR/lab (default: MODEL_DIR/lab)")
    flag(p, "data_dir", type=Path, default=None, metavar="DIR",
         help="a 'cosytune transcribe' out dir: enables the lab's dataset page (review.tsv)")
    flag(p, "device", default="auto", help="cpu, cuda, cuda:N or auto (default %(default)s)")
    flag(p, "dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
         help="LLM/flow dtype (default auto: bfloat16 on a GPU that supports it, else float32; float32 is the "
              "parity mode)")
    flag(p, "api_key", default=None, help="require 'Authorization: Bearer KEY' on the API")
    flag(p, "insecure", action="store_true", help="allow a non-loopback --host without --api_key")
    flag(p, "cors_origin", action="append", default=[], metavar="ORIGIN",
         help="allow browser pages of ORIGIN to call the API (repeatable; CORS is off by default)")
    flag(p, "workers", type=int, default=None, help="requests synthesised at once (default: 16 on a GPU, where "
         "their LLM steps are batched together; 1 on the CPU)")
    flag(p, "max_queue", type=int, default=8, help="requests waiting for a worker before 429 (default %(default)s)")
    flag(p, "request_timeout", type=float, default=300.0, metavar="S", help="stop a request after S seconds")
    flag(p, "max_text_chars", type=int, default=2000, help="longest text per request (default %(default)s)")
    flag(p, "max_body_bytes", type=int, default=4 << 20,
         help="largest request body, prompt clips included (default %(default)s)")
    flag(p, "variant_cache", type=int, default=2, help="checkpoint variants kept loaded (default %(default)s)")
    flag(p, "cache_mb", type=int, default=None,
         help="weight memory for cached variants in MiB (default: half the free memory at start)")
    flag(p, "no_fast_decode", action="store_true", help="use the reference LLM decoder")
    flag(p, "fast_decode", action="store_true", help="pooled static LLM decoders on CPU too (default: CUDA only)")
    flag(p, "no_fast_flow", action="store_true", help="CUDA only: run the flow's solves eagerly instead of "
         "replaying CUDA graphs (the default on a GPU)")
    flag(p, "fast_flow", action="store_true", help=argparse.SUPPRESS)  # the default since issue 14
    flag(p, "no_batch_decode", action="store_true", help="CUDA only: decode each request on its own decoder "
         "instead of batching concurrent requests' LLM steps together (exact per-seed repeatability under load; "
         "less throughput)")
    flag(p, "no_warmup", action="store_true", help="skip the warm-up at start (on a GPU: capturing the graphs of "
         "every common request shape, ~25 s on an H100; the first requests then capture their own)")


def run(args: argparse.Namespace) -> int:
    """Run the server until interrupted; returns the exit code."""
    from cosytune.serve.server import ServeSettings, run_server

    settings = ServeSettings(
        model_dir=args.model_dir, host=args.host, port=args.port, run_dir=args.run_dir, data_dir=args.data_dir,
        device=args.device, dtype=args.dtype, api_key=args.api_key, insecure=args.insecure,
        cors_origins=tuple(args.cors_origin), workers=args.workers, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout, max_text_chars=args.max_text_chars,
        max_body_bytes=args.max_body_bytes, variant_cache=args.variant_cache, cache_mb=args.cache_mb,
        fast_decode=False if args.no_fast_decode else (True if args.fast_decode else None),
        fast_flow=False if args.no_fast_flow else None, batch_decode=False if args.no_batch_decode else None,
        warmup=not args.no_warmup)
    print_summary("serve", run_server(settings))
    return 0

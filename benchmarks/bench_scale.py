"""Multi-GPU scaling (issue 18): SFT samples/s and infer-batch throughput at 1..N ranks, as users run them.

SFT: for each rank count, ``torchrun --standalone --nproc_per_node=N`` runs this file as a worker that
trains through the real loop (``cosytune.train.loop.train``: our DDP settings, data loader, accumulation,
clipping, checkpoints) on a synthetic data set shaped like a speaker set (``--minutes`` of ``--utt_s``
utterances, random tokens and mels; the ``--preset`` architecture with random weights: speed does not
depend on the values). Epoch 0 warms up; samples/s is the utterances of the later epochs over their
training time, the data loader's share of step time comes from the loop's own measurement.

infer-batch: for each rank count, ``torchrun --standalone --nproc_per_node=N -m cosytune infer-batch``
speaks ``--segments`` lines; throughput is segments over the synthesis time rank 0 records in run.json
(every rank's share, load excluded), and over the whole command's wall time.

Speed-ups are against the 1-rank row of the same run. JSON out (``--json``) and a table.

Multi-GPU box:  python benchmarks/bench_scale.py --ranks 1,2,4,8 --device cuda --model_dir /models/full \\
                    --json scale.json          (``--model_dir``: a model dir with an SFT speaker for infer)
CPU smoke:      python benchmarks/bench_scale.py --ranks 1,2 --preset tiny --device cpu --minutes 0.5 \\
                    --segments 4 --json /tmp/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cosytune.fileio import write_json

HERE = Path(__file__).resolve()
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "tired", "owls",
         "sing", "softly", "in", "dark", "wood", "and", "every", "morning", "small", "bird", "wakes", "town"]


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


# ---------------------------------------------------------------- SFT worker (one rank)
def sft_worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE.parent))
    from bench_train import synthetic_batch

    from cosytune.modeldir.builders import build_network
    from cosytune.modeldir.presets import preset_hparams
    from cosytune.ranks import Ranks, leave_process_group
    from cosytune.train.build import STEP_FUNCTIONS
    from cosytune.train.config import load_train_config
    from cosytune.train.distributed import init_distributed, pick_device
    from cosytune.train.loop import BatchSource, train

    dist = Ranks.from_env()
    device = pick_device(dist, args.device)
    init_distributed(dist, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    frames_per_utt = int(args.utt_s * 50)
    per_batch = max(1, args.max_frames // frames_per_utt)
    n_utts = max(per_batch * dist.world_size, int(args.minutes * 60 / args.utt_s))

    class Synthetic(BatchSource):
        """``n_utts`` utterances of ``utt_s`` seconds, packed ``per_batch`` to a batch under the frame budget."""

        def epoch_batches(self, epoch: int, rank: int, world_size: int) -> list[list[int]]:
            order = list(range(n_utts))
            random.Random(epoch).shuffle(order)
            batches = [order[i:i + per_batch] for i in range(0, n_utts - per_batch + 1, per_batch)]
            per_rank = len(batches) // world_size
            return batches[rank::world_size][:per_rank]

        def collate(self, indices: list[int]) -> dict:
            gen = torch.Generator().manual_seed(indices[0])
            return synthetic_batch(args.model, len(indices), args.utt_s, args.text_per_s, gen)

    cfg = load_train_config(args.model, overrides=[
        f"max_epoch={args.epochs}", "tensorboard=false", "early_stop_patience=0", "keep_best=1",
        f"accum_grad={args.accum_grad}", f"data.max_frames_in_batch={args.max_frames}",
        f"data.num_workers={args.num_workers}", f"amp={'bf16' if device.type == 'cuda' else 'none'}",
        f"compile={str(args.compile).lower()}", f"ddp.bucket_cap_mb={args.bucket_cap_mb}",
        f"ddp.grad_compression={args.grad_compression}", "log_interval=1000000"])
    model = build_network(args.model, preset_hparams(args.preset), device=device)
    with tempfile.TemporaryDirectory(dir=args.work) as run_dir:
        res = train(cfg, model, STEP_FUNCTIONS[args.model], Synthetic(), None, Path(run_dir), device, dist,
                    resume=None)
    timed = res.state.history[1:] or res.state.history
    utts, secs = sum(h["utts"] for h in timed), sum(h["train_seconds"] for h in timed)
    if dist.is_main:
        write_json(args.worker_json, {
            "model": args.model, "ranks": dist.world_size, "preset": args.preset,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "frames_per_gpu": args.max_frames, "batch_per_gpu": per_batch, "accum_grad": args.accum_grad,
            "utts_per_epoch": n_utts, "timed_epochs": len(timed), "samples_per_s": round(utts / secs, 3),
            "data_wait": round(sum(h["data_wait"] for h in timed) / len(timed), 4),
            "grad_compression": args.grad_compression, "bucket_cap_mb": args.bucket_cap_mb, "compile": args.compile,
        })
    leave_process_group()


# ---------------------------------------------------------------- driver
def _tiny_speaker_dir(root: Path) -> Path:
    """A tiny random-weight model dir with the SFT speaker ``bench`` (for the CPU smoke run)."""
    from cosytune.cli.main import main as cli
    from cosytune.modeldir.presets import write_model_dir

    d = write_model_dir(root / "tiny", "tiny", seed=0)
    spk = root / "spk2embedding.pt"
    torch.save({"bench": torch.randn(192, generator=torch.Generator().manual_seed(3)).tolist()}, spk)
    assert cli(["spk2info", "--spk2embedding_pt", str(spk), "--spk_id", "bench",
                "--out_spk2info_pt", str(d / "spk2info.pt")]) == 0
    return d


def _segments(n: int) -> list[str]:
    rng = random.Random(18)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24))).capitalize() + "." for _ in range(n)]


def _run(cmd: list[str], what: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2", help="rank counts to run, e.g. 1,2,4,8")
    ap.add_argument("--what", default="sft,infer", help="sft, infer or both (comma-separated)")
    ap.add_argument("--device", default="auto")
    # SFT
    ap.add_argument("--model", choices=["llm", "flow", "both"], default="both")
    ap.add_argument("--preset", choices=["full", "tiny"], default="full")
    ap.add_argument("--minutes", type=float, default=30.0, help="minutes of synthetic speech (presets: 10-60)")
    ap.add_argument("--utt_s", type=float, default=5.0)
    ap.add_argument("--text_per_s", type=float, default=4.0)
    ap.add_argument("--max_frames", type=int, default=2000, help="frame budget per GPU (recipe 2000)")
    ap.add_argument("--accum_grad", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="epoch 0 warms up; the others are timed")
    ap.add_argument("--num_workers", type=int, default=0)
    ap.add_argument("--bucket_cap_mb", type=float, default=25.0)
    ap.add_argument("--grad_compression", choices=["none", "bf16"], default="none")
    ap.add_argument("--compile", action="store_true")
    # infer-batch
    ap.add_argument("--model_dir", type=Path, default=None, help="model dir with an SFT speaker (default: a tiny one)")
    ap.add_argument("--spk_id", default=None, help="speaker of --model_dir (default: its first)")
    ap.add_argument("--segments", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--infer_args", default="", help="more infer-batch flags, e.g. '--dtype bfloat16'")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--work", default=None, help="scratch dir (run dirs, outputs); default: a temp dir")
    ap.add_argument("--worker", choices=["sft"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker_json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "sft":
        sft_worker(args)
        return {}

    ranks = [int(x) for x in args.ranks.split(",")]
    what = set(args.what.split(","))
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        out: dict = {"ranks": ranks, "device": args.device, "sft": [], "infer": []}
        if "sft" in what:
            for kind in (["llm", "flow"] if args.model == "both" else [args.model]):
                for n in ranks:
                    wj = work / f"sft_{kind}_{n}.json"
                    cmd = [*_torchrun(n), str(HERE), "--worker", "sft", "--worker_json", str(wj), "--model", kind,
                           "--work", str(work)]
                    for flag in ("device", "preset", "minutes", "utt_s", "text_per_s", "max_frames", "accum_grad",
                                 "epochs", "num_workers", "bucket_cap_mb", "grad_compression"):
                        cmd += [f"--{flag}", str(getattr(args, flag))]
                    cmd += ["--compile"] if args.compile else []
                    wall = _run(cmd, f"SFT {kind} on {n} rank(s)")
                    row = {**json.loads(wj.read_text()), "wall_s": round(wall, 1)}
                    base = next((r for r in out["sft"] if r["model"] == kind and r["ranks"] == ranks[0]), row)
                    row["speedup"] = round(row["samples_per_s"] / base["samples_per_s"] * ranks[0], 3)
                    out["sft"].append(row)
                    print(f"sft {kind} ranks {n}: {row['samples_per_s']} samples/s ({row['speedup']}x), "
                          f"data loader {100 * row['data_wait']:.1f}% of step time", flush=True)
        if "infer" in what:
            model_dir = args.model_dir or _tiny_speaker_dir(work)
            spk = args.spk_id
            if spk is None:
                from cosytune.modeldir.model_dir import ModelDir

                spk = next(iter(ModelDir.open(model_dir).load_spk2info()))
            lines = work / "segments.txt"
            lines.write_text("\n".join(_segments(args.segments)) + "\n", encoding="utf-8")
            for n in ranks:
                od = work / f"infer_{n}"
                cmd = [*_torchrun(n), "-m", "cosytune", "infer-batch", "--model_dir", str(model_dir), "--spk_id", spk,
                       "--input", str(lines), "--out_dir", str(od), "--seed", "1", "--batch_size", str(args.batch_size),
                       "--device", args.device, "--no_progress", *args.infer_args.split()]
                wall = _run(cmd, f"infer-batch on {n} rank(s)")
                info = json.loads((od / "run.json").read_text(encoding="utf-8"))
                t = info["timings"]
                row = {"ranks": n, "segments": args.segments, "batch_size": args.batch_size,
                       "synthesis_s": round(t["total_s"], 2), "wall_s": round(wall, 2), "audio_s": round(t["audio_s"], 1),
                       "segments_per_s": round(args.segments / t["total_s"], 3),
                       "segments_per_s_wall": round(args.segments / wall, 3),
                       "device": info.get("environment", {}).get("device")}
                base = out["infer"][0] if out["infer"] else row
                row["speedup"] = round(row["segments_per_s"] / base["segments_per_s"] * ranks[0], 3)
                row["speedup_wall"] = round(row["segments_per_s_wall"] / base["segments_per_s_wall"] * ranks[0], 3)
                out["infer"].append(row)
                print(f"infer-batch ranks {n}: {row['segments_per_s']} segments/s ({row['speedup']}x; wall "
                      f"{row['speedup_wall']}x)", flush=True)
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

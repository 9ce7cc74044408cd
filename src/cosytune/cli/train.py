"""Speaker SFT of the CosyVoice 3 LLM or flow, in one process or under torchrun (DDP).

Accepts the seed workflow's / upstream recipe's flags. Settings come from the shipped preset
(train_llm.yaml / train_flow.yaml), then --config (our YAML or an upstream recipe yaml, from which
only train_conf is read), then key=value overrides (e.g. optim.lr=2e-5 max_epoch=20). The resolved
config is saved as config.yaml in the run dir (--model_dir). Only rank 0 writes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cosytune.cli.common import flag, print_summary

logger = logging.getLogger(__name__)

EPILOG = """examples:
  cosytune train --model llm --train_data data/train/parquet/data.list --cv_data data/dev/parquet/data.list \\
      --base_model_dir pretrained/Fun-CosyVoice3-0.5B --model_dir exp/llm max_epoch=20
  torchrun --nproc_per_node=2 -m cosytune train --model llm ... --ddp.dist_backend nccl
  cosytune train --model llm ... --resume auto     # continue an interrupted run (the default)
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    flag(p, "model", choices=["llm", "flow"], required=True, help="which network to train")
    flag(p, "config", type=Path, default=None, help="training YAML (ours, or an upstream recipe's train_conf)")
    flag(p, "train_data", required=True, type=Path, help="data.list of the training shards")
    flag(p, "cv_data", type=Path, default=None, help="data.list of the CV shards (recommended)")
    flag(p, "base_model_dir", "--base_model", type=Path, default=None,
         help="base model dir (default: the dir of --onnx_path/--checkpoint holding cosyvoice3.yaml)")
    flag(p, "qwen_pretrain_path", type=Path, default=None, help="CosyVoice-BlankEN dir (default: the base dir's)")
    flag(p, "onnx_path", type=Path, default=None,
         help="dir with campplus.onnx and speech_tokenizer_v3.onnx for online features (when shards lack them)")
    flag(p, "checkpoint", type=Path, default=None, help="initial weights (default: the base dir's llm.pt/flow.pt)")
    flag(p, "from_scratch", action="store_true", help="start from random weights instead (not for SFT)")
    flag(p, "model_dir", "--run_dir", required=True, type=Path, help="output dir for checkpoints and logs")
    flag(p, "tensorboard_dir", type=Path, default=None, help="TensorBoard dir (default: MODEL_DIR/tensorboard)")
    from cosytune.cli.config_flags import add_config_flags
    from cosytune.train.config import TrainConfig

    add_config_flags(p, TrainConfig, ["data.num_workers", "data.prefetch", "data.pin_memory", "seed"])
    flag(p, "use_amp", action="store_true", help="mixed precision (bf16 where supported; the default on GPUs)")
    flag(p, "no_amp", action="store_true", help="train in fp32 (amp=none)")
    flag(p, "train_engine", choices=["torch_ddp", "deepspeed"], default="torch_ddp",
         help="only torch_ddp (default: %(default)s)")
    flag(p, "dist_backend", "--ddp.dist_backend", choices=["nccl", "gloo"], default=None,
         help="DDP backend (default: nccl on GPUs, gloo on CPU)")
    flag(p, "resume", default="auto", help="auto (newest checkpoint in --model_dir), a checkpoint path, or none "
         "(default: %(default)s)")
    flag(p, "device", choices=["auto", "cuda", "cpu"], default="auto", help="where training runs (default: %(default)s)")
    flag(p, "onnx_device", choices=["auto", "cuda", "cpu"], default="auto",
         help="onnxruntime device of the online feature extractors (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. max_epoch=20 optim.lr=2e-5")


def run(args: argparse.Namespace) -> int:

    from cosytune.cli.config_flags import config_overrides
    from cosytune.config.loading import dump_config
    from cosytune.errors import UsageError
    from cosytune.text.tokenizer import load_tokenizer
    from cosytune.train import build
    from cosytune.train.config import TrainConfig, load_train_config
    from cosytune.train.data import SFTDataset
    from cosytune.train.distributed import DistInfo, cleanup_distributed, init_distributed, pick_device
    from cosytune.train.loop import train

    if args.train_engine != "torch_ddp":
        raise UsageError("--train_engine deepspeed is not supported (upstream's DeepSpeed path silently "
                         "switches to AdamW lr 1e-3); use torch_ddp, the default")
    overrides = config_overrides(args, TrainConfig)
    if args.no_amp:
        overrides["amp"] = "none"
    cfg = load_train_config(args.model, args.config, overrides)

    dist = DistInfo.from_env()
    device = pick_device(dist, args.device)
    init_distributed(dist, device, args.dist_backend)
    try:
        base = build.find_base_model_dir(args.base_model_dir, args.onnx_path, args.checkpoint,
                                         args.qwen_pretrain_path)
        tokenizer = load_tokenizer(args.qwen_pretrain_path or base / "CosyVoice-BlankEN")
        model = build.build_model(args.model, base, args.checkpoint, args.from_scratch)
        tok_x = emb_x = None
        if args.onnx_path is not None:
            tok_x, emb_x = build.online_extractors(args.onnx_path if args.onnx_path.is_dir() else base,
                                                   args.onnx_device)
        train_set = SFTDataset(args.train_data, tokenizer, args.model, cfg.data, cfg.seed, tok_x, emb_x)
        cv_set = (SFTDataset(args.cv_data, tokenizer, args.model, cfg.data, cfg.seed, tok_x, emb_x)
                  if args.cv_data else None)
        if cv_set is None:
            logger.warning("no --cv_data: no CV loss, so no early stopping and --val_best averaging cannot rank")
        if dist.is_main:
            args.model_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, args.model_dir / "config.yaml")
        logger.info("training %s on %s: %d train / %d cv utterances, world size %d, amp %s",
                    args.model, device, len(train_set), len(cv_set) if cv_set else 0, dist.world_size, cfg.amp)
        resume = None if str(args.resume).lower() in ("none", "no", "false") else args.resume
        res = train(cfg, model, build.STEP_FUNCTIONS[args.model], train_set, cv_set, args.model_dir, device, dist,
                    resume=resume, extra_info={"base_model_dir": str(base)},
                    tensorboard_dir=args.tensorboard_dir)
    finally:
        cleanup_distributed()
    if dist.is_main:
        st = res.state
        print_summary(f"train {args.model}", [
            ("run dir", res.run_dir),
            ("epochs done", st.epoch),
            ("optimizer steps", st.step),
            ("best CV loss", f"{st.best_cv_loss:.4f} ({st.best_name})" if st.best_name else "n/a"),
            ("stopped early", st.stopped_early),
            ("checkpoints", ", ".join(c.name for c in res.checkpoints[-5:]) or "none"),
            ("time", f"{res.seconds:.1f}s"),
            ("next", f"cosytune average --src_path {res.run_dir} --dst_model {res.run_dir}/{args.model}_avg.pt"),
        ])
    return 0

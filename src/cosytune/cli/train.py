"""Speaker SFT of the CosyVoice 3 LLM or flow, in one process or under torchrun (DDP).

Accepts the seed workflow's / upstream recipe's flags. Settings come from the shipped preset
(train_llm.yaml / train_flow.yaml), then --config (our YAML or an upstream recipe yaml, from which
only train_conf is read), then key=value overrides (e.g. optim.lr=2e-5 max_epoch=20). The resolved
config is saved as train_config.yaml in the run dir (--model_dir). Only rank 0 writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cosytune.cli.common import add_settings_args, flag

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
    add_settings_args(p, "max_epoch=20 optim.lr=2e-5")


def run(args: argparse.Namespace) -> int:
    from cosytune.cli.config_flags import config_overrides
    from cosytune.train.api import TrainRequest, run_training
    from cosytune.train.config import TrainConfig

    run_training(TrainRequest(
        model=args.model, train_data=args.train_data, run_dir=args.model_dir, cv_data=args.cv_data,
        config=args.config, overrides=config_overrides(args, TrainConfig), base_model_dir=args.base_model_dir,
        qwen_pretrain_path=args.qwen_pretrain_path, onnx_path=args.onnx_path, checkpoint=args.checkpoint,
        from_scratch=args.from_scratch, tensorboard_dir=args.tensorboard_dir, no_amp=args.no_amp,
        device=args.device, onnx_device=args.onnx_device, dist_backend=args.dist_backend,
        train_engine=args.train_engine, resume=args.resume,
    ))
    return 0

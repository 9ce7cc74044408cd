"""Parquet shards for training (upstream CosyVoice format) plus data.list, utt2data.list, spk2data.list.

Columns: utt, audio_data (raw file bytes), wav, text, spk, and when present utt_embedding,
spk_embedding (float32 arrays), speech_token, instruct — what upstream's training reads, so the shards
also train in upstream CosyVoice. Any id mismatch between wav.scp, text, utt2spk, instruct and the
embedding/token files is an error listing the offending ids; utterances rejected by an earlier stage are
left out. Unchanged shards are kept on re-runs.
"""

from __future__ import annotations

import argparse

from cosytune.cli.common import flag

EPILOG = """examples:
  cosytune make-parquet --src_dir data/train --des_dir data/train/parquet
  cosytune make-parquet --src_dir data/train --des_dir data/train/parquet --num_utts_per_parquet 500 --num_processes 4"""


def build_parser(parser: argparse.ArgumentParser) -> None:
    flag(parser, "src_dir", "dir", required=True, help="Kaldi-style data dir (wav.scp, text, utt2spk, ...)")
    flag(parser, "des_dir", "out_dir", required=True, help="output dir for the shards and lists")
    flag(parser, "num_utts_per_parquet", type=int, default=1000, help="rows per shard (default: %(default)s)")
    flag(parser, "num_processes", type=int, default=1, help="worker processes (default: %(default)s)")
    flag(parser, "dpo", action="store_true",
         help="add reject_speech_token from SRC_DIR_reject/utt2speech_token.pt (DPO training)")
    flag(parser, "force", action="store_true", help="rewrite every shard even if unchanged")
    flag(parser, "rejects", default=None, help="rejects.jsonl (default SRC_DIR/rejects.jsonl)")


def run(args: argparse.Namespace) -> int:
    from cosytune.steps import run_make_parquet

    run_make_parquet(args.src_dir, args.des_dir, num_utts_per_parquet=args.num_utts_per_parquet,
                     num_processes=args.num_processes, dpo=args.dpo, force=args.force, rejects_path=args.rejects,
                     show_progress=not args.no_progress)
    return 0

"""Write speaker entries into spk2info.pt (the seed workflow's §9).

SFT entries come from spk2embedding.pt (the speaker-mean CAM++ embedding, as upstream's
inference_sft expects: {spk: {"embedding": (1, 192)}}). Existing entries of other speakers in the
output file are kept; the file is replaced atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cosytune.cli.common import flag, print_summary

EPILOG = """example:
  cosytune spk2info --spk2embedding_pt data/train/spk2embedding.pt --spk_id alice \\
      --out_spk2info_pt models/alice/spk2info.pt
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    flag(p, "spk2embedding_pt", required=True, type=Path, help="spk2embedding.pt from extract-embedding")
    flag(p, "spk_id", action="append", default=None,
         help="speaker id to write (repeatable; default: every speaker in the file)")
    flag(p, "out_spk2info_pt", "--out", required=True, type=Path, help="spk2info.pt to create or update")
    flag(p, "as_id", default=None, help="store a single --spk_id under this name instead")


def run(args: argparse.Namespace) -> int:
    from cosytune.errors import UsageError
    from cosytune.package import load_spk2embedding, save_spk2info, spk2info_from_embeddings

    entries = spk2info_from_embeddings(load_spk2embedding(args.spk2embedding_pt), args.spk_id)
    if args.as_id:
        if len(entries) != 1:
            raise UsageError("--as_id renames exactly one speaker; give exactly one --spk_id")
        entries = {args.as_id: next(iter(entries.values()))}
    table = save_spk2info(args.out_spk2info_pt, entries)
    print_summary("spk2info", [
        ("file", args.out_spk2info_pt),
        ("written", ", ".join(entries)),
        ("embedding dim", next(iter(entries.values()))["embedding"].shape[-1]),
        ("speakers in file", len(table)),
    ])
    return 0

"""Rebuild train/dev from an edited review.tsv, without running ASR again.

Edit the 'text' column of <dir>/review.tsv to fix transcripts and put x in its 'delete' column
to drop rows; rows rejected for a missing transcript come back once you type their text.
This command re-applies the filters, re-splits train/dev (same seed) and rewrites
metadata.jsonl, train/, dev/, review.tsv and the transcribe rows of rejects.jsonl.
"""

from __future__ import annotations

import argparse

from cosytune.cli.common import add_settings_args, flag, print_summary

EPILOG = """examples:
  cosytune apply-review --dir dataset
  cosytune apply-review --dir dataset --review_file ~/edited_review.tsv dev_size=3 max_cps=35
"""


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add apply-review's arguments."""
    flag(
        parser,
        "dir",
        "--out_dir",
        "--out_root",
        required=True,
        metavar="DIR",
        help="the --out_dir of a finished 'cosytune transcribe' run",
    )
    flag(
        parser, "review_file", metavar="TSV", default=None, help="edited review file (default DIR/review.tsv)"
    )
    add_settings_args(parser, "dev_size=3 max_cps=35", what="changes to the saved settings")


def run(args: argparse.Namespace) -> int:
    """Run apply-review; returns the exit code."""
    from cosytune.data.transcribe import apply_review

    summary = apply_review(args.dir, args.overrides or None, args.review_file)
    print_summary("apply-review", summary.items())
    return 0

"""Report on a dataset: minutes total and usable, counts, duration histogram, chars/s, rejects.

DIR is the out_dir of 'cosytune transcribe' (or a single Kaldi data dir such as DIR/train).
Prints the report and writes dataset_report.txt, dataset_report.json and dataset_report.png
(into DIR, or --out_dir).
"""

from __future__ import annotations

import argparse

from cosytune.cli.common import flag

EPILOG = """examples:
  cosytune dataset-report dataset
  cosytune dataset-report dataset/train --out_dir reports/
"""


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add dataset-report's arguments."""
    parser.add_argument(
        "dir", nargs="?", default=None, metavar="DIR", help="transcribe out_dir or Kaldi data dir"
    )
    flag(
        parser,
        "dir_flag",
        "--dir",
        "--out_root",
        dest="dir_flag",
        default=None,
        metavar="DIR",
        help="the same as DIR, as a flag",
    )
    flag(parser, "out_dir", default=None, metavar="DIR", help="where to write the report files (default DIR)")


def run(args: argparse.Namespace) -> int:
    """Run dataset-report; returns the exit code."""
    from cosytune.data.report import format_report, write_report
    from cosytune.errors import UsageError

    directory = args.dir or args.dir_flag
    if directory is None:
        raise UsageError("give the dataset directory: cosytune dataset-report DIR")
    rep, paths = write_report(directory, args.out_dir)
    print(format_report(rep))
    print(f"  written        {paths['txt']}, {paths['json']}, {paths['png']}")
    return 0

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
    flag(parser, "qa", choices=["auto", "on", "off"], default="auto",
         help="per-clip DNSMOS and speaker consistency (Resemblyzer), outliers flagged in review.tsv; auto: when "
              "the eval extra is installed (default %(default)s)")
    flag(parser, "device", choices=["cpu", "cuda"], default="cpu", help="device of the QA models")


def run(args: argparse.Namespace) -> int:
    """Run dataset-report; returns the exit code."""
    from cosytune.data.report import format_report, write_report
    from cosytune.errors import UsageError

    directory = args.dir or args.dir_flag
    if directory is None:
        raise UsageError("give the dataset directory: cosytune dataset-report DIR")
    qa, note = None, ""
    if args.qa != "off":
        from cosytune.evaluation.models import available

        missing = available()
        if missing and args.qa == "on":
            raise UsageError(f"--qa on needs the evaluation models: {missing}")
        if missing:
            note = f"skipped: {missing}"
        else:
            from cosytune.evaluation.qa import dataset_qa

            qa = dataset_qa(directory, device=args.device, progress=not args.no_progress)
    rep, paths = write_report(directory, args.out_dir, qa=qa, qa_note=note)
    print(format_report(rep))
    print(f"  written        {paths['txt']}, {paths['json']}, {paths['png']}")
    return 0

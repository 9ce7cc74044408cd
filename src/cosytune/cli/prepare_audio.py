"""Convert a folder of recordings into 24 kHz mono 16-bit wavs ready for transcription.

Reads every file under --in_dir (recursively; mp3, wav, flac, m4a/aac, ogg/opus, the audio of
video files, anything ffmpeg decodes, no ffmpeg install needed), trims silence at both ends like
sox 'silence 1 0.15 -35d reverse silence 1 0.15 -35d reverse' (a clip > 1.5 s that would end
< 1.5 s stays untrimmed), slices recordings longer than 30 s at pauses, optionally normalises
loudness, and writes <utt>.wav files plus prepared.jsonl and rejects.jsonl to --out_dir.

Unusable inputs (corrupt, empty, silent, too short, heavily clipped, not audio) are recorded in
rejects.jsonl with a reason. Re-running skips inputs whose size, mtime and settings are
unchanged, so an interrupted run continues where it stopped.

Settings come from defaults < --config YAML < key=value overrides < explicit flags.
Exit code 0 unless no usable audio remains.
"""

from __future__ import annotations

import argparse
import logging

from cosytune.cli.common import add_in_out_dirs, add_settings_args

logger = logging.getLogger(__name__)

EPILOG = """examples:
  cosytune prepare-audio --in_dir "/data/my voice" --out_dir wavs
  # seed flag name for the output folder, louder clips, 8 workers
  cosytune prepare-audio --input raw --wav_dir wavs --loudness_target_lufs -20 --num_workers 8
  # settings as key=value (any PrepareAudioConfig key)
  cosytune prepare-audio --in_dir raw --out_dir wavs trim_threshold_db=-40 max_duration_s=20
"""

def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add prepare-audio's arguments."""
    io = parser.add_argument_group("input and output")
    add_in_out_dirs(io, ("--src_dir", "--input"), "folder of recordings (searched recursively)",
                    ("--wav_dir", "--output"),
                    "where to write the wavs, prepared.jsonl and rejects.jsonl (the seed's --wav_dir)")
    add_settings_args(io, "trim=false slice_target_s=10", config_of="PrepareAudioConfig")
    from cosytune.cli.config_flags import add_config_flags
    from cosytune.data.prepare_audio import PrepareAudioConfig

    g = parser.add_argument_group("settings (override the config)")
    add_config_flags(g, PrepareAudioConfig, negations={"slice_long": ["no_slice"]})


def run(args: argparse.Namespace) -> int:
    """Run prepare-audio and print its summary."""
    from cosytune.cli.config_flags import config_from_args
    from cosytune.data.prepare_audio import PrepareAudioConfig
    from cosytune.steps import run_prepare_audio

    cfg = config_from_args(PrepareAudioConfig, args)
    logger.debug("prepare-audio config: %s", cfg)
    run_prepare_audio(args.in_dir, args.out_dir, cfg, show_progress=not args.no_progress)
    return 0

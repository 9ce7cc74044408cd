"""Synthesise one segment of speech from a model dir (SFT speaker, zero-shot prompt, instruct2, cross-lingual).

The text is never split: one run, one segment, one output file (splitting makes the voice and emotion
drift between pieces; use `cosytune infer-batch` for many segments). The mode is inferred when
--mode is omitted: --prompt_wav with --prompt_text → zero_shot, --prompt_wav alone → cross_lingual,
--spk_id → sft (or zero_shot for a speaker stored from a prompt). CosyVoice 3 needs <|endofprompt|>
before the text; without --prompt_text the training instruct
'You are a helpful assistant.<|endofprompt|>' is used. run.json (settings, model file hashes, seed,
timings, which LLM decoder ran) is written beside the audio; with --text the text itself is not stored.
On a GPU the defaults are the fast path: bfloat16 (--dtype float32 is the parity mode), the LLM decoded with a
preallocated KV cache and a CUDA-graph step (same tokens as the reference decoder; --no_fast_decode forces
the reference one), the flow solve and streamed vocoder chunks replayed from CUDA graphs, each captured at
its first use (--warmup captures every common shape at load, as infer-batch and serve do). On the CPU
everything runs eagerly in float32.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from cosytune.cli.common import flag

logger = logging.getLogger(__name__)

EPILOG = """examples:
  # fine-tuned speaker (SFT entry of spk2info.pt)
  cosytune infer --model_dir models/alice --spk_id alice --text "Hello there." --out_dir out/hello
  # the same with an epoch checkpoint of the LLM and the base flow, exact output path, fixed seed
  cosytune infer --model_dir models/alice --spk_id alice --llm_ckpt exp/llm/epoch_5_whole.pt \\
      --flow_ckpt base/flow.pt --text_file line.txt --out_wav out/line.wav --seed 42
  # zero-shot from a prompt clip and its transcript
  cosytune infer --model_dir base --prompt_wav ref.wav \\
      --prompt_text "You are a helpful assistant.<|endofprompt|>Transcript of ref.wav." \\
      --text "Text to speak." --out_dir out/zs
  # instruct2 (instruction + prompt clip), streaming pieces as they are produced
  cosytune infer --model_dir base --mode instruct2 --prompt_wav ref.wav \\
      --prompt_text "Please speak as fast as possible.<|endofprompt|>" --text "..." --stream --out_dir out/i2
"""


def add_synthesis_flags(p: argparse.ArgumentParser, *, batch: bool = False) -> None:
    """Flags shared by ``infer`` and ``infer-batch`` (model, voice, sampling, text front end)."""
    flag(p, "model_dir", required=True, type=Path, help="model dir (upstream layout, e.g. from 'cosytune assemble')")
    flag(p, "llm_ckpt", type=Path, default=None, help="load this LLM weight file instead of the dir's llm.pt "
         "(epoch_N_whole.pt, averaged file)")
    flag(p, "flow_ckpt", type=Path, default=None, help="load this flow weight file instead of the dir's flow.pt "
         "(e.g. the base flow.pt: 'tuned LLM + base flow')")
    flag(p, "mode", choices=["sft", "zero_shot", "instruct2", "cross_lingual"], default=None,
         help="inference mode (default: inferred from --spk_id / --prompt_wav / --prompt_text)")
    flag(p, "spk_id", default=None, help="speaker id in the model dir's spk2info.pt")
    flag(p, "prompt_wav", type=Path, default=None, help="prompt clip (3-10 s) for zero_shot / instruct2 / "
         "cross_lingual")
    flag(p, "prompt_text", default=None, help="text before the target text in the LLM input, with <|endofprompt|>: "
         "'<instruction><|endofprompt|><transcript of --prompt_wav>' (zero_shot) or '<instruction><|endofprompt|>'")
    from cosytune.cli.config_flags import add_config_flags
    from cosytune.infer.synthesizer import SynthesisOptions
    from cosytune.models.sampling import SamplingConfig

    add_config_flags(p, SynthesisOptions, skip=("sampling",), class_defaults=True)
    add_config_flags(p, SamplingConfig, default_note="the model yaml's; {default} in Fun-CosyVoice3-0.5B")
    flag(p, "device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    flag(p, "dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
         help="LLM and flow precision; the vocoder always runs in float32. auto: bfloat16 on a GPU that supports "
         "it (about 2x faster than float32), float32 on the CPU. float32 is the parity mode: what upstream's "
         "runs and the golden tests compare with (default: %(default)s)")
    flag(p, "upstream_noise", action="store_true", help="use the vocoder noise upstream CosyVoice draws "
         "(bit-exact parity with upstream; ~260 MB more memory, 300 s cap)")
    flag(p, "no_fast_decode", action="store_true", help="decode the LLM with the reference decoder (a KV cache "
         "allocated per request) instead of the default fast one (preallocated cache, decode step replayed as a "
         "CUDA graph; on by default on CUDA only). Same tokens either way; run.json's request.llm_decoder says "
         "which ran")
    flag(p, "compile_decode", action="store_true", help="CUDA only: torch.compile the fast LLM decoder's step "
         "before capturing it (about 1.9x faster per token on an H100: ~1.7 vs ~3.3 ms). Compiling costs tens of "
         "seconds per decoder size, paid at load by the warm-up (over two minutes for its four sizes on an H100), "
         "so it pays off only when one process synthesises many segments (a server, infer-batch on a long list)")
    flag(p, "no_fast_flow", action="store_true", help="CUDA only: run the flow's CFG solve eagerly instead of "
         "replaying it from a CUDA graph per 1.28 s length bucket (the default; same mel up to float rounding)")
    flag(p, "fast_flow", action="store_true", help=argparse.SUPPRESS)  # the default since issue 14; kept for old scripts
    flag(p, "no_fast_vocoder", action="store_true", help="CUDA only: vocode streamed chunks eagerly instead of "
         "replaying them from CUDA graphs per chunk shape (the default; the same samples)")
    flag(p, "stream_cache", action="store_true", help="with --stream: each chunk's flow solve computes only its "
         "own frames, keeping the earlier chunks' DiT keys/values (same audio up to float rounding) instead of "
         "re-solving the whole prefix; holds ~90 MB of GPU memory per second of speech while a stream runs; its "
         "solves run eagerly, so on a GPU it is slower than the default graphed re-solve at usual lengths")
    if batch:
        flag(p, "no_warmup", action="store_true", help="CUDA only: skip the warm-up at load, which captures the "
             "CUDA graphs of the common request shapes once (LLM decoders of 512-4096 positions, flow solves up to "
             "20 s): about 25 s at load on an H100 (55 graphs) and a few GB of GPU memory. Without it the first "
             "segment of each shape pays its capture instead (0.1-1 s each)")
    else:
        flag(p, "warmup", action="store_true", help="CUDA only: capture the CUDA graphs of every common request "
             "shape at load (about 25 s on an H100, 55 graphs). Off for a single request, which captures only "
             "the shapes it uses (0.1-1 s each); infer-batch and cosytune serve warm up by default")


def build_parser(p: argparse.ArgumentParser) -> None:
    add_synthesis_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", default=None, help="the text to speak (not stored in run.json)")
    src.add_argument("--text_file", "--text-file", dest="text_file", type=Path, default=None,
                     help="UTF-8 file holding the text to speak (the whole file is one segment)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out_dir", "--out-dir", dest="out_dir", type=Path, default=None,
                     help="write chunk_0000.wav and run.json here")
    out.add_argument("--out_wav", "--out-wav", dest="out_wav", type=Path, default=None,
                     help="write exactly this wav; run.json goes to its folder")
    flag(p, "stream", action="store_true", help="stream: also write piece_NNNN.wav as chunks are produced")


def sampling_from_args(args: argparse.Namespace, default: Any) -> Any:
    """The model's SamplingConfig with the CLI overrides applied."""
    import dataclasses

    from cosytune.cli.config_flags import config_flag_values
    from cosytune.errors import ConfigError, UsageError
    from cosytune.models.sampling import SamplingConfig

    changes = config_flag_values(args, SamplingConfig)
    try:
        return dataclasses.replace(default, **changes)
    except ConfigError as e:
        raise UsageError(f"invalid sampling flags: {'; '.join(e.problems)}") from e


def options_from_args(args: argparse.Namespace, synth: Any, **overrides: Any) -> Any:
    """SynthesisOptions from the CLI flags (``overrides`` win, e.g. per-line batch options)."""
    import dataclasses

    from cosytune.cli.config_flags import config_flag_values
    from cosytune.infer.synthesizer import SynthesisOptions
    from cosytune.models.sampling import SamplingConfig

    values = config_flag_values(args, SynthesisOptions)
    values.update({k: v for k, v in overrides.items() if k in {f.name for f in dataclasses.fields(SynthesisOptions)}})
    sampling_keys = {f.name for f in dataclasses.fields(SamplingConfig)}
    ns = argparse.Namespace(**{**vars(args), **{k: v for k, v in overrides.items() if k in sampling_keys}})
    options = SynthesisOptions(sampling=sampling_from_args(ns, synth.llm.config.sampling), **values)
    options.check()
    return options


def load_synthesizer(args: argparse.Namespace) -> tuple[Any, float]:
    """Build the Synthesizer from the flags; returns it and the load time in seconds.

    ``--no_fast_decode`` forces the reference LLM decoder; otherwise the Synthesizer decides (fast on CUDA).
    """
    from cosytune.infer.synthesizer import Synthesizer

    t0 = time.perf_counter()
    synth = Synthesizer.from_dir(args.model_dir, device=args.device, dtype=args.dtype,
                                 llm_ckpt=args.llm_ckpt, flow_ckpt=args.flow_ckpt,
                                 upstream_noise=args.upstream_noise,
                                 fast_decode=False if getattr(args, "no_fast_decode", False) else None,
                                 fast_flow=(True if getattr(args, "fast_flow", False) else
                                            False if getattr(args, "no_fast_flow", False) else None),
                                 fast_vocoder=False if getattr(args, "no_fast_vocoder", False) else None,
                                 compile_decode=bool(getattr(args, "compile_decode", False)),
                                 # infer-batch warms up unless --no_warmup; a single request only with --warmup
                                 warmup=(False if getattr(args, "no_warmup", False) else
                                         True if getattr(args, "warmup", False) else
                                         None if hasattr(args, "no_warmup") else False),
                                 stream_cache=bool(getattr(args, "stream_cache", False)),
                                 # one request at a time (infer-batch batches its segments itself): no
                                 # continuous-batching rows to hold (a 16-row cache per capacity on a GPU)
                                 batch_decode=False)
    return synth, time.perf_counter() - t0


def dtype_name(synth: Any) -> str:
    """The dtype the Synthesizer resolved (``--dtype auto`` becomes float32 or bfloat16), for run.json."""
    return str(synth.dtype).replace("torch.", "")


def read_text_arg(args: argparse.Namespace) -> str:
    """--text, or the whole --text_file (UTF-8)."""
    from cosytune.errors import DataError

    if args.text is not None:
        return args.text
    from cosytune.fileio import read_user_text

    path: Path = args.text_file
    if not path.is_file():
        raise DataError(f"--text_file {path} does not exist")
    return read_user_text(path, "text file").rstrip("\n")


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every CLI setting (the raw text is redacted by run.json's writer)."""
    skip = {"func", "debug", "log_level", "no_progress"}
    return {k: v for k, v in vars(args).items() if k not in skip and not k.startswith("_")}


def check_args_before_loading(args: argparse.Namespace) -> None:
    """Everything that can be wrong with the flags alone, checked before the (slow) model load."""
    from cosytune.errors import UsageError
    from cosytune.infer.synthesizer import SynthesisOptions
    from cosytune.models.sampling import SamplingConfig

    if getattr(args, "stream", False) and args.speed != 1.0:
        raise UsageError(f"--speed {args.speed} cannot be used with --stream: the time-stretch needs the whole mel "
                         "(upstream has the same rule). Drop --stream or --speed")
    SynthesisOptions(sampling=sampling_from_args(args, SamplingConfig()), speed=args.speed, seed=args.seed,
                     text_frontend=args.text_frontend, prompt_strategy=args.prompt_strategy,
                     guide_sep=args.guide_sep).check()
    if not args.spk_id and not args.prompt_wav:
        raise UsageError("no voice given: pass --spk_id NAME (a speaker in the model dir's spk2info.pt; "
                         "'cosytune doctor --model_dir DIR' lists them) or --prompt_wav CLIP with --prompt_text for a "
                         "zero-shot voice")
    if not Path(args.model_dir).is_dir():
        raise UsageError(f"--model_dir {args.model_dir} is not a folder; point it at a model dir (e.g. models/<speaker> "
                         "from 'cosytune assemble', or Fun-CosyVoice3-0.5B)")


def run(args: argparse.Namespace) -> int:
    from cosytune.infer.single import SegmentRequest, check_output_path, synthesize_to_file

    text = read_text_arg(args)
    out_wav = args.out_wav if args.out_wav is not None else args.out_dir / "chunk_0000.wav"
    check_output_path(out_wav)
    check_args_before_loading(args)
    logger.info("loading %s on %s (%s) ...", args.model_dir, args.device, args.dtype)
    synth, load_s = load_synthesizer(args)
    options = options_from_args(args, synth)
    req = SegmentRequest(text=text, out_wav=out_wav, mode=args.mode, spk_id=args.spk_id,
                         prompt_text=args.prompt_text, prompt_wav=args.prompt_wav, options=options, stream=args.stream)
    synthesize_to_file(synth, req, settings=settings_from_args(args), load_s=load_s, dtype=dtype_name(synth),
                       show_progress=not args.no_progress)
    return 0

"""Write speaker entries into spk2info.pt (the seed workflow's §9), SFT or zero-shot.

SFT entries come from spk2embedding.pt (the speaker-mean CAM++ embedding, as upstream's
inference_sft expects: {spk: {"embedding": (1, 192)}}). Zero-shot entries come from a prompt wav and
its text (--model_dir, --prompt_wav, --prompt_text): the stored prompt features (speech tokens, 24 kHz
mel, embedding, prompt text ids) use upstream's add_zero_shot_spk keys, so `cosytune infer --spk_id`
and upstream's inference_zero_shot(zero_shot_spk_id=...) reuse them. Existing entries of other
speakers in the output file are kept; the file is replaced atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cosytune.cli.common import flag, print_summary

EPILOG = """examples:
  cosytune spk2info --spk2embedding_pt data/train/spk2embedding.pt --spk_id alice \\
      --out_spk2info_pt models/alice/spk2info.pt
  # zero-shot speaker from a prompt clip, stored in the model dir's own spk2info.pt
  cosytune spk2info --model_dir models/base --spk_id bob --prompt_wav bob.wav \\
      --prompt_text "You are a helpful assistant.<|endofprompt|>Transcript of bob.wav."
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    flag(p, "spk2embedding_pt", default=None, type=Path, help="spk2embedding.pt from extract-embedding (SFT entries)")
    flag(p, "spk_id", action="append", default=None,
         help="speaker id to write (repeatable; default: every speaker in the file). With --prompt_wav: the "
              "name of the new zero-shot speaker")
    flag(p, "out_spk2info_pt", "--out", default=None, type=Path,
         help="spk2info.pt to create or update (default with --model_dir: the model dir's spk2info.pt)")
    flag(p, "as_id", default=None, help="store a single --spk_id under this name instead")
    g = p.add_argument_group("zero-shot speaker (instead of --spk2embedding_pt)")
    flag(g, "model_dir", type=Path, default=None, help="model dir whose tokenizer and ONNX models to use")
    flag(g, "prompt_wav", type=Path, default=None, help="prompt clip (3-10 s)")
    flag(g, "prompt_text", default=None, help="'<instruction><|endofprompt|><transcript of --prompt_wav>'")
    flag(g, "device", default="cpu", help="onnxruntime device for the speech tokenizer (cpu, cuda, auto)")


def _zero_shot_entries(args: argparse.Namespace) -> dict:
    from cosytune.errors import UsageError
    from cosytune.infer.frontend import zero_shot_entry_from_dir

    problems = []
    if args.model_dir is None:
        problems.append("--model_dir (its tokenizer and ONNX models compute the prompt features)")
    if args.prompt_text is None:
        problems.append("--prompt_text (the instruction, <|endofprompt|>, then the clip's transcript)")
    if not args.spk_id or len(args.spk_id) != 1:
        problems.append("exactly one --spk_id (the new speaker's name)")
    if args.spk2embedding_pt is not None:
        problems.append("no --spk2embedding_pt (write SFT entries in a separate call)")
    if problems:
        raise UsageError("--prompt_wav needs " + "; ".join(problems))
    name = args.as_id or args.spk_id[0]
    return {name: zero_shot_entry_from_dir(args.model_dir, args.prompt_wav, args.prompt_text, device=args.device)}


def run(args: argparse.Namespace) -> int:
    from cosytune.errors import UsageError
    from cosytune.modeldir.package import load_spk2embedding, save_spk2info, spk2info_from_embeddings

    out = args.out_spk2info_pt
    if out is None:
        if args.model_dir is None:
            raise UsageError("pass --out_spk2info_pt (or --model_dir to update the model dir's spk2info.pt)")
        out = args.model_dir / "spk2info.pt"
    if args.prompt_wav is not None:
        entries = _zero_shot_entries(args)
        kind = "zero-shot"
    else:
        if args.spk2embedding_pt is None:
            raise UsageError("pass --spk2embedding_pt (SFT entries) or --prompt_wav with --prompt_text and "
                             "--model_dir (a zero-shot entry)")
        entries = spk2info_from_embeddings(load_spk2embedding(args.spk2embedding_pt), args.spk_id)
        if args.as_id:
            if len(entries) != 1:
                raise UsageError("--as_id renames exactly one speaker; give exactly one --spk_id")
            entries = {args.as_id: next(iter(entries.values()))}
        kind = "sft"
    table = save_spk2info(out, entries)
    first = next(iter(entries.values()))
    emb = first.get("embedding", first.get("flow_embedding"))
    items = [("file", out), ("written", ", ".join(entries)), ("kind", kind), ("embedding dim", emb.shape[-1])]
    if kind == "zero-shot":
        items.append(("prompt tokens", int(first["flow_prompt_speech_token_len"][0])))
    items.append(("speakers in file", len(table)))
    print_summary("spk2info", items)
    return 0

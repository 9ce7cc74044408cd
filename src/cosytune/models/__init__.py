"""Our own implementations of the CosyVoice 3 networks (Qwen2 LLM, DiT flow, HiFT vocoder)."""

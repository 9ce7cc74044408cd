"""Speaker fine-tuning of the CosyVoice 3 LLM and flow: config, data, loop, checkpoints, averaging."""

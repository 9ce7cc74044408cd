"""Text front end: Qwen tokenizer with CosyVoice 3's special tokens (``tokenizer``) and text
normalisation before synthesis (``normalize``)."""

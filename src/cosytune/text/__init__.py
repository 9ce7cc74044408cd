"""Text front end: Qwen tokenizer with CosyVoice 3's special tokens (``tokenizer``) and text
normalisation before synthesis (``normalize``); ``special`` holds the special strings other code shares.

Importing this package is cheap: ``transformers`` is imported only when a tokenizer is loaded or built.
"""

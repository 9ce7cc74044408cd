"""cosytune: fine-tune CosyVoice 3 on one speaker's recordings and speak in that voice."""

__version__ = "0.1.0"

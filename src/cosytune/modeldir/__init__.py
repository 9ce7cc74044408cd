"""Model dirs and the files around the networks: reading/writing a CosyVoice 3 model dir, upstream's
``cosyvoice3.yaml``, building networks from it, presets (tiny/full test models), the ONNX front-end
models, and assembling a tuned speaker model dir."""

"""Audio utilities for dataset preparation.

* :mod:`cosytune.audio.io` — decode anything ffmpeg decodes (PyAV, no system ffmpeg) or
  libsndfile reads; write PCM16 wav atomically.
* :mod:`cosytune.audio.trim` — sox ``silence`` equivalent for trimming both ends.
* :mod:`cosytune.audio.slicing` — cut long recordings at pauses into utterances.
* :mod:`cosytune.audio.loudness` — LUFS measurement/normalisation, peak ceiling, clipping check.

Signals are 1-D ``float32`` numpy arrays in [-1, 1] (mono) unless a docstring says otherwise.
Nothing is imported here, so ``import cosytune.audio`` stays cheap.
"""

from __future__ import annotations

"""Synthesis: the :class:`~cosytune.infer.synthesizer.Synthesizer` API behind ``cosytune infer`` / ``infer-batch``.

Modules: ``frontend`` (prompt wav → speech tokens, 24 kHz mel, speaker embedding; spk2info entries),
``synthesizer`` (modes, text front end, LLM → flow → HiFT, streaming generator), ``streaming`` (upstream's
chunk schedule as per-request state), ``runinfo`` (run.json). Importing this package imports no torch
model code; the submodules do.
"""

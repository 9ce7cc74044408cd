"""``cosytune eval``: an objective scorecard for "did the fine-tune help?", and checkpoint selection by it.

Modules: ``models`` (the scoring networks that ship inside pip packages: Resemblyzer's voice encoder,
DNSMOS, CAM++ similarity), ``textmetrics`` (CER/WER with normalisation on both sides, insertion/deletion
rates, repeated n-grams), ``sentences`` (the shipped held-out zh/en lists), ``scorecard`` (synthesise every
variant on the same seeds and score each take), ``report`` (scorecard.json/.csv, the HTML page, the verdict),
``select`` (the selection rule), ``qa`` (per-clip dataset QA for ``dataset-report``), ``api`` (the entry
points: ``evaluate``, ``run_variants``, ``select_weights``, ``select_for_run``).
It sits above ``infer`` and ``data`` (like ``pipeline``) and imports nothing from ``cli``.
"""

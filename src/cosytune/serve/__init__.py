"""``cosytune serve``: the speech HTTP API (OpenAI-compatible + full controls, streaming) and the listening lab.

Modules: ``engine`` (the loaded model, variant cache, bounded worker queue, cancellation), ``app`` (the
FastAPI routes, errors, metrics, the lab's API), ``schemas`` (request bodies), ``variants`` (checkpoint
names → files, by lookup), ``encode`` (wav/pcm/flac/mp3/opus), ``lab`` (blind A/B ratings and their
summary), ``dataset`` (the review.tsv page), ``server`` (start uvicorn), ``static/`` (the page: plain
HTML/JS/CSS, no build step, no CDN). FastAPI and uvicorn come with the ``serve`` extra.
"""

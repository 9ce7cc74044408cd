"""Dataset QA with the scorecard's models: per-clip DNSMOS and speaker consistency (Resemblyzer distance to
the speaker's centroid), and flags for the clips that stand out (another speaker, noise or music), so bad
clips are caught before training. ``cosytune dataset-report`` runs it and folds the result into its report
and ``review.tsv`` (:func:`cosytune.data.report.apply_qa`)."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cosytune.evaluation.models import Dnsmos, VoiceEncoder, cosine, to_16k

logger = logging.getLogger(__name__)

#: A clip is another speaker's when its distance to its speaker's centroid exceeds the median distance by
#: more than max(MAD_FACTOR robust standard deviations, MIN_MARGIN).
MAD_FACTOR = 4.0
MIN_MARGIN = 0.15
#: DNSMOS below these flags the clip (BAK: background noise or music; OVRL: overall quality).
BAK_MIN = 2.5
OVRL_MIN = 2.0


def outlier_threshold(distances: Sequence[float]) -> float:
    """Distance above which a clip is flagged ``other_speaker``."""
    med = statistics.median(distances)
    mad = statistics.median(abs(d - med) for d in distances) * 1.4826
    return med + max(MAD_FACTOR * mad, MIN_MARGIN)


def clip_qa(clips: Sequence[tuple[str, Path, str]], *, device: str = "cpu",
            on_clip: Callable[[], None] | None = None, encoder: VoiceEncoder | None = None,
            dnsmos: Dnsmos | None = None) -> dict[str, dict]:
    """QA of ``(utt, wav, speaker)`` clips: ``{utt: {"dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808",
    "speaker_distance", "flags"}}``.

    The centroid of a speaker is the mean embedding of its clips, recomputed once without the farthest
    quarter so a planted clip does not pull it; each clip's distance is 1 − cosine to its speaker's centroid.
    """
    from cosytune.audio.io import load_audio, to_mono

    encoder = encoder or VoiceEncoder("cuda" if device.startswith("cuda") else "cpu")
    dnsmos = dnsmos or Dnsmos(device)
    embs: dict[str, np.ndarray] = {}
    out: dict[str, dict] = {}
    for utt, wav, _spk in clips:
        a, r = load_audio(wav)
        a16 = to_16k(to_mono(a), r)
        embs[utt] = encoder.embed(a16)
        d = dnsmos.score(a16)
        out[utt] = {f"dnsmos_{k}": round(v, 3) for k, v in d.items()}
        out[utt]["flags"] = []
        if on_clip:
            on_clip()
    by_spk: dict[str, list[str]] = {}
    for utt, _wav, spk in clips:
        by_spk.setdefault(spk, []).append(utt)
    for utts in by_spk.values():
        m = np.mean([embs[u] for u in utts], axis=0)
        if len(utts) >= 4:
            first = sorted(utts, key=lambda u: cosine(embs[u], m))
            m = np.mean([embs[u] for u in first[len(utts) // 4:]], axis=0)
        dist = {u: 1.0 - cosine(embs[u], m) for u in utts}
        thr = outlier_threshold(list(dist.values())) if len(utts) >= 3 else float("inf")
        for u in utts:
            out[u]["speaker_distance"] = round(dist[u], 4)
            if dist[u] > thr:
                out[u]["flags"].append("other_speaker")
    for q in out.values():
        if q["dnsmos_bak"] < BAK_MIN:
            q["flags"].append("noisy_background")
        if q["dnsmos_ovrl"] < OVRL_MIN:
            q["flags"].append("low_quality")
    return out


def dataset_qa(directory: Path, *, device: str = "cpu", progress: bool = True) -> dict[str, dict]:
    """:func:`clip_qa` of every clip of a transcribe out_dir, prepare-audio out_dir or Kaldi dir."""
    from cosytune.console import progress as bar
    from cosytune.data.report import report_clips

    clips = report_clips(Path(directory))
    pbar = bar(total=len(clips), desc="QA (DNSMOS, speaker)", enabled=progress)
    res = clip_qa(clips, device=device, on_clip=lambda: pbar.update(1))
    pbar.close()
    return res

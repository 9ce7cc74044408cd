"""The selection rule: which candidate (checkpoint, average, tuned or base flow) to keep, and why.

The rule, in order:

1. **Failures**: a candidate whose failure rate (exceptions, empty/silent/clipped takes, far too fast or
   slow) exceeds the lowest by more than ``failure_tolerance`` is out.
2. **Intelligibility**: CER/WER must not regress: a candidate more than ``cer_tolerance`` (absolute) above
   the lowest error rate is out. Skipped, and said so, when no ASR ran.
3. **Similarity**: the highest Resemblyzer similarity to the training centroid (to the reference clip when
   there is no centroid) wins...
4. **Quality**: ...unless others are within ``sim_tie`` of it: then the highest DNSMOS OVRL among those.

Ties that remain keep the earlier candidate (the caller lists the default choice first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cosytune.errors import UsageError


@dataclass(frozen=True)
class SelectionRule:
    cer_tolerance: float = 0.02
    """How far above the best CER/WER a candidate may be (absolute, 0.02 = 2 points)."""
    failure_tolerance: float = 0.10
    """How far above the lowest failure rate a candidate may be."""
    sim_tie: float = 0.01
    """Similarities closer than this are a tie, broken by DNSMOS OVRL."""

    def describe(self) -> str:
        return (f"failure rate within {self.failure_tolerance:.0%} of the lowest; CER/WER within "
                f"+{self.cer_tolerance:.3f} of the lowest; then highest speaker similarity; within "
                f"{self.sim_tie:.3f} of it, highest DNSMOS OVRL")


@dataclass
class Selection:
    winner: str
    reasons: list[str] = field(default_factory=list)
    eliminated: dict[str, str] = field(default_factory=dict)
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner, "reasons": self.reasons, "eliminated": self.eliminated, "rule": self.rule}

    @property
    def why(self) -> str:
        return "; ".join(self.reasons)


def _m(s: Mapping[str, Any], name: str) -> float:
    if name == "failure_rate":
        v = s.get("failure_rate", math.nan)
    else:
        v = s.get(name, {})
        v = v.get("mean", math.nan) if isinstance(v, Mapping) else v
    return float(v) if v is not None else math.nan


def select(summaries: Mapping[str, Mapping[str, Any]], candidates: Sequence[str],
           rule: SelectionRule | None = None) -> Selection:
    """Apply the rule to the candidates' summaries (as :func:`cosytune.evaluation.scorecard.summarize` makes).

    Raises:
        UsageError: no candidates, or a candidate without a summary.
    """
    rule = rule or SelectionRule()
    if not candidates:
        raise UsageError("nothing to select from: no candidates were scored")
    missing = [c for c in candidates if c not in summaries]
    if missing:
        raise UsageError(f"no scores for candidate(s) {', '.join(missing)}")
    sel = Selection(winner=candidates[0], rule=rule.describe())
    alive = list(candidates)

    fr = {c: _m(summaries[c], "failure_rate") for c in alive}
    best_fr = min((v for v in fr.values() if not math.isnan(v)), default=math.nan)
    if not math.isnan(best_fr):
        for c in list(alive):
            if fr[c] > best_fr + rule.failure_tolerance + 1e-12:
                sel.eliminated[c] = f"failure rate {fr[c]:.0%} vs best {best_fr:.0%}"
                alive.remove(c)
        if len(alive) < len(candidates):
            sel.reasons.append(f"failure rate within {rule.failure_tolerance:.0%} of the best ({best_fr:.0%}): "
                               + ", ".join(alive))

    cer = {c: _m(summaries[c], "error_rate") for c in alive}
    known = [v for v in cer.values() if not math.isnan(v)]
    if known:
        best = min(known)
        for c in list(alive):
            if math.isnan(cer[c]) or cer[c] > best + rule.cer_tolerance + 1e-12:
                sel.eliminated[c] = f"CER/WER {cer[c]:.3f} > best {best:.3f} + {rule.cer_tolerance:.3f}"
                alive.remove(c)
        sel.reasons.append(f"CER/WER within +{rule.cer_tolerance:.3f} of the best ({best:.3f}): "
                           + ", ".join(alive))
    else:
        sel.reasons.append("no ASR scores: the CER rule was skipped")

    sim_name = "sim_centroid" if any(not math.isnan(_m(summaries[c], "sim_centroid")) for c in alive) else "sim_ref"
    sims = {c: _m(summaries[c], sim_name) for c in alive}
    ranked = sorted(alive, key=lambda c: -sims[c] if not math.isnan(sims[c]) else math.inf)
    top = ranked[0]
    tied = [c for c in alive if not math.isnan(sims[c]) and sims[top] - sims[c] <= rule.sim_tie + 1e-12]
    if len(tied) > 1:
        ovrl = {c: _m(summaries[c], "ovrl") for c in tied}
        # Highest OVRL; equal OVRL keeps the earlier candidate.
        winner = max(tied, key=lambda c: (ovrl[c] if not math.isnan(ovrl[c]) else -math.inf, -alive.index(c)))
        sel.reasons.append(f"{sim_name} tie within {rule.sim_tie:.3f} among {', '.join(tied)}: highest DNSMOS "
                           f"OVRL {ovrl[winner]:.2f} → {winner}")
    else:
        winner = top
        sel.reasons.append(f"highest {sim_name} {sims[top]:.3f} → {winner}")
    sel.winner = winner
    return sel

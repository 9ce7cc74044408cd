"""The scorecard's files: ``scorecard.json``, ``scorecard.csv`` (one row per variant), ``takes.csv`` (one row
per take), PNG plots and a static offline HTML page (tables with mean ± 95 % CI, plots, players for the best
and worst take of each variant), and the one-paragraph verdict printed in the terminal."""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cosytune.evaluation.scorecard import FAILURES, METRICS
from cosytune.fileio import atomic_path, write_json, write_text

#: Changes smaller than these count as "equal" in the verdict (besides overlapping CIs).
EQUAL = {"error_rate": 0.01, "sim_centroid": 0.01, "sim_ref": 0.01, "ovrl": 0.05}
HEADLINE = ("error_rate", "sim_centroid", "sim_ref", "sim_campplus", "ovrl", "sig", "bak", "p808", "repeat_score",
            "dur_ratio", "rtf")


def _fmt(x: float, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _num(x: Any) -> float:
    """A number, NaN for None (JSON has no NaN: missing values are written as null)."""
    return math.nan if x is None else float(x)


def _mean(s: Mapping[str, Any], m: str) -> float:
    v = s.get(m, {})
    return _num(v.get("mean")) if isinstance(v, Mapping) else _num(v)


def compare(a: Mapping[str, Any], b: Mapping[str, Any], m: str) -> tuple[str, float]:
    """``better``/``worse``/``equal`` of variant ``a`` against ``b`` on metric ``m``, and the difference a − b."""
    ma, mb = _mean(a, m), _mean(b, m)
    if math.isnan(ma) or math.isnan(mb):
        return "unknown", math.nan
    d = ma - mb
    cis = [_num(x.get(m, {}).get("ci95")) for x in (a, b)]
    ci = max([c for c in cis if not math.isnan(c)], default=0.0)
    if abs(d) <= max(EQUAL.get(m, 0.0), 0.5 * ci):
        return "equal", d
    lower_better = METRICS[m][0] == "lower"
    return ("better" if (d < 0) == lower_better else "worse"), d


def verdict(summaries: Mapping[str, Mapping[str, Any]], asr_status: str, selection: Mapping[str, Any] | None = None,
            baseline: str | None = None, tuned: str | None = None, base_flow: str | None = None) -> str:
    """One paragraph: tuned vs base, flow tuning, the pick."""
    parts = []
    sim = "sim_centroid" if tuned and not math.isnan(_mean(summaries.get(tuned, {}), "sim_centroid")) else "sim_ref"
    if baseline and tuned and baseline in summaries and tuned in summaries:
        t, b = summaries[tuned], summaries[baseline]
        s_how, s_d = compare(t, b, sim)
        c_how, c_d = compare(t, b, "error_rate")
        o_how, o_d = compare(t, b, "ovrl")
        sim_txt = {"better": f"beats base on SIM by {s_d:+.2f}", "worse": f"is below base on SIM by {s_d:+.2f}",
                   "equal": "ties base on SIM", "unknown": "has no SIM"}[s_how]
        cer_txt = {"better": f"CER better by {-c_d:.3f}", "worse": f"CER worse by {c_d:+.3f}", "equal": "CER equal",
                   "unknown": "CER not measured (no ASR)"}[c_how]
        parts.append(f"{tuned} {sim_txt} and {cer_txt}; OVRL {o_how} ({o_d:+.2f})")
    if tuned and base_flow and tuned in summaries and base_flow in summaries:
        o_how, o_d = compare(summaries[tuned], summaries[base_flow], "ovrl")
        c_how, c_d = compare(summaries[tuned], summaries[base_flow], "error_rate")
        if o_how == "worse" or c_how == "worse":
            what = f"OVRL by {-o_d:.2f}" if o_how == "worse" else f"CER by {c_d:+.3f}"
            parts.append(f"flow tuning hurts {what} → keep base flow")
        elif o_how == "better":
            parts.append(f"flow tuning helps OVRL by {o_d:+.2f} → keep tuned flow")
        else:
            parts.append("flow tuning makes no measurable difference → base flow is the safer choice")
    fails = {n: s["failure_rate"] for n, s in summaries.items() if (s.get("failure_rate") or 0) > 0}
    if fails:
        parts.append("failures: " + ", ".join(f"{n} {v:.0%}" for n, v in fails.items()))
    if selection:
        parts.append(f"pick: {selection['winner']} ({'; '.join(selection.get('reasons', []))})")
    if asr_status.startswith("ASR unavailable"):
        parts.append(asr_status)
    return ". ".join(parts) + "." if parts else "no variants were scored."


# ---------------------------------------------------------------------------------------------- files
def _csv(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (";".join(v) if isinstance(v, list) else v) for k, v in r.items()})
    return buf.getvalue()


def summary_rows(summaries: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, s in summaries.items():
        row: dict[str, Any] = {"variant": name, "role": s["role"], "takes": s["takes"],
                               "failure_rate": s["failure_rate"]}
        for m in METRICS:
            row[m] = s[m]["mean"]
            row[f"{m}_ci95"] = s[m]["ci95"]
        for m, v in s["seed_spread"].items():
            row[f"spread_{m}"] = v
        rows.append(row)
    return rows


def plots(rows: Sequence[dict[str, Any]], names: Sequence[str], out: Path) -> list[Path]:
    """Box plots per variant of the headline metrics (PNG, Agg canvas)."""
    from matplotlib.figure import Figure

    made = []
    for m in ("sim_centroid", "sim_ref", "ovrl", "error_rate"):
        data = [[r[m] for r in rows if r["variant"] == n and r.get(m) is not None] for n in names]
        if not any(data):
            continue
        fig = Figure(figsize=(max(5, 1.3 * len(names) + 2), 3.6), dpi=100)
        ax = fig.subplots()
        ax.boxplot([d if d else [math.nan] for d in data], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), [n.replace(" ", "\n") for n in names], fontsize=8)
        ax.set_title(f"{METRICS[m][1]} ({METRICS[m][0]} is better)")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / "plots" / f"{m}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        made.append(path)
    return made


def _best_worst(rows: Sequence[dict[str, Any]], name: str) -> tuple[dict | None, dict | None]:
    """Best and worst take of a variant: by CER/WER when measured, then SIM and OVRL."""
    vr = [r for r in rows if r["variant"] == name and r.get("wav")]
    if not vr:
        return None, None

    def key(r: dict) -> tuple:
        return (r.get("error_rate", 0.0) if r.get("error_rate") is not None else 0.0, -(r.get("sim_ref") or 0.0),
                -(r.get("ovrl") or 0.0))
    vr = sorted(vr, key=key)
    return vr[0], vr[-1]


def html_page(card: Mapping[str, Any], rows: Sequence[dict[str, Any]], plot_files: Sequence[Path], out: Path) -> str:
    """The static report page (no scripts, no network: images and audio are relative files)."""
    e = html.escape
    sums = card["summaries"]
    head = ["variant", "takes", "fail %"] + [METRICS[m][1] for m in HEADLINE]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cosytune eval</title><style>",
        "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}",
        ("table{border-collapse:collapse;font-size:13px;margin:8px 0 20px}th,td{border:1px solid #ccc;"
        "padding:4px 7px;text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"),
        (".win{background:#e6f4ea;font-weight:600}.verdict{background:#f7f7fb;border-left:4px solid #5b6ee1;"
        "padding:10px 14px;margin:12px 0}.small{color:#666;font-size:12px}img{max-width:48%;margin:4px}"),
        "audio{height:28px;vertical-align:middle}</style></head><body>",
        "<h1>Did the fine-tune help?</h1>",
        f"<div class='verdict'>{e(card['verdict'])}</div>",
        (f"<p class='small'>{e(card['asr_status'])}. {len(card['sentences'])} sentences × {card['config']['takes']} "
        f"takes per variant, seeds {card['config']['seed']}+1000·take+sentence (same draws for every variant). "
        f"Mean ± 95 % CI. Selection rule: {e(card.get('rule', ''))}</p>"),
        "<h2>Scores</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>",
    ]
    winner = (card.get("selection") or {}).get("winner")
    for name, s in sums.items():
        cls = " class='win'" if name == winner else ""
        cells = [f"<td>{e(name)}<br><span class='small'>{e(s['role'])}</span></td>", f"<td>{s['takes']}</td>",
                 f"<td>{_fmt(100 * _num(s['failure_rate']), 0)}</td>"]
        for m in HEADLINE:
            mu, ci = _num(s[m]["mean"]), _num(s[m]["ci95"])
            cells.append(f"<td>{_fmt(mu)}" + (f" ± {_fmt(ci)}" if not math.isnan(ci) else "") + "</td>")
        parts.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    parts.append("<h2>Failures and seed-to-seed spread</h2><table><tr><th>variant</th>"
                 + "".join(f"<th>{f}</th>" for f in FAILURES)
                 + "<th>spread CER</th><th>spread SIM</th><th>spread OVRL</th></tr>")
    for name, s in sums.items():
        sp = s["seed_spread"]
        parts.append(f"<tr><td>{e(name)}</td>" + "".join(f"<td>{s['failures'][f]}</td>" for f in FAILURES)
                     + f"<td>{_fmt(sp.get('error_rate', math.nan))}</td><td>{_fmt(sp.get('sim_centroid', math.nan))}"
                     f"</td><td>{_fmt(sp.get('ovrl', math.nan))}</td></tr>")
    parts.append("</table><h2>Plots</h2>")
    parts += [f"<img src='{e(p.relative_to(out).as_posix())}' alt='{e(p.stem)}'>" for p in plot_files]
    parts.append("<h2>Listen: best and worst take of each variant</h2><table><tr><th>variant</th><th>best</th>"
                 "<th>worst</th></tr>")
    for name in sums:
        best, worst = _best_worst(rows, name)
        cells = []
        for r in (best, worst):
            if r is None:
                cells.append("<td>no audio</td>")
                continue
            label = f"{r['sentence']} take {r['take']}: SIM {_fmt(r.get('sim_ref', math.nan), 2)}, OVRL " \
                    f"{_fmt(r.get('ovrl', math.nan), 2)}" + (f", CER {_fmt(r['error_rate'], 2)}"
                                                              if r.get("error_rate") is not None else "")
            cells.append(f"<td style='text-align:left'><audio controls preload='none' src='{e(r['wav'])}'></audio>"
                         f"<br><span class='small'>{e(label)}<br>{e(r['text'][:80])}</span></td>")
        parts.append(f"<tr><td>{e(name)}</td>{''.join(cells)}</tr>")
    parts.append("</table><h2>Variants</h2><table><tr><th>variant</th><th>role</th><th>weights</th></tr>")
    for v in card["variants"]:
        w = ", ".join(f"{k}: {Path(v[k]).name}" for k in ("llm_ckpt", "flow_ckpt", "prompt_wav") if v.get(k)) \
            or "model dir as is"
        parts.append(f"<tr><td>{e(v['name'])}</td><td>{e(v['role'])}</td><td style='text-align:left'>{e(w)}"
                     f"{(' — ' + e(v['note'])) if v.get('note') else ''}</td></tr>")
    parts.append("</table>")
    if card.get("dropped_sentences"):
        parts.append("<p class='small'>Dropped (in the training text): "
                     + e("; ".join(card["dropped_sentences"])) + "</p>")
    parts.append("<p class='small'>Made by cosytune eval. Files: scorecard.json, scorecard.csv, takes.csv, "
                 "takes/.</p></body></html>")
    return "\n".join(parts)


TAKE_COLUMNS = ("variant", "sentence", "lang", "take", "seed", "failures", "duration_s", "rtf", "error_rate",
                "substitution_rate", "deletion_rate", "insertion_rate", "repeat_score", "sim_ref", "sim_centroid",
                "sim_campplus", "sig", "bak", "ovrl", "p808", "dur_ratio", "wav", "text", "asr_text", "error")


def write_all(card: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """Write scorecard.json/.csv, takes.csv, plots/ and index.html into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "scorecard.json", "csv": out / "scorecard.csv", "takes": out / "takes.csv",
             "html": out / "index.html"}
    srows = summary_rows(card["summaries"])
    write_json(paths["json"], {**card, "takes": rows})
    write_text(paths["csv"], _csv(srows, list(srows[0]) if srows else ["variant"]))
    write_text(paths["takes"], _csv(rows, TAKE_COLUMNS))
    plot_files = plots(rows, list(card["summaries"]), out)
    write_text(paths["html"], html_page(card, rows, plot_files, out))
    return paths

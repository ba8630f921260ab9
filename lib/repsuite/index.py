"""The suite's front page: every paper, every claim, the paper's value, ours, the verdict.

    python -m repsuite.index

reads `reports/metrics/*.json` for the papers of params.yaml and writes `reports/index.html` (one
self-contained page, no scripts) and `reports/claims.csv` (one row per claim).
"""

import html
import json
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import yaml

from repsuite import paths

COLOURS = {"reproduced": "#d7f0d2", "inconclusive": "#fbf0c9", "not_reproduced": "#f6d2d2"}


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _interval(summary: dict | None) -> str:
    if not summary:
        return ""
    lo, hi = summary.get("ci95", [None, None])
    return f"{_fmt(summary['mean'])} [{_fmt(lo)}, {_fmt(hi)}] (n={summary['n']})"


def claim_rows(slugs: list[str], reports: Path) -> pd.DataFrame:
    rows = []
    for slug in slugs:
        path = reports / "metrics" / f"{slug}.json"
        if not path.exists():
            rows.append({"slug": slug, "title": "", "claim": "", "verdict": "not run"})
            continue
        m = json.loads(path.read_text())
        for c in m["claims"]:
            rows.append({
                "slug": slug, "title": m["title"], "arxiv": m["arxiv"], "claim": c["id"],
                "statement": c["statement"], "metric": c.get("metric", ""),
                "paper_value": c["paper_value"]["value"],
                "paper_source": c["paper_value"]["source"],
                "ours": _interval(c["ours"]), "baseline": _interval(c.get("baseline")),
                "difference": _interval(c.get("difference")),
                "criterion": c["criterion"].get("words", ""), "verdict": c["verdict"],
                "reason": c.get("reason", ""), "profile": m["profile"], "device": m["device"],
                "runtime_s": m.get("wall_s", m["runtime_s"]), "report": f"{slug}.html",
            })
    return pd.DataFrame(rows)


def render(df: pd.DataFrame) -> str:
    e = html.escape
    counts = Counter(df["verdict"])
    summary = ", ".join(f"{v}: {counts[v]}" for v in (*COLOURS, "not run") if counts[v])
    head = ("<tr><th>paper</th><th>claim</th><th>paper's value</th><th>ours [95% CI]</th>"
            "<th>baseline / difference</th><th>criterion</th><th>verdict</th><th>run</th></tr>")
    body = []
    for slug, group in df.groupby("slug", sort=False):
        first = group.iloc[0]
        title = e(str(first.get("title") or slug))
        arxiv = first.get("arxiv")
        tally = Counter(group["verdict"])
        paper = (f"<b>{title}</b><br><a href='{e(slug)}.html'>report</a>"
                 f"<br><small>{e(', '.join(f'{v}: {n}' for v, n in tally.items()))}</small>")
        if isinstance(arxiv, str) and arxiv:
            paper += f" &middot; arXiv {e(arxiv)}"
        for i, (_, r) in enumerate(group.iterrows()):
            cell = f"<td rowspan='{len(group)}'>{paper}</td>" if i == 0 else ""
            if r["verdict"] == "not run":
                body.append(f"<tr>{cell}<td colspan='7'>not run yet</td></tr>")
                continue
            reason = f"<br><small>{e(r['reason'])}</small>" if r["reason"] else ""
            body.append(
                f"<tr>{cell}<td><b>{e(r['claim'])}</b> {e(r['statement'])}"
                f"<br><small>{e(r['metric'])}</small></td>"
                f"<td>{e(str(r['paper_value']))}<br><small>{e(r['paper_source'])}</small></td>"
                f"<td>{e(r['ours'])}</td><td>{e(r['baseline'])}<br><small>diff {e(r['difference'])}"
                f"</small></td><td><small>{e(r['criterion'])}</small></td>"
                f"<td style='background:{COLOURS.get(r['verdict'], '#eee')}'>"
                f"{e(r['verdict'])}{reason}"
                f"</td><td><small>{e(r['profile'])} profile<br>{e(r['device'])}<br>"
                f"{r['runtime_s']:.0f} s</small></td></tr>"
            )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Replication index</title>
<style>
body {{font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px}}
table {{border-collapse: collapse; font-size: 14px}}
td, th {{border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; text-align: left}}
th {{background: #f4f4f4}}
</style></head><body>
<h1>Replication index</h1>
<p>{len(df['slug'].unique())} papers, {len(df)} claims ({e(summary)}). Each verdict is computed from
per-seed measurements against the criterion declared in the paper's notebook before the run.</p>
<table>{head}{''.join(body)}</table>
</body></html>
"""


def main() -> int:
    root = paths.repo_root()
    slugs = list(yaml.safe_load((root / "params.yaml").read_text())["papers"])
    reports = paths.reports_dir()
    df = claim_rows(slugs, reports)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "index.html").write_text(render(df), encoding="utf-8")
    df.to_csv(reports / "claims.csv", index=False)
    print(f"index: {len(slugs)} papers, {len(df)} rows -> {reports / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reports: report.json (numbers, config, model, data, commit), report.md (the numbers with their
chance levels) and a self-contained report.html (the same plus base64 PNG figures)."""

from __future__ import annotations

import html
import json
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The commit of the mmvssl checkout, with '+dirty' when it has local changes; None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def metric_rows(report: dict) -> list[tuple[str, str, float, float | None]]:
    """(section, metric, value, chance) rows of every number the report holds."""
    rows = []
    retrievals = [report.get("retrieval", {})] + [sub.get("retrieval", {}) for sub in report.get("results", {}).values()]
    for direction, m in (item for r in retrievals for item in r.items()):
        for k in ("R@1", "R@5", "R@10"):
            if k in m:
                rows.append((f"retrieval {direction}", k, m[k], m.get(f"chance_{k}", m.get("chance_R@1") if k == "R@1" else None)))
        rows.append((f"retrieval {direction}", "MedR", m["MedR"], (m["num_items"] + 1) / 2 if "num_items" in m else None))
        rows.append((f"retrieval {direction}", "MeanR", m["MeanR"], None))
    for name, m in report.get("mir", {}).items():
        rows.append(("EK-100 MIR", name, m["avg"], m["chance_avg"]))
    for section, m in _classifications(report):
        rows.append((section, "top1", m["top1"], m["chance_top1"]))
        rows.append((section, "top5", m["top5"], m["chance_top5"]))
        rows.append((section, "mean class acc", m["mean_class_acc"], m["chance_top1"]))
    return rows


def _classifications(report: dict):
    if "top1" in report:
        yield report.get("protocol", "classification"), report
    for name, sub in report.get("results", {}).items():
        if isinstance(sub, dict) and "top1" in sub:
            yield name, sub


def _fmt(x) -> str:
    return "" if x is None else f"{x:.2f}"


def markdown(report: dict, title: str) -> str:
    lines = [f"# {title}", "", f"- model: `{report.get('model', {}).get('path')}` "
             f"({report.get('model', {}).get('name')}, fingerprint `{report.get('model', {}).get('fingerprint')}`)",
             f"- data: `{report.get('data')}`", f"- commit: `{report.get('commit')}`", "",
             "| section | metric | value | chance |", "|---|---|---:|---:|"]
    lines += [f"| {s} | {m} | {_fmt(v)} | {_fmt(c)} |" for s, m, v, c in metric_rows(report)]
    lines += ["", "Percentages, except ranks (MedR, MeanR). Config:", "", "```json",
              json.dumps(report.get("config", {}), indent=2), "```", ""]
    return "\n".join(lines)


def html_page(report: dict, title: str, figures: list[tuple[str, str]], extra_html: str = "") -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(s)}</td><td>{esc(m)}</td><td>{_fmt(v)}</td><td>{_fmt(c)}</td></tr>"
                   for s, m, v, c in metric_rows(report))
    figs = "".join(f"<figure><img src='data:image/png;base64,{b64}'><figcaption>{esc(name)}</figcaption></figure>"
                   for name, b64 in figures)
    model = report.get("model", {})
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title><style>
body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} td:first-child,td:nth-child(2){{text-align:left}}
figure{{display:inline-block;margin:8px;vertical-align:top}} .q{{margin:1em 0}} .r{{display:inline-block;width:130px;
margin:2px;font-size:11px;vertical-align:top}} .hit{{outline:3px solid #2a2}} pre{{background:#f6f6f6;padding:8px}}
</style></head><body><h1>{esc(title)}</h1>
<p>model <code>{esc(str(model.get('path')))}</code> ({esc(str(model.get('name')))}, fingerprint
<code>{esc(str(model.get('fingerprint')))}</code>)<br>data <code>{esc(str(report.get('data')))}</code><br>
commit <code>{esc(str(report.get('commit')))}</code></p>
<table><tr><th>section</th><th>metric</th><th>value</th><th>chance</th></tr>{rows}</table>
<p>Percentages, except ranks (MedR, MeanR).</p>{figs}{extra_html}
<h2>config</h2><pre>{esc(json.dumps(report.get('config', {}), indent=2))}</pre></body></html>"""


def write_report(out_dir: str | Path, report: dict, title: str, figures: list[tuple[str, str]] = (),
                 extra_html: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.setdefault("commit", git_commit())
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report, title))
    (out / "report.html").write_text(html_page(report, title, list(figures), extra_html))
    return out / "report.json"

"""`bnlab report RUNS_DIR`: one self-contained HTML page (and a Markdown twin) from saved run folders.

It reads only what the runner wrote (metrics.json, provenance.json, the PNG figures), so it can be rebuilt
at any time without training anything.
"""

from __future__ import annotations

import base64
import html
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnlab.fileio import atomic_write, read_json
from bnlab.provenance import machine_summary

__all__ = ["build_report", "collect_runs"]

_BADGE = {"reproduced": "#1a7f37", "partly": "#9a6700", "not reproduced": "#cf222e"}


def collect_runs(runs_dir: Path, profile: str | None = None) -> list[dict[str, Any]]:
    """Every run folder below `runs_dir` that has a metrics.json (optionally of one profile), sorted by name."""
    runs = []
    for metrics_path in sorted(Path(runs_dir).rglob("metrics.json")):
        metrics = read_json(metrics_path)
        if profile is not None and metrics.get("profile") != profile:
            continue
        prov_path = metrics_path.parent / "provenance.json"
        metrics["_dir"] = metrics_path.parent
        metrics["_provenance"] = read_json(prov_path) if prov_path.exists() else {}
        runs.append(metrics)
    return sorted(runs, key=lambda m: (m["experiment"], m["profile"], str(m["_dir"])))


def _counts(runs: Sequence[dict[str, Any]]) -> str:
    counts = Counter(v["verdict"] for run in runs for v in run["verdicts"])
    return ", ".join(f"{counts[k]} {k}" for k in _BADGE if counts[k]) or "no verdicts"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _machines(runs: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({machine_summary(r["_provenance"]) for r in runs if r["_provenance"]})


def _html(runs: Sequence[dict[str, Any]], title: str) -> str:
    e = html.escape
    total = sum(r.get("train_seconds", 0.0) for r in runs)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1f2328}",
        "table{border-collapse:collapse;margin:.8em 0;width:100%}td,th{border:1px solid #d0d7de;padding:.35em .6em;"
        "vertical-align:top;text-align:left}th{background:#f6f8fa}img{max-width:100%}"
        ".badge{color:#fff;padding:.1em .5em;border-radius:1em;white-space:nowrap}pre{white-space:pre-wrap;"
        "background:#f6f8fa;padding:.8em;border-radius:6px}section{border-top:2px solid #d0d7de;margin-top:2em}",
        "</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{len(runs)} run(s): {e(_counts(runs))}. Training time {e(_minutes(total))} in all.</p>",
        "<table><tr><th>experiment</th><th>profile</th><th>seeds</th><th>verdicts</th><th>training time</th></tr>",
    ]
    for run in runs:
        anchor = e(f"{run['experiment']}-{run['profile']}")
        parts.append(
            f"<tr><td><a href='#{anchor}'>{e(run['experiment'])}</a></td><td>{e(run['profile'])}</td>"
            f"<td>{len(run['seeds'])}</td><td>{e(_counts([run]))}</td>"
            f"<td>{e(_minutes(run.get('train_seconds', 0.0)))}</td></tr>"
        )
    parts.append("</table>")
    for run in runs:
        anchor = e(f"{run['experiment']}-{run['profile']}")
        parts += [
            f"<section id='{anchor}'><h2>{e(run['title'])}</h2>",
            f"<p><b>{e(run['experiment'])}</b>, profile <b>{e(run['profile'])}</b>, seeds {e(str(run['seeds']))}; "
            f"source: {e(run['paper'])}</p>",
            "<table><tr><th>claim</th><th>paper</th><th>ours</th><th>verdict</th></tr>",
        ]
        for v in run["verdicts"]:
            color = _BADGE.get(v["verdict"], "#57606a")
            parts.append(
                f"<tr><td>{e(v['claim'])}</td><td>{e(v['paper'])}</td><td>{e(v['ours'])}</td>"
                f"<td><span class='badge' style='background:{color}'>{e(v['verdict'])}</span><br>"
                f"<small>{e(v['reason'])}</small></td></tr>"
            )
        parts.append("</table>")
        for table in run.get("tables", []):
            head = "".join(f"<th>{e(str(c))}</th>" for c in table["columns"])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in table["rows"])
            parts.append(f"<p><b>{e(table['title'])}</b></p><table><tr>{head}</tr>{body}</table>")
        for name in run["figures"]:
            data = base64.b64encode((run["_dir"] / name).read_bytes()).decode()
            parts.append(f"<p><img alt='{e(name)}' src='data:image/png;base64,{data}'></p>")
        config_rows = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in run["config"].items())
        prov = run["_provenance"]
        parts += [
            f"<details><summary>Setup and claim</summary><pre>{e(run.get('description', ''))}</pre></details>",
            f"<details><summary>Config</summary><table>{config_rows}</table>"
            f"<p>overrides: {e(str(run['overrides'] or 'none'))}</p></details>",
            f"<p><small>Machine: {e(machine_summary(prov) if prov else 'unknown')}; bnlab {e(str(prov.get('bnlab')))}, "
            f"git {e(str(prov.get('git')))}; training time {e(_minutes(run.get('train_seconds', 0.0)))}; "
            f"analyzed {e(run.get('analyzed_at', ''))}; folder {e(str(run['_dir']))}</small></p></section>",
        ]
    machines = "; ".join(_machines(runs)) or "unknown"
    parts.append(f"<hr><p><small>Machines: {e(machines)}. Rebuild with <code>bnlab report</code>.</small></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown(runs: Sequence[dict[str, Any]], title: str, base: Path) -> str:
    total = sum(r.get("train_seconds", 0.0) for r in runs)
    lines = [f"# {title}", "", f"{len(runs)} run(s): {_counts(runs)}. Training time {_minutes(total)} in all.", ""]
    for run in runs:
        lines += [
            f"## {run['title']}",
            "",
            f"`{run['experiment']}`, profile `{run['profile']}`, seeds {run['seeds']}; source: {run['paper']}",
            "",
            "| claim | paper | ours | verdict |",
            "|---|---|---|---|",
        ]
        for v in run["verdicts"]:
            cells = [v["claim"], v["paper"], v["ours"], f"**{v['verdict']}** ({v['reason']})"]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
        for table in run.get("tables", []):
            lines += [f"**{table['title']}**", "", "| " + " | ".join(map(str, table["columns"])) + " |"]
            lines.append("|" + "---|" * len(table["columns"]))
            lines += ["| " + " | ".join(map(str, row)) + " |" for row in table["rows"]]
            lines.append("")
        for name in run["figures"]:
            lines += [f"![{name}]({Path(os.path.relpath(run['_dir'] / name, base)).as_posix()})", ""]
        prov = run["_provenance"]
        lines += [
            f"Machine: {machine_summary(prov) if prov else 'unknown'}; bnlab {prov.get('bnlab')}, "
            f"git {prov.get('git')}; training time {_minutes(run.get('train_seconds', 0.0))}.",
            "",
        ]
    return "\n".join(lines)


def build_report(
    runs_dir: Path | str, out: Path | str | None = None, profile: str | None = None, title: str = "bnlab report"
) -> tuple[Path, Path]:
    """Write `report.html` and `report.md` (into `out`, default `runs_dir`); returns their paths."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"bnlab report: {runs_dir} is not a folder of runs")
    runs = collect_runs(runs_dir, profile)
    if not runs:
        which = f" of profile {profile!r}" if profile else ""
        raise FileNotFoundError(f"bnlab report: no finished runs{which} under {runs_dir} (no metrics.json found)")
    out_dir = Path(out) if out else runs_dir
    html_text = _html(runs, title)
    md_text = _markdown(runs, title, out_dir)
    html_path = atomic_write(out_dir / "report.html", lambda f: f.write(html_text.encode()))
    md_path = atomic_write(out_dir / "report.md", lambda f: f.write(md_text.encode()))
    return html_path, md_path

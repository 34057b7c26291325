"""Write an evaluation as ``metrics.json`` and a self-contained offline HTML report.

Layout of ``out_dir``: ``metrics.json`` (every number, flag and threshold), ``report.html``
(inline CSS, no scripts, nothing fetched) and ``images/`` (the JPEG thumbnails it shows, by
relative path). The report's first table is laid out like the paper's Table 1. Every column is
named by the scorer that produced it; the paper's published numbers (Imagen / Stable Diffusion
on all 30 DreamBench subjects) appear below it only when the values were computed with the
paper's models (DINO, CLIP, LPIPS), never beside another scorer's values.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from dreambooth.eval.diagnostics import EXPLANATIONS
from dreambooth.eval.scoring import METRICS, EvalResult, PromptScores, Scores, SubjectResult

BETTER = {"dino": "↑", "clip_i": "↑", "clip_t": "↑", "pres": "↓", "div": "↑", "class_div": "↑"}
"""Which way each metric improves."""
PUBLISHED = (
    Scores("Real images", dino=0.774, clip_i=0.885),
    Scores("DreamBooth (Imagen)", dino=0.696, clip_i=0.812, clip_t=0.306),
    Scores("DreamBooth (Stable Diffusion)", dino=0.668, clip_i=0.803, clip_t=0.305),
    Scores("Textual Inversion (Stable Diffusion)", dino=0.569, clip_i=0.780, clip_t=0.255),
)
"""Ruiz et al. 2023, Table 1."""

_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 20px; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #e8e8e8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.published td { color: #777; font-style: italic; }
tr.flagged td { background: #fff1e6; }
.flag { color: #a33; font-weight: bold; }
.grid img { width: 96px; height: 96px; object-fit: cover; margin: 1px; }
.photos img { width: 128px; height: 128px; object-fit: cover; margin: 2px; }
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def result_to_dict(result: EvalResult) -> dict:
    """Everything in ``result`` but the thumbnails, as JSON-ready data."""
    return {
        "table": [dataclasses.asdict(row) for row in result.rows],
        "embedders": result.embedders,
        "columns": result.columns,
        "paper_embedders": result.paper_embedders,
        "thresholds": dataclasses.asdict(result.thresholds),
        "flag_explanations": EXPLANATIONS,
        "subjects": [
            {
                "name": s.name,
                "class_noun": s.class_noun,
                "table": [dataclasses.asdict(row) for row in s.rows],
                "prompts": [dataclasses.asdict(p) for p in s.prompts],
            }
            for s in result.subjects
        ],
    }


def _number(value: float | None) -> str:
    return '<td class="num">' + ("–" if value is None else f"{value:.3f}") + "</td>"


def column_headers(columns: dict[str, str]) -> dict[str, str]:
    """Each metric's column header: the name of what produced it, and which way is better."""
    return {key: f"{columns[key]} {BETTER[key]}" for key in METRICS}


def _row(row: Scores, css: str = "", suffix: str = "") -> str:
    cells = "".join(_number(getattr(row, key)) for key in METRICS)
    return f'<tr class="{css}"><td>{html.escape(row.label)}{suffix}</td>{cells}</tr>'


def _table(rows: Sequence[Scores], columns: dict[str, str], published: Sequence[Scores] = ()) -> str:
    head = (
        "<tr><th>Method</th>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in column_headers(columns).values())
        + "</tr>"
    )
    body = [_row(r) for r in rows] + [_row(r, "published", " (paper)") for r in published]
    return '<table class="scores">' + head + "".join(body) + "</table>"


def _published_note(result: EvalResult) -> str:
    if result.paper_embedders:
        return "<p>Rows marked (paper): Ruiz et al. 2023, Table 1 (all 30 DreamBench subjects).</p>"
    return (
        "<p>The paper's published numbers are not shown: these values come from other scorers than the "
        "paper's DINO, CLIP and LPIPS (see the column names), so they are not comparable with them.</p>"
    )


def _flags_cell(p: PromptScores) -> str:
    if not p.checked:
        return "<td>reference</td>"
    parts = [
        f'<div><span class="flag" title="{html.escape(f.explanation)}">{html.escape(f.kind)}</span>: '
        f"{html.escape(f.evidence)}</div>"
        for f in p.flags
    ]
    unchecked = [k for k in EXPLANATIONS if k not in p.checked]
    if unchecked:
        parts.append(f"<div>not checked: {html.escape(', '.join(unchecked))} (no pretrained images)</div>")
    return "<td>" + ("".join(parts) or "none") + "</td>"


def _prompt_table(prompts: Sequence[PromptScores], columns: dict[str, str]) -> str:
    order = {text: i for i, text in enumerate(dict.fromkeys(p.text for p in prompts))}
    prompts = sorted(prompts, key=lambda p: order[p.text])  # stable: models stay in row order
    head = (
        "<tr><th>Model</th><th>Prompt</th><th>Text scored (no identifier)</th><th>n</th>"
        + "".join(
            f"<th>{html.escape(h)}</th>" for key, h in column_headers(columns).items()
            if key in ("dino", "clip_i", "clip_t", "div")
        )
        + "<th>Flags</th></tr>"
    )
    rows = [
        f'<tr class="{"flagged" if p.flags else ""}"><td>{html.escape(p.model)}</td>'
        f'<td>{html.escape(p.prompt)}</td><td>{html.escape(p.text)}</td><td class="num">{p.n_images}</td>'
        + "".join(_number(v) for v in (p.dino, p.clip_i, p.clip_t, p.div))
        + _flags_cell(p)
        + "</tr>"
        for p in prompts
    ]
    return '<table class="prompts">' + head + "".join(rows) + "</table>"


def _save_images(images: Iterable[bytes], folder: Path, stem: str, root: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(images):
        path = folder / f"{stem}_{i:02d}.jpg"
        path.write_bytes(data)
        paths.append(path.relative_to(root).as_posix())
    return paths


def _grid_cell(images: Iterable[bytes], folder: Path, stem: str, root: Path, alt: str) -> str:
    tags = "".join(
        f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'
        for src in _save_images(images, folder, stem, root)
    )
    return f'<td class="grid">{tags or "–"}</td>'


def _gallery(subject: SubjectResult, folder: Path, root: Path) -> str:
    """Photos, then a table: one row per prompt (and the class prompt), one column per model."""
    g = subject.gallery
    photos = "".join(
        f'<img src="{html.escape(src)}" alt="photo">' for src in _save_images(g.photos, folder, "photo", root)
    )
    models = list(g.prompts)
    text_of = {p.prompt: p.text for p in subject.prompts}
    head = "<tr><th>Prompt (without identifier)</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in models)
    rows = []
    for j, text in enumerate(dict.fromkeys(p.text for p in subject.prompts)):
        cells = [
            _grid_cell(
                [data for prompt, ims in g.prompts[m].items() if text_of[prompt] == text for data in ims],
                folder / f"m{i}-{_slug(m)}", f"p{j:02d}", root, text,
            )
            for i, m in enumerate(models)
        ]  # fmt: skip
        rows.append(f"<tr><td>{html.escape(text)}</td>{''.join(cells)}</tr>")
    cells = [
        _grid_cell(g.class_samples[m], folder / f"m{i}-{_slug(m)}", "class", root, "class sample")
        for i, m in enumerate(models)
    ]
    rows.append(f"<tr><td>a {html.escape(subject.class_noun)} (prior samples)</td>{''.join(cells)}</tr>")
    return (
        f'<h3>Photos</h3><div class="photos">{photos}</div>'
        f"<h3>Generated</h3><table>{head}</tr>{''.join(rows)}</table>"
    )


def _legend(result: EvalResult) -> str:
    items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in EXPLANATIONS.items())
    thresholds = ", ".join(f"{k} = {v}" for k, v in dataclasses.asdict(result.thresholds).items())
    models = ", ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in result.embedders.items())
    return f"<ul>{items}</ul><p>Thresholds: {html.escape(thresholds)}.</p><p>Models: {models}.</p>"


def render_html(result: EvalResult, root: Path) -> str:
    """The report's HTML; writes the thumbnails it references under ``root / "images"``."""
    sections = [
        f'<section id="s{i}-{_slug(s.name)}"><h2>{html.escape(s.name)} ({html.escape(s.class_noun)})</h2>'
        + _table(s.rows, result.columns)
        + _prompt_table(s.prompts, result.columns)
        + _gallery(s, root / "images" / f"s{i}-{_slug(s.name)}", root)
        + "</section>"
        for i, s in enumerate(result.subjects)
    ]
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>DreamBooth evaluation</title>'
        f"<style>{_CSS}</style></head><body><h1>DreamBooth evaluation</h1>"
        f"<p>{len(result.subjects)} subject(s); every value is averaged per subject, then over subjects.</p>"
        + _table(result.rows, result.columns, PUBLISHED if result.paper_embedders else ())
        + _published_note(result)
        + "<h2>Failure-mode flags</h2><p>Per prompt; hover a flag for its meaning.</p>"
        + _legend(result)
        + "".join(sections)
        + "</body></html>"
    )


def write_report(result: EvalResult, out_dir: Path | str) -> Path:
    """Write ``metrics.json``, ``report.html`` and ``images/`` into ``out_dir``.

    Args:
        result: The evaluation, from :func:`~dreambooth.eval.scoring.summarise`.
        out_dir: Folder to write into (created if missing; files in it are overwritten).

    Returns:
        The path of ``report.html``.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.json").write_text(json.dumps(result_to_dict(result), indent=2) + "\n")
    page = root / "report.html"
    page.write_text(render_html(result, root), encoding="utf-8")
    return page

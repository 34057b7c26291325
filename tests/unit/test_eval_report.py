"""The report: metrics.json, an offline HTML page whose images all resolve, and a headless render."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth.eval import diagnostics
from dreambooth.eval.diagnostics import Thresholds
from dreambooth.eval.evaluate import table_text
from dreambooth.eval.report import write_report
from dreambooth.eval.scoring import (
    PAPER_COLUMNS,
    REAL_LABEL,
    Embedders,
    EvalResult,
    Gallery,
    PromptScores,
    Scores,
    SubjectResult,
)
from dreambooth.pocket.embedders import COLUMNS as POCKET_COLUMNS

CHROMIUM = shutil.which("chromium")


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _result(columns: dict[str, str] | None = None, paper_embedders: bool = True) -> EvalResult:
    flag = diagnostics.check_overfitting(0.97, "00.jpg", Thresholds())
    prompts = (
        PromptScores("Pretrained", "a dog & <b>cat</b>", "a dog & <b>cat</b>", 2, 0.5, 0.6, 0.3, 0.4),
        PromptScores("DreamBooth", "a qwv dog & <b>cat</b>", "a dog & <b>cat</b>", 2, 0.7, 0.8, 0.28, 0.3,
                     flags=(flag,), checked=tuple(diagnostics.EXPLANATIONS)),
    )  # fmt: skip
    rows = (
        Scores(REAL_LABEL, dino=0.77, clip_i=0.88),
        Scores("Pretrained", 0.5, 0.6, 0.3, 0.45, 0.4, 0.6),
        Scores("DreamBooth", 0.7, 0.8, 0.28, 0.6, 0.3, 0.5),
    )
    gallery = Gallery(
        photos=(_jpeg((200, 30, 30)), _jpeg((30, 200, 30))),
        prompts={"Pretrained": {prompts[0].prompt: (_jpeg((0, 0, 200)),) * 2},
                 "DreamBooth": {prompts[1].prompt: (_jpeg((200, 0, 200)),) * 2}},
        class_samples={"Pretrained": (_jpeg((90, 90, 90)),), "DreamBooth": ()},
    )  # fmt: skip
    subject = SubjectResult("dog/1", "dog", rows, prompts, gallery)
    columns = columns or {key: f"{name} (tiny)" for key, name in PAPER_COLUMNS.items()}
    return EvalResult(rows, (subject,), {"subject": "tiny-dino"}, Thresholds(), columns, paper_embedders)


def test_writes_metrics_json_with_table_prompts_and_flags(tmp_path: Path) -> None:
    write_report(_result(), tmp_path)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["label"] for row in data["table"]] == [REAL_LABEL, "Pretrained", "DreamBooth"]
    assert data["table"][0]["clip_t"] is None and data["thresholds"] == vars(Thresholds())
    flags = data["subjects"][0]["prompts"][1]["flags"]
    assert flags[0]["kind"] == "overfitting" and flags[0]["explanation"].startswith("Overfitting")


def test_html_is_offline_and_every_image_resolves(tmp_path: Path) -> None:
    page = write_report(_result(), tmp_path)
    html = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 2 + 2 + 2 + 1  # photos, two prompt grids, one class sample
    assert all((tmp_path / src).is_file() and not src.startswith(("/", "http")) for src in sources)
    assert "<script" not in html and "<link" not in html and "http" not in html
    assert "<b>cat</b>" not in html and "&lt;b&gt;cat&lt;/b&gt;" in html  # prompts are escaped
    for explanation in diagnostics.EXPLANATIONS.values():
        assert explanation.replace("'", "&#x27;") in html
    assert html.index(REAL_LABEL) < html.index("DreamBooth (Imagen) (paper)")


def test_other_scorers_columns_are_named_by_them_and_never_beside_the_papers_numbers(tmp_path: Path) -> None:
    html = write_report(_result(POCKET_COLUMNS, paper_embedders=False), tmp_path).read_text()
    headers = re.findall(r"<th>([^<]*)</th>", html)
    assert (
        "pocket fidelity ↑" in headers and "pocket image-text ↑" in headers
        and "PRES (pocket fidelity) ↓" in headers
    )
    assert not any(h.startswith(("DINO", "CLIP")) for h in headers)
    assert "(paper)" not in html and "0.696" not in html and "not comparable" in html
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["columns"]["dino"] == "pocket fidelity" and data["paper_embedders"] is False


def test_the_papers_numbers_stand_beside_values_computed_the_papers_way(tmp_path: Path) -> None:
    html = write_report(_result(), tmp_path).read_text()
    assert "<th>DINO (tiny) ↑</th>" in html and "DreamBooth (Imagen) (paper)" in html


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


def test_column_names_say_which_model_produced_them() -> None:
    paper = Embedders(
        _Named("facebook/dino-vits16"), _Named("openai/clip-vit-base-patch32"), _Named("lpips"), paper=True
    )
    assert paper.column_names()["dino"] == "DINO (facebook/dino-vits16)"
    assert paper.column_names()["clip_t"] == "CLIP-T (openai/clip-vit-base-patch32)"
    other = Embedders(_Named("colour"), _Named("colour"), _Named("colour distance"))
    assert (
        other.column_names()["dino"] == "subject similarity (colour)"
        and other.column_names()["div"] == "DIV (colour distance)"
    )
    own = Embedders(_Named("x"), _Named("x"), _Named("x"), columns=POCKET_COLUMNS)
    assert own.column_names() == POCKET_COLUMNS


def test_table_text_names_the_scorer_of_every_column() -> None:
    rows = _result().rows
    text = table_text(rows, POCKET_COLUMNS)
    assert "A: pocket fidelity ↑" in text and "D: PRES (pocket fidelity) ↓" in text and "DINO" not in text
    assert "DreamBooth" in text and "0.700" in text
    assert "scorer not recorded" in table_text(rows)  # the scorers are unknown: no metric name is claimed


@pytest.mark.skipif(
    CHROMIUM is None, reason="headless render needs the `chromium` binary (Debian package: chromium)"
)
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = write_report(_result(), tmp_path / "report")
    shot = tmp_path / "shot.png"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=1200,2000", page.resolve().as_uri(),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)  # [2000, 1200, 3]
    assert pixels.shape == (2000, 1200, 3) and pixels.std() > 10  # not a blank page
    header = (np.abs(pixels[:800] - 232).max(axis=-1) <= 2).sum()  # the tables' #e8e8e8 header cells
    magenta = (np.abs(pixels - [200, 0, 200]).max(axis=-1) <= 30).sum()  # a generated thumbnail
    assert header > 1000 and magenta > 1000

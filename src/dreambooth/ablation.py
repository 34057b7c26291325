"""`dreambooth pocket ablation`: the paper's prior-preservation ablation (its Table 3) and its
super-resolution finding, reproduced in miniature on the pocket model.

Every subject (the ready ones and new ones from fresh seeds) is personalised twice, with and
without the prior-preservation loss, by the demo protocol; the table averages over subjects.
Resumable: a subject/setting whose metrics.json exists is not run again.
"""

from __future__ import annotations

import dataclasses
import statistics

from dreambooth.files import read_json, write_json
from dreambooth.pocket.evaluate import LABELS
from dreambooth.pocket.settings import AblationConfig
from dreambooth.pocket.subjects import SUBJECTS

COLUMNS = {
    "pretrained": ("with prior", "pretrained"),
    "DreamBooth, no prior": ("no prior", "fine-tuned"),
    "DreamBooth": ("with prior", "fine-tuned"),
}
"""Column -> (which run, which model of its metrics)."""


def run_ablation(base: AblationConfig) -> dict:
    """Run every subject with and without prior preservation into `base.run_dir`; write and print the averaged
    table."""
    from dreambooth.demo import run_demo

    subjects = [(name, None) for name in SUBJECTS] + [
        (f"seed{seed}", seed) for seed in base.new_subject_seeds
    ]
    results: dict[str, dict[str, dict]] = {}
    for name, seed in subjects:
        for setting, prior in (("with prior", True), ("no prior", False)):
            run_dir = base.run_dir / name / setting.replace(" ", "-")
            if not (run_dir / "metrics.json").is_file():
                run_demo(
                    dataclasses.replace(
                        base, run_dir=run_dir, subject=name if seed is None else base.subject,
                        subject_seed=seed, prior_preservation=prior,
                    )
                )
            results.setdefault(name, {})[setting] = read_json(run_dir / "metrics.json")
    table = average(results)
    write_json(base.run_dir / "ablation.json", {"subjects": results, "average": table})
    print(format_ablation(table, len(results)))
    return table


def average(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Subject -> setting -> its demo metrics.json, averaged over subjects: a column per model, then the SR
    rows."""
    scores = [{setting: metrics["scores"] for setting, metrics in r.items()} for r in results.values()]
    table: dict[str, dict[str, float]] = {}
    for column, (setting, model) in COLUMNS.items():
        table[column] = {
            key: statistics.mean(r[setting][model][key] for r in scores if r[setting][model][key] is not None)
            for key in LABELS
            if any(r[setting][model][key] is not None for r in scores)
        }
    with_prior = [r["with prior"] for r in results.values()]
    table["SR: pretrained vs personalised"] = {
        "detail (pretrained SR)": statistics.mean(
            m["scores"]["fine-tuned base + pretrained SR"]["detail"] for m in with_prior
        ),
        "detail (personalised SR)": statistics.mean(m["scores"]["fine-tuned"]["detail"] for m in with_prior),
        **{
            f"renders: {stage}": statistics.mean(m["sr_detail_on_renders"][stage] for m in with_prior)
            for stage in with_prior[0]["sr_detail_on_renders"]
        },
    }
    return table


def format_ablation(table: dict[str, dict[str, float]], n_subjects: int) -> str:
    """The table as text: metrics down, models across; then the SR comparison."""
    columns = [c for c in COLUMNS]
    width = max(len(label) for label in LABELS.values())
    lines = [f"mean over {n_subjects} subjects", f"{'':{width}}  " + "  ".join(f"{c:>22}" for c in columns)]
    for key, label in LABELS.items():
        cells = [f"{table[c][key]:>22.3f}" if key in table[c] else f"{'-':>22}" for c in columns]
        lines.append(f"{label:{width}}  " + "  ".join(cells))
    sr = table["SR: pretrained vs personalised"]
    renders = ", ".join(
        f"{key.removeprefix('renders: ')} {value:.3f}" for key, value in sr.items()
        if key.startswith("renders: ")
    )
    lines.append(
        "\nfine detail at 64x64 (glyph score, with prior), the fine-tuned base's samples: pretrained SR "
        f"{sr['detail (pretrained SR)']:.3f}, personalised SR {sr['detail (personalised SR)']:.3f}"
    )
    lines.append(
        f"the subject's true renders, downsampled to 32x32 and super-resolved: {renders} (a true render: 1.0)"
    )
    return "\n".join(lines)

"""What an audit leaves on disk: audit.json, the targets (surrogates named and saved), best images and figures.

Why one writer for `harden audit` and the audit stage: both folders have the same layout, so a release engineer reads
either the same way; both are written into a temporary folder and renamed into place (nothing half-written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..figures import image_row_png
from .core import AuditPrompt, AuditSettings, ModelAudit
from .similarity import Similarity
from .targets import Target

SCHEMA = 1


def _png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)


def audit_json(audits: dict[str, ModelAudit], primary: str, prompts: Sequence[AuditPrompt],
               controls: Sequence[Target], sim: Similarity, settings: AuditSettings, **extra) -> dict:
    """audit.json: the primary model's `summary` and `rows` at the top, every audited model under `models`."""
    size = next((p.target.image for p in prompts if p.target.image is not None),
                next((c.image for c in controls), None))
    targets = []
    for i, p in enumerate(prompts):
        entry = {"index": i, "prompt": p.text, **p.target.to_json()}
        if p.target.source == "surrogate":
            entry["saved"] = f"targets/prompt_{i:06d}.png"
        targets.append(entry)
    return {"schema": SCHEMA, "metric": sim.name, "threshold": sim.threshold,
            "similarity": sim.describe(size) if size is not None else sim.name,
            "settings": settings.to_json(), "summary": audits[primary].summary, "rows": audits[primary].rows,
            "primary": primary, "models": {k: a.to_json() for k, a in audits.items()}, "targets": targets,
            "controls": [{"index": j, **c.to_json()} for j, c in enumerate(controls)], **extra}


def write_images(folder: Path, audits: dict[str, ModelAudit], prompts: Sequence[AuditPrompt],
                 columns: list[tuple[str, str, str]]) -> None:
    """Surrogates under targets/, each model's best image per (condition, prompt) under images/<model>/, and one
    figure per audited prompt under figures/: the target, then `columns` = [(title, model, condition)]."""
    for i, p in enumerate(prompts):
        if p.target.source == "surrogate":
            _png(folder / "targets" / f"prompt_{i:06d}.png", p.target.image)
    for label, audit in audits.items():
        for (condition, i), image in audit.images.items():
            _png(folder / "images" / label / f"{condition}_{i:06d}.png", image)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(prompts):
        if p.target.image is None:
            continue
        cells = [(f"target ({p.target.source})", p.target.image)]
        for title, label, condition in columns:
            audit = audits.get(label)
            cells.append((title, audit.images.get((condition, i)) if audit else None))
        image_row_png(folder / "figures" / f"prompt_{i:06d}.png", cells, f"prompt {i}")


def _count(summary: dict, condition: str) -> str:
    total = summary["control_n"] if condition == "control" else summary["n"]
    return f"{summary[f'{condition}_reproduced']}/{total}" if total else "—"


def table_lines(summaries: dict[str, dict]) -> list[str]:
    """A short plain-text table: condition x model, 'k/n' reproduced, plus the verdict line per model."""
    labels = list(summaries)
    rows = [("condition", *labels)]
    names = {"prompt": "(a) prompt", "paraphrase": "(b) paraphrases", "attack": "(c) embedding attack",
             "control": "(d) control (never seen)"}
    for condition, name in names.items():
        rows.append((name, *[_count(summaries[k], condition) for k in labels]))
    rows.append(("    attack from the prompt", *[f"{s['attack_from_prompt_reproduced']}/{s['n']}"
                                                 for s in summaries.values()]))
    rows.append(("    attack from noise", *[f"{s['attack_from_noise_reproduced']}/{s['n']}"
                                            for s in summaries.values()]))
    width = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
    first = next(iter(summaries.values()))
    lines.append(f"metric {first['metric']} >= {first['threshold']:g} counts (best seed)")
    for label, s in summaries.items():
        if s["not_audited"]:
            lines.append(f"{label}: {s['not_audited']} prompt(s) not audited: no consistent base image")
        if s["inconclusive"]:
            lines.append(f"{label}: INCONCLUSIVE: the attack reproduced {s['control_reproduced']} of "
                         f"{s['control_n']} control images (bound {s['control_bound']:g})")
        elif not s["control_measured"]:
            lines.append(f"{label}: no control images: the attack's power on unseen images was not measured")
    return lines

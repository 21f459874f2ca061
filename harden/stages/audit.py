"""Stage audit (after prune, before verify): the audit of docs/audit.md on the base, the hardened model and the
random-neuron control; writes audit/ (audit.json, targets, best images, one figure per prompt).

Why before verify: verify's gates read the audit's reproduction rates (recipe.AUDIT_GATES) like any other metric, so
a run whose hardened model still gives its images back under the attack fails its gates and is never pushed.
Why three models: the base shows what there was to remove (and makes the surrogates), the random control with the
same per-layer counts shows whether the rates fall because of *these* neurons or because of pruning as such.
"""

from __future__ import annotations

import json

from ..audit.core import audit_model
from ..audit.inputs import (build_prompts, check_model, control_paths, image_size, load_controls, settings_from_recipe,
                            similarity_from_recipe)
from ..audit.output import audit_json, table_lines, write_images
from ..files import atomic_folder, write_atomic
from ..metrics import random_control
from ..prune import prune_dense
from ..recipe import AUDIT_GATES
from .context import Run
from .folder import RunFolder, read_neurons

AUDIT_FILE = "audit/audit.json"
MODELS = ("base", "hardened", "control")
FIGURE_COLUMNS = [("base", "base", "prompt"), ("hardened: prompt", "hardened", "prompt"),
                  ("hardened: attack", "hardened", "attack")]


def audit(run: Run) -> None:
    """Audit base, hardened and random control (when the recipe enables the audit); nothing to do otherwise."""
    section = run.recipe.audit
    if not section.enabled:
        run.ui.log("audit: not enabled in the recipe (audit.enabled: false), skipped")
        return
    check_model(run.pipe)
    settings = settings_from_recipe(run.recipe)
    sim = similarity_from_recipe(section, run.inputs.loaded.folder)
    size = image_size(run.pipe, settings)
    prompts, base_images = build_prompts(run.inputs.memorized, size, sim, settings, run.pipe, run.pipe.unet, run.ui,
                                         all_base_images=any(p.image is None for p in run.inputs.memorized))
    controls = load_controls(control_paths(section, run.inputs.loaded.folder), size)
    neurons = read_neurons(run.folder.file("localize", "neurons.json"))
    unets = run.hardened_unets()
    models = {"base": run.pipe.unet, "hardened": unets.get("compact", unets.get("dense"))}
    if neurons:
        models["control"] = prune_dense(run.pipe.unet, random_control(neurons, run.widths, run.recipe.seed))
    audits = {}
    for label, unet in models.items():
        audits[label] = audit_model(run.pipe, unet, label, prompts, controls, sim, settings, run.ui,
                                    prompt_images=base_images if label == "base" else None)
    data = audit_json(audits, "hardened", prompts, controls, sim, settings,
                      control_neurons=random_control(neurons, run.widths, run.recipe.seed).to_json()
                      if neurons else None)
    with atomic_folder(run.folder.file("audit")) as tmp:
        write_atomic(tmp / "audit.json", json.dumps(data, indent=2) + "\n")
        write_images(tmp, audits, prompts, FIGURE_COLUMNS)
    for line in table_lines({k: a.summary for k, a in audits.items()}):
        run.ui.log(f"audit: {line}")


def read_audit(folder: RunFolder) -> dict | None:
    """audit/audit.json of a run folder, or None when the audit did not run (not enabled)."""
    path = folder.file(AUDIT_FILE)
    return json.loads(path.read_text()) if path.is_file() else None


def audit_metrics(folder: RunFolder) -> dict:
    """The gate metrics of the hardened model (recipe.AUDIT_GATES); {} when no audit ran."""
    data = read_audit(folder)
    return {k: data["summary"][k] for k in AUDIT_GATES} if data else {}


_ROWS = (("prompt", "memorized images reproduced from their prompts (audit, share)"),
         ("paraphrase", "memorized images reproduced from a paraphrase (audit, share)"),
         ("attack", "memorized images recovered by the embedding attack (audit, share)"),
         ("control", "never-seen control images painted by the same attack (audit, share)"))


def audit_table(folder: RunFolder) -> list[dict]:
    """Rows for verify's before/after/control table (shares; `exact_mode` not audited)."""
    data = read_audit(folder)
    if not data:
        return []
    models = data["models"]
    column = {"before": "base", "after": "hardened", "control": "control"}

    def value(col, condition):
        label = column.get(col)
        return models[label]["summary"][f"{condition}_reproduced_fraction"] if label in models else None

    return [{"metric": name, **{c: value(c, cond) for c in ("before", "after", "control")}, "exact_mode": None,
             "better": "lower"} for cond, name in _ROWS]


def audit_report(folder: RunFolder) -> dict | None:
    """The audit for report.json: per model the summary and per-prompt rows without any prompt or paraphrase text
    (report.json is published with the export); targets by source and note only."""
    data = read_audit(folder)
    if not data:
        return None
    keep = ("index", "condition", "similarity", "seed", "reproduced", "best_start")
    return {"metric": data["metric"], "threshold": data["threshold"], "similarity": data["similarity"],
            "settings": data["settings"],
            "models": {label: {"summary": m["summary"], "rows": [{k: r[k] for k in keep if k in r}
                                                                for r in m["rows"]]}
                       for label, m in data["models"].items()},
            "targets": [{k: t[k] for k in ("index", "source", "note", "seed", "agreement")} for t in data["targets"]],
            "controls": len(data["controls"]), "figures": "audit/figures (run folder)"}

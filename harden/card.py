"""The model card (`README.md`) of an export: Hub metadata plus what harden did, measured and gated.

Why a card: a hardened model is only useful to others when its page says what was removed, how it was checked and
how to load it. The card never contains the memorized prompts (only their count and the sha256 of the list), nor
images generated from them, unless the recipe opted in with `publish_prompts`.

Metadata kept from the base model's card: `license` (+ `license_name`, `license_link`), `language`, `datasets` and
`tags`, because pruning changes none of them (the weights still derive from the same training data, under the same
license). Dropped: the base's own `base_model` (ours points at the base itself), `model-index`/`eval_results` and
`widget` (measured on or showing the unpruned model), `pipeline_tag`/`library_name` (set here), gating and inference
settings (repository settings, not facts about the weights).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from . import __version__

TAGS = ["harden", "memorization-mitigation", "pruned"]
KEPT_BASE_METADATA = ("license", "license_name", "license_link", "language", "datasets")
PLACEHOLDER_REPO = "ORG/NAME"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def write_card(folder: Path, report: dict, base_model_dir: Path | None) -> None:
    """Write `folder/README.md` (and nothing else) from the export's report and the base model's card, if any."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = Path(folder)
    base_meta = _base_card_metadata(Path(base_model_dir) if base_model_dir else None)
    base = report.get("base_model") or {}
    base_id, revision = base.get("id"), base.get("revision")
    hub = (report.get("recipe") or {}).get("hub") or {}
    license_ = hub.get("license") or base.get("license") or base_meta.get("license")

    extra = {k: base_meta[k] for k in ("license_name", "license_link") if base_meta.get(k) and
             license_ == base_meta.get("license")}
    if hub.get("license_name"):
        extra["license_name"] = hub["license_name"]
    if hub.get("license_link"):
        extra["license_link"] = hub["license_link"]
    is_hub_id = bool(base_id) and _is_hub_id(str(base_id))
    if is_hub_id and revision:
        extra["base_model_revision"] = revision
    data = ModelCardData(
        base_model=base_id if is_hub_id else None,
        license=license_,
        language=base_meta.get("language"),
        datasets=base_meta.get("datasets"),
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=_merge_tags(base_meta.get("tags"), repaired=bool(_repair(report.get("repair")))),
        **_model_index(report, hub, EvalResult),
        **extra,
    )
    context = _context(folder, report, base_id, is_hub_id, revision, license_, hub)
    template = resources.files("harden").joinpath("templates/modelcard.md").read_text(encoding="utf-8")
    card = ModelCard.from_template(data, template_str=template, c=context)
    (folder / "README.md").write_text(str(card), encoding="utf-8")


def _is_hub_id(value: str) -> bool:
    """A Hub repo id (`org/name`), as opposed to a local folder (which must not leak into public metadata)."""
    return bool(_HUB_ID.match(value)) and not Path(value).expanduser().exists()


def _base_card_metadata(base_model_dir: Path | None) -> dict:
    """The base card's metadata, or {} when there is no card or it cannot be parsed (then nothing is inherited)."""
    if base_model_dir is None or not (base_model_dir / "README.md").is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        meta = ModelCard.load(base_model_dir / "README.md", ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a broken base card must not block the export; the card then says "license: not stated"
        return {}
    kept = {k: meta[k] for k in KEPT_BASE_METADATA if meta.get(k)}
    if isinstance(meta.get("tags"), list):
        kept["tags"] = [str(t) for t in meta["tags"]]
    return kept


def _merge_tags(base_tags, repaired: bool) -> list[str]:
    tags = list(base_tags or [])
    ours = TAGS + (["adversarial-fine-tuning"] if repaired else [])
    return tags + [t for t in ours if t not in tags]


def _fmt(value) -> str:
    """Numbers with 4 significant digits, booleans as yes/no, missing as an em dash; safe inside a table cell."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _context(folder: Path, report: dict, base_id, is_hub_id: bool, revision, license_, hub: dict) -> dict:
    """Everything the template shows, preformatted, so the template stays layout only."""
    repo_id = hub.get("repo_id") or PLACEHOLDER_REPO
    if is_hub_id:
        base_text = f"[{base_id}](https://huggingface.co/{base_id})"
    elif base_id:
        base_text = f"a local model ({Path(str(base_id)).name})"  # never a local path: it may name private folders
    else:
        base_text = "an unnamed base model"

    mem = report.get("memorized_prompts") or {}
    prompts = {"count": mem.get("count", 0), "sha256": mem.get("sha256", "—"),
               "detected": mem.get("detected"), "not_reproducing": mem.get("not_reproducing")}
    published = []
    if report.get("publish_prompts"):
        published = [{"index": p.get("index"), "prompt": _fmt(p.get("prompt")),
                      "detect_score": _fmt(p.get("detect_score")), "memorized": _fmt(p.get("memorized")),
                      "neurons": _fmt(p.get("neurons")), "score_after": _fmt(p.get("score_after"))}
                     for p in report.get("prompts") or [] if p.get("prompt") is not None]

    neurons = report.get("neurons") or {}
    widths = neurons.get("layers_total") or {}
    rows = []
    for layer, removed in (neurons.get("per_layer") or {}).items():
        width = widths.get(layer)
        share = f"{100.0 * removed / width:.2f} %" if width else "—"
        rows.append({"layer": layer, "removed": removed, "width": _fmt(width), "share": share})
    total = neurons.get("total", sum(r["removed"] for r in rows))

    verification = (report.get("verification") or {}).get("rows") or []
    has_control = any(r.get("control") is not None for r in verification)
    has_exact = any(r.get("exact_mode") is not None for r in verification)  # fast mode's comparison
    has_pruned = any(r.get("pruned") is not None for r in verification)  # repair ran: the pruned-only column
    vrows = [{"metric": _fmt(r.get("metric")), "before": _fmt(r.get("before")), "after": _fmt(r.get("after")),
              "pruned": _fmt(r.get("pruned")),
              "control": _fmt(r.get("control")), "exact_mode": _fmt(r.get("exact_mode")),
              "better": _fmt(r.get("better"))} for r in verification]

    gates = [{"name": _fmt(g.get("name")), "metric": _fmt(g.get("metric")),
              "condition": f"{g.get('op', '')} {_fmt(g.get('threshold'))}", "value": _fmt(g.get("value")),
              "outcome": "passed" if g.get("passed") else "FAILED"} for g in report.get("gates") or []]
    failed = sum(1 for g in report.get("gates") or [] if not g.get("passed"))
    if report.get("passed") is None:
        outcome = "the gates were not evaluated."
    elif report["passed"]:
        outcome = f"all {len(gates)} gates passed."
    else:
        outcome = (f"{failed} of {len(gates)} gates FAILED: this model did not pass verification and must not be "
                   "released.")

    packages = report.get("packages") or {}
    return {
        "title": f"{repo_id.split('/')[-1] if repo_id != PLACEHOLDER_REPO else 'Hardened model'}",
        "repo_id": repo_id,
        "base_text": base_text,
        "base_revision": revision,
        "license_text": f"`{license_}`" if license_ else "not stated (check the base model's terms)",
        "harden_version": report.get("harden_version") or __version__,
        "recipe_sha256": report.get("recipe_sha256", "—"),
        "layout": report.get("layout", "dense"),
        "created": report.get("created_utc"),
        "git_commit": report.get("git_commit"),
        "packages": ", ".join(f"{k} {v}" for k, v in packages.items()),
        "prompts": prompts,
        "published_prompts": published,
        "neurons_total": total,
        "neuron_rows": rows,
        "neurons_figure": _figure(folder, "neurons_per_layer.png"),
        "heldout_figure": _figure(folder, "heldout_grid.png"),
        "verification_rows": vrows,
        "has_control": has_control,
        "has_exact": has_exact,
        "has_pruned": has_pruned,
        "repair": _repair(report.get("repair")),
        "mode_rows": _mode_rows((report.get("localization") or {}).get("compare")),
        "gates": gates,
        "outcome": outcome,
        "audit": _audit(folder, report),
    }


def _repair(repair: dict | None) -> dict | None:
    """What the card says about adversarial repair (harden.stages.repair), when it ran."""
    if not repair or repair.get("skipped"):
        return None
    settings = repair.get("settings") or {}
    return {"steps": repair.get("steps"), "optimizer": settings.get("optimizer"), "lr": _fmt(settings.get("lr")),
            "adv_weight": _fmt(settings.get("adv_weight")), "teacher": settings.get("teacher"),
            "retain": "user image-caption pairs" if settings.get("retain") else
            f"distillation towards the {settings.get('teacher')} model on its own generations",
            "train": settings.get("train"), "stopped_early": repair.get("stopped_early"),
            "minutes": _fmt((repair.get("seconds") or 0) / 60)}


AUDIT_METRICS = (("prompt", "memorized images reproduced from their prompts"),
                 ("paraphrase", "memorized images reproduced from paraphrases of their prompts"),
                 ("attack", "memorized images recovered by an embedding attack"),
                 ("control", "never-seen control images painted by the same attack"))


def _model_index(report: dict, hub: dict, eval_result) -> dict:
    """`model-index` results: the hardened model's audit rates (shares, lower is better), when an audit ran."""
    summary = (((report.get("audit") or {}).get("models") or {}).get("hardened") or {}).get("summary")
    if not summary:
        return {}
    mem = report.get("memorized_prompts") or {}
    dataset = f"{mem.get('count', summary['n'])} memorized prompts (sha256 {str(mem.get('sha256', '—'))[:12]})"
    results = [eval_result(task_type="text-to-image", dataset_type="harden/memorized-prompts", dataset_name=dataset,
                           metric_type=f"{condition}_reproduced_fraction", metric_name=name,
                           metric_value=summary[f"{condition}_reproduced_fraction"],
                           metric_config=f"{summary['metric']} >= {summary['threshold']:g}, best seed")
               for condition, name in AUDIT_METRICS if summary.get(f"{condition}_reproduced_fraction") is not None]
    name = (hub.get("repo_id") or "").split("/")[-1] or "hardened-model"
    return {"eval_results": results, "model_name": name} if results else {}


def _audit(folder: Path, report: dict) -> dict | None:
    """The audit table (k of n per model) and the card's wording, which follows the measurement: *removed* only when
    the attack gate passed; otherwise what the prompts and the attack still give back."""
    audit = report.get("audit")
    models = (audit or {}).get("models") or {}
    hard = (models.get("hardened") or {}).get("summary")
    if not hard:
        return None
    columns = [label for label in ("base", "hardened", "control") if label in models]

    def cell(label, condition):
        s = models[label]["summary"]
        total = s["control_n"] if condition == "control" else s["n"]
        return f"{s[f'{condition}_reproduced']} of {total}" if total else "—"

    rows = [{"name": name, "cells": [cell(label, condition) for label in columns]}
            for condition, name in AUDIT_METRICS]
    n, k, p = hard["n"], hard["attack_reproduced"], hard["prompt_reproduced"]
    gate = next((g for g in report.get("gates") or [] if g.get("name") == "attack_reproduced_fraction"), None)
    passed = gate is not None and gate.get("passed")
    if passed and k == 0 and p == 0 and not hard.get("inconclusive"):
        verdict = (f"The {n} audited memorized images were **removed**: neither their prompts nor the embedding "
                   f"attack bring any of them back (attack gate {gate.get('op')} {_fmt(gate.get('threshold'))} "
                   "passed).")
    else:
        start = ("The memorized images are no longer reproduced from the listed prompts" if p == 0 else
                 f"{p} of {n} memorized images are still reproduced from the listed prompts")
        verdict = f"{start}; recoverable by an embedding attack for {k} of {n}."
        if passed:
            verdict += f" (The release gate allows this: attack share {gate.get('op')} {_fmt(gate.get('threshold'))}.)"
    notes = []
    if hard.get("inconclusive"):
        notes.append(f"The audit is **inconclusive**: the same attack also painted {hard['control_reproduced']} of "
                     f"{hard['control_n']} images the model never saw (bound {_fmt(hard['control_bound'])}).")
    elif not hard.get("control_n"):
        notes.append("No control images were given, so the attack's power on images the model never saw is unknown.")
    if hard.get("not_audited"):
        notes.append(f"{hard['not_audited']} prompt(s) were not audited: the base model draws no consistent image "
                     "for them.")
    settings = audit.get("settings") or {}
    attack = settings.get("attack") or {}
    method = (f"{audit.get('similarity', audit.get('metric'))} to the target >= {_fmt(audit.get('threshold'))} at the "
              f"best of {len(settings.get('seeds') or [])} seeds; attack: Adam, lr {_fmt(attack.get('lr'))}, "
              f"{attack.get('steps')} steps, batch {attack.get('batch')}, from the prompt's embedding and "
              f"{attack.get('restarts')} random start(s)")
    figures = sorted(f.relative_to(folder).as_posix() for f in (folder / "harden/figures/audit").glob("*.png"))
    return {"columns": columns, "rows": rows, "verdict": verdict, "notes": notes, "method": method,
            "figures": figures}


def _mode_rows(compare: dict | None) -> list[dict]:
    """Fast vs exact mode rows (localize/compare.json), when the run localized in fast mode with a comparison."""
    if not compare:
        return []
    names = [("prompts", None), ("neurons per prompt (median)", "neurons_median"),
             ("neurons per prompt (max)", "neurons_max"), ("neurons in the union", "union"),
             ("final score (mean)", "score_mean"), ("final score (max)", "score_max"),
             ("prompts below their threshold", "below_threshold"), ("UNet forwards", "unet_forwards"),
             ("sample-forwards", "sample_forwards"), ("seconds", "seconds")]
    return [{"name": name, "fast": _fmt(compare["prompts"] if key is None else compare["fast"].get(key)),
             "exact": _fmt(compare["prompts"] if key is None else compare["exact"].get(key))} for name, key in names]


def _figure(folder: Path, name: str) -> str | None:
    """Relative link to a figure of the export, if it was written (held-out prompts only, never memorized ones)."""
    path = f"harden/figures/{name}"
    return path if (folder / path).is_file() else None

"""report.json: what a run did and measured, rebuilt from the run folder's artifacts.

Why from the artifacts (not from memory): a resumed run has no memory of the stages it skipped; the artifacts are
the single source of truth.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import time
from pathlib import Path

from .. import __version__
from ..loading import hub_commit
from ..prompts import prompts_sha256
from .audit import audit_report
from .context import Run
from .folder import load_results, read_neurons

PACKAGES = ("torch", "diffusers", "transformers", "huggingface_hub", "safetensors", "torchmetrics", "scikit-image")


def _versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    """The commit of harden's own checkout, when it runs from one (editable installs)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def redacted_recipe(run: Run) -> dict:
    """The recipe as resolved (defaults filled in), with inline memorized prompts replaced by their count + hash."""
    data = run.recipe.model_dump(mode="json")
    if not run.recipe.export.publish_prompts and data["memorized"].get("prompts") is not None:
        data["memorized"]["prompts"] = (f"<{len(run.inputs.memorized)} prompts, sha256 "
                                        f"{prompts_sha256(run.inputs.memorized)}; not published>")
    return data


def build_report(run: Run) -> dict:
    """report.json (schema 1) without `layout` and `files`, which are per export folder."""
    folder, recipe = run.folder, run.recipe
    publish = recipe.export.publish_prompts
    calibration = folder.read_json("calibrate/calibration.json")
    detection = folder.read_json("detect/detection.json")
    verification = folder.read_json("verify/verification.json")
    neurons = read_neurons(folder.file("localize", "neurons.json"))
    results = dict(load_results(folder))
    prompts = []
    for row, item in zip(detection["prompts"], verification["memorized"]):
        i = row["index"]
        p = run.inputs.memorized[i]
        entry = {"index": i, "sha256": prompts_sha256([p]), "detect_score": row["score"],
                 "memorized": row["memorized"], **{k: v for k, v in item.items() if k not in ("index", "detected")}}
        if i in results:
            res = results[i].to_json()
            res.pop("prompt")
            entry.update(neurons=len(results[i].refined), localization=res)
        if publish:
            entry["prompt"] = p.text
        prompts.append(entry)
    stages = folder.state["stages"]
    widths = run.widths
    loc = recipe.localization
    return {
        "schema": 1,
        "harden_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "packages": _versions(),
        "recipe_sha256": run.inputs.loaded.sha256,
        "recipe": redacted_recipe(run),
        "base_model": {"id": recipe.model.id if run.model_dir is None else str(run.model_dir),
                       "hub_id": recipe.model.id if run.model_dir is None else None,
                       "revision": recipe.model.revision,
                       "commit": hub_commit(recipe.model.id, recipe.model.revision) if run.model_dir is None else None,
                       "variant": recipe.model.variant,
                       "license": recipe.hub.license if recipe.hub else None},
        "memorized_prompts": {"count": len(run.inputs.memorized), "sha256": prompts_sha256(run.inputs.memorized),
                              "detected": sum(r["memorized"] for r in detection["prompts"]),
                              "not_reproducing": sum(not r["memorized"] for r in detection["prompts"])},
        "publish_prompts": publish,
        "thresholds": {"tau_mem": calibration["tau_mem"], "detection": detection["threshold"],
                       "seed_threshold": detection["threshold"], "tau_initial": run.threshold(loc.tau_initial),
                       "tau_refine": run.threshold(loc.tau_refine)},
        "calibration": {k: calibration[k] for k in ("n_statistics", "n_tau", "mean", "std")},
        "localization": {"mode": loc.mode,
                         "unet_forwards": sum(r.unet_forwards for r in results.values()),
                         "sample_forwards": sum(r.sample_forwards for r in results.values()),
                         "compare": (run.folder.read_json("localize/compare.json")
                                     if run.folder.file("localize", "compare.json").exists() else None)},
        "neurons": {"total": len(neurons), "per_layer": neurons.counts(), "layers_total": widths},
        "prompts": prompts,
        "verification": {"rows": verification["rows"], "metrics": verification["metrics"],
                         "held_out": verification["held_out"], "control_neurons": verification["control_neurons"],
                         "generation": verification["generation"],
                         "exact_mode_metrics": verification.get("exact_mode_metrics")},
        "audit": audit_report(folder),
        "gates": verification["gates"],
        "passed": verification["passed"],
        "timings_s": {name: s.get("seconds") for name, s in stages.items()},
        "seeds": verification["seeds"],
        "device": str(run.pipe.device),
    }

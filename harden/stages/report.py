"""report.json: what a run did and measured, rebuilt from the run folder's artifacts.

Why from the artifacts (not from memory): a resumed run has no memory of the stages it skipped; the artifacts are
the single source of truth.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path, PurePath

from .. import __version__
from ..loading import hub_commit
from ..prompts import prompts_sha256
from ..recipe import PACKAGE_PREFIX
from ..scrub import scrub_data
from .audit import audit_report
from .context import Run
from .folder import load_results, read_neurons
from .repair import repair_report

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


KEY_FILE = "report.key"  # in the run folder, never in an export: the key of the per-caption HMACs


def caption_key(run: Run) -> bytes:
    """The run's secret for per-caption HMACs, made once (0600) and kept in the run folder, so that whoever ran it
    can match report entries to captions and nobody holding only the export can test a guessed caption."""
    path = run.folder.file(KEY_FILE)
    if not path.is_file():
        fd, tmp = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=path.parent)  # 0600
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        os.replace(tmp, path)
    return bytes.fromhex(path.read_text().strip())


def caption_hmac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _is_local_path(value) -> bool:
    return isinstance(value, str) and (os.path.isabs(value) or value.startswith("~") or ".." in PurePath(value).parts
                                       or bool(re.match(r"^[A-Za-z]:[\\/]", value)))


def _without_local_paths(value):
    """Paths of this machine reduced to their last part: exports never carry the local folders above it."""
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v) for v in value]
    return (PurePath(value).name or value) if _is_local_path(value) else value


def base_model_name(run: Run) -> str:
    """The base model as exports name it: its Hub id, `zoo:NAME`, or a local folder's own name (never its path)."""
    model_id = run.recipe.model.id
    if run.model_dir is None or model_id.startswith(PACKAGE_PREFIX):
        return model_id
    return run.model_dir.name


def redacted_recipe(run: Run) -> dict:
    """The recipe as resolved (defaults filled in), with inline memorized prompts replaced by their count + hash,
    local paths reduced to their last part, and credentials in URLs removed."""
    data = run.recipe.model_dump(mode="json")
    if not run.recipe.export.publish_prompts and data["memorized"].get("prompts") is not None:
        data["memorized"]["prompts"] = (f"<{len(run.inputs.memorized)} prompts, sha256 "
                                        f"{prompts_sha256(run.inputs.memorized)}; not published>")
    data = _without_local_paths(data)
    data["model"]["id"] = base_model_name(run)
    return scrub_data(data)


def build_report(run: Run) -> dict:
    """report.json (schema 1) without `layout` and `files`, which are per export folder."""
    folder, recipe = run.folder, run.recipe
    publish = recipe.export.publish_prompts
    calibration = folder.read_json("calibrate/calibration.json")
    detection = folder.read_json("detect/detection.json")
    verification = folder.read_json("verify/verification.json")
    neurons = read_neurons(folder.file("localize", "neurons.json"))
    results = dict(load_results(folder))
    key = caption_key(run)
    prompts = []
    for row, item in zip(detection["prompts"], verification["memorized"]):
        i = row["index"]
        p = run.inputs.memorized[i]
        entry = {"index": i, "caption_hmac": caption_hmac(key, p.text), "detect_score": row["score"],
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
    return scrub_data({  # no token or URL credential reaches report.json or the card made from it
        "schema": 1,
        "harden_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "packages": _versions(),
        "recipe_sha256": run.inputs.loaded.sha256,
        "recipe": redacted_recipe(run),
        "base_model": {"id": base_model_name(run),
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
        "repair": repair_report(folder),
        "audit": audit_report(folder),
        "gates": verification["gates"],
        "passed": verification["passed"],
        "timings_s": {name: s.get("seconds") for name, s in stages.items()},
        "seeds": verification["seeds"],
        "device": str(run.pipe.device),
    })

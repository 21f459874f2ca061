"""The export stage: pipeline folders with `harden/report.json`, neurons, the resolved recipe, figures and a card.

Why the report is rebuilt from the run folder's artifacts (not from memory): a resumed run has no memory of the
stages it skipped; the artifacts are the single source of truth.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from . import __version__
from .errors import HardenError
from .export import atomic_folder, file_hashes, save_pipeline, write_atomic
from .prompts import prompts_sha256
from .runner import hardened_unets, load_results, read_neurons, write_neurons
from .targets import latent_size

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
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def redacted_recipe(run) -> dict:
    """The recipe as resolved (defaults filled in), with inline memorized prompts replaced by their count + hash."""
    data = run.recipe.model_dump(mode="json")
    if not run.recipe.export.publish_prompts and data["memorized"].get("prompts") is not None:
        data["memorized"]["prompts"] = (f"<{len(run.inputs.memorized)} prompts, sha256 "
                                        f"{prompts_sha256(run.inputs.memorized)}; not published>")
    return data


def build_report(run) -> dict:
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
    widths = {t.name: t.width for t in run.targets}
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
        "gates": verification["gates"],
        "passed": verification["passed"],
        "timings_s": {name: s.get("seconds") for name, s in stages.items()},
        "seeds": verification["seeds"],
        "device": str(run.pipe.device),
    }


# -------------------------------------------------------------------------------------------------------- figures


def neurons_per_layer_png(path: Path, counts: dict[str, int], widths: dict[str, int]) -> None:
    """A horizontal bar per target layer: neurons removed (and the layer's width), drawn with PIL (no matplotlib)."""
    from PIL import Image, ImageDraw

    names = list(widths)
    top = max([1, *counts.values()])
    row, label_w, bar_w = 18, 330, 300
    img = Image.new("RGB", (label_w + bar_w + 90, row * (len(names) + 2)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), f"neurons removed per layer (total {sum(counts.values())})", fill="black")
    for i, name in enumerate(names):
        y = row * (i + 1) + 4
        n = counts.get(name, 0)
        draw.text((4, y), name.replace("_blocks.", ".").replace(".attentions.", ".a")[-52:], fill="black")
        draw.rectangle([label_w, y, label_w + max(1, int(bar_w * n / top)), y + row - 6],
                       fill="#c0392b" if n else "#dddddd")
        draw.text((label_w + bar_w + 6, y), f"{n} / {widths[name]}", fill="black")
    img.save(path)


def heldout_grid_png(path: Path, pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """One row per held-out prompt: base | hardened at the same seed."""
    from PIL import Image, ImageDraw

    if not pairs:
        return
    h, w = pairs[0][1].shape[:2]
    scale = max(1, 128 // max(h, w))
    cell_h, cell_w, label = h * scale, w * scale, 16
    img = Image.new("RGB", (2 * cell_w + 12, (cell_h + label) * len(pairs) + label), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), "base", fill="black")
    draw.text((cell_w + 8, 2), "hardened", fill="black")
    for i, (caption, base, hard) in enumerate(pairs):
        y = label + i * (cell_h + label)
        for j, arr in enumerate((base, hard)):
            tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
            img.paste(tile, (j * (cell_w + 8), y))
        draw.text((4, y + cell_h + 2), caption[:60], fill="black")
    img.save(path)


def _heldout_pairs(run) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from PIL import Image

    seed = run.recipe.verify.seeds[0]
    out = []
    for j, prompt in enumerate(run.inputs.held_out[:8]):
        base = run.folder.file("verify", "images", f"heldout_{j:06d}_seed{seed}_before.png")
        hard = run.folder.file("verify", "images", f"heldout_{j:06d}_seed{seed}_after.png")
        if base.exists() and hard.exists():
            out.append((prompt.text, np.asarray(Image.open(base)), np.asarray(Image.open(hard))))
    return out


# --------------------------------------------------------------------------------------------------------- export


@torch.no_grad()
def reload_check(folder: Path, layout: str, unet: torch.nn.Module, embeds: torch.Tensor, timestep: int) -> float:
    """Load the exported pipeline as a user would and return max|UNet output - in-memory hardened output|."""
    from diffusers import DiffusionPipeline

    param = next(unet.parameters())
    kwargs = {"trust_remote_code": True} if layout == "compact" else {}
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=param.dtype, use_safetensors=True, **kwargs)
    loaded = pipe.unet.to(param.device).eval()
    x = torch.randn((len(embeds), unet.config.in_channels, *latent_size(unet)),
                    generator=torch.Generator().manual_seed(0))
    x, ctx = x.to(param.device, param.dtype), embeds.to(param.device, param.dtype)
    expected = unet(x, timestep, encoder_hidden_states=ctx).sample
    got = loaded(x, timestep, encoder_hidden_states=ctx).sample
    return float((expected.float() - got.float()).abs().max())


def reload_tolerance(unet) -> float:
    """Reloaded weights are bit-identical; only half-precision kernels may round differently."""
    return 1e-5 if next(unet.parameters()).dtype == torch.float32 else 1e-2


def export_all(run) -> None:
    """Each layout into run/export/<layout>, built in a temporary folder, checked by reloading, then renamed."""
    from . import card

    base_report = build_report(run)
    neurons = read_neurons(run.folder.file("localize", "neurons.json"))
    widths = {t.name: t.width for t in run.targets}
    unets = hardened_unets(run)
    probe = run.inputs.held_out[:2] or run.inputs.references[:2]
    embeds = run.embeds(probe)
    timestep = run.scorer().timestep
    tolerance = reload_tolerance(run.pipe.unet)
    for layout, unet in unets.items():
        target = run.folder.file("export", layout)
        with atomic_folder(target) as tmp:
            save_pipeline(run.pipe, unet, tmp, layout)
            meta = tmp / "harden"
            meta.mkdir()
            write_neurons(meta / "neurons.json", neurons)
            write_atomic(meta / "recipe.yaml", yaml.safe_dump(redacted_recipe(run), sort_keys=False))
            if run.recipe.export.figures:
                (meta / "figures").mkdir()
                neurons_per_layer_png(meta / "figures" / "neurons_per_layer.png", neurons.counts(), widths)
                heldout_grid_png(meta / "figures" / "heldout_grid.png", _heldout_pairs(run))
            diff = reload_check(tmp, layout, unet, embeds, timestep)
            if not diff <= tolerance:
                raise HardenError(f"the {layout} export does not reproduce the hardened model (max|diff| {diff:.3g})",
                                  "this is a bug in harden; please report it with the run folder")
            report = copy.deepcopy(base_report)
            report["layout"] = layout
            report["export_check"] = {"max_abs_diff": diff, "tolerance": tolerance,
                                      "loaded_with": "trust_remote_code" if layout == "compact" else "stock"}
            card.write_card(tmp, report, run.model_dir)
            report["files"] = file_hashes(tmp, exclude={"harden/report.json", "README.md"})
            write_atomic(meta / "report.json", json.dumps(report, indent=2) + "\n")
        run.ui.log(f"exported the {layout} layout to {target} (reload max|diff| {diff:.2e})")

"""Stage 5, verify: the hardened model against the base (and a random-neuron control) at fixed seeds, and the gates.

Writes verify/verification.json and verify/images/. Metrics are computed by harden.metrics (pure functions);
this stage drives the pipeline: generation, images on disk, progress.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from ..generation import generate, images_per_call, swapped_unet
from ..metrics import ClipScorer, best_of_seeds_ssim, evaluate_gates, load_reference, random_control, ssim
from ..neurons import NeuronSet
from ..prune import prune_dense
from ..zoo.alignment import alignment
from .audit import audit_metrics, audit_table
from .context import Run
from .folder import read_neurons


def _alignment_fn(model_dir: Path | None):
    """The shipped organism's weight-free alignment metric, when the base model is (a retrain of) it."""
    if model_dir is None or not (model_dir / "harden_zoo.json").is_file():
        return None
    return alignment


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _save_images(folder: Path, stem: str, seeds, images: dict[str, list[np.ndarray]]) -> None:
    for name, batch in images.items():
        for seed, img in zip(seeds, batch):
            _save_png(folder / f"{stem}_seed{seed}_{name}.png", img)


def _held_row(j: int, text: str, held_scores: dict, variants, imgs: dict[str, list[np.ndarray]], align, clip) -> dict:
    """One held-out prompt's scores, SSIM of each variant to the base at the same seeds, alignment and CLIP."""
    row = {"index": j, "prompt": text, "score_before": held_scores["before"][j],
           **{f"score_{name}": held_scores[name][j] for name in variants}}
    for name in variants:
        row[f"ssim_base_vs_{name}"] = [ssim(a, b) for a, b in zip(imgs["before"], imgs[name])]
    if align is not None:
        for name, batch in imgs.items():
            values = [align(img, text) for img in batch]
            row[f"alignment_{name}"] = statistics.fmean(values) if None not in values else None
    if clip is not None:
        for name, batch in imgs.items():
            row[f"clip_{name}"] = statistics.fmean(clip(batch, text))
    return row


def verify(run: Run) -> None:
    """Measure, gate, write verify/verification.json and log the outcome (a failed gate fails the run later)."""
    data = measure(run)
    run.folder.write_json("verify/verification.json", data)
    failed = [g["name"] for g in data["gates"] if not g["passed"]]
    run.ui.log(f"verification: {len(data['gates']) - len(failed)} of {len(data['gates'])} gates passed"
               + (f"; failed: {', '.join(failed)}" if failed else ""))


def measure(run: Run) -> dict:
    r = run.recipe.verify
    loc = run.recipe.localization
    neurons = read_neurons(run.folder.file("localize", "neurons.json"))
    unets = run.hardened_unets()
    hardened = unets.get("compact", unets.get("dense"))
    control = random_control(neurons, run.widths, run.recipe.seed) if r.control and neurons else None
    variants = {"after": hardened}
    if run.repaired:  # the table's "pruned only" column; the gates apply to "after", the released (repaired) model
        pruned = run.pruned_unets()
        variants["pruned"] = pruned.get("compact", pruned.get("dense"))
    if control is not None:
        variants["control"] = prune_dense(run.pipe.unet, control)
    compared = loc.mode == "fast" and loc.compare and not run.folder.state["stages"]["localize"].get("given")
    exact_neurons = read_neurons(run.folder.file("localize", "exact_neurons.json")) if compared else None
    if exact_neurons is not None:
        variants["exact_mode"] = prune_dense(run.pipe.unet, exact_neurons)

    detection = run.folder.read_json("detect/detection.json")
    threshold = detection["threshold"]
    memorized = run.inputs.memorized
    before = [row["score"] for row in detection["prompts"]]
    detected = [row["index"] for row in detection["prompts"] if row["memorized"]]
    scores = {"before": before}
    with run.ui.stage("verify: memorization score", len(memorized) * len(variants)) as advance:
        for name, unet in variants.items():
            scores[name] = run.scores(run.scorer(unet, []), memorized, advance)
    per_prompt = [{"index": i, "detected": i in detected, "score_before": scores["before"][i],
                   "score_control": None, **{f"score_{name}": scores[name][i] for name in variants}}
                  for i in range(len(memorized))]

    held = run.inputs.held_out
    held_scores = {}
    if held:
        with run.ui.stage("verify: held-out score", len(held) * (1 + len(variants))) as advance:
            held_scores["before"] = run.scores(run.scorer(run.pipe.unet, []), held, advance)
            for name, unet in variants.items():
                held_scores[name] = run.scores(run.scorer(unet, []), held, advance)

    images_dir = run.folder.file("verify", "images")
    gen = {"steps": r.steps, "guidance": r.guidance_scale, "height": r.height, "width": r.width}
    with_images = [i for i, p in enumerate(memorized) if p.image is not None]
    held_rows = []
    if r.generate:
        variants_gen = {"before": run.pipe.unet, **variants}
        texts = [memorized[i].text for i in with_images] + [p.text for p in held]
        align = _alignment_fn(run.model_dir)
        clip = ClipScorer(r.clip_model, run.pipe.device) if r.clip_model else None
        per_call = r.batch_images or images_per_call(run.pipe, r.height, r.width)
        step = max(1, per_call // len(r.seeds))  # prompts per pipeline call; only their images are held in memory
        with run.ui.stage("verify: generation", len(texts) * len(variants_gen)) as advance:
            for start in range(0, len(texts), step):
                part = texts[start:start + step]
                images = {}  # variant -> [prompt of this part][seed]
                for name, unet in variants_gen.items():
                    with swapped_unet(run.pipe, unet):
                        images[name] = generate(run.pipe, part, r.seeds, **gen, batch_images=per_call,
                                                advance=advance)
                for k in range(start, start + len(part)):
                    imgs = {name: images[name][k - start] for name in variants_gen}
                    if k < len(with_images):
                        i = with_images[k]
                        _save_images(images_dir, f"memorized_{i:06d}", r.seeds, imgs)
                        ref = load_reference(memorized[i].image, imgs["before"][0].shape[:2])
                        for name in variants_gen:
                            per_prompt[i][f"ssim_to_reference_{name}"] = best_of_seeds_ssim(imgs[name], ref)
                    else:
                        j = k - len(with_images)
                        _save_images(images_dir, f"heldout_{j:06d}", r.seeds, imgs)
                        held_rows.append(_held_row(j, held[j].text, held_scores, variants, imgs, align, clip))

    if held and not r.generate:
        held_rows = [{"index": j, "prompt": p.text, "score_before": held_scores["before"][j],
                      **{f"score_{name}": held_scores[name][j] for name in variants}} for j, p in enumerate(held)]
    metrics, rows = _metrics(per_prompt, detected, threshold, held_rows, neurons, variants)
    metrics.update(audit_metrics(run.folder))  # the audit stage's reproduction rates of the hardened model
    rows += audit_table(run.folder)
    tau_mem = run.threshold("tau_mem")
    gates = evaluate_gates(metrics, r.gates, tau_mem)
    out = {"threshold": threshold, "tau_mem": tau_mem, "seeds": {"detection": run.recipe.detection.seed,
                                                                 "generation": list(r.seeds),
                                                                 "control": run.recipe.seed},
           "control_neurons": control.to_json() if control is not None else None,
           "metrics": metrics, "rows": rows, "gates": gates, "passed": all(g["passed"] for g in gates),
           "memorized": per_prompt, "held_out": held_rows, "generation": gen}
    if exact_neurons is not None:  # the gate metrics of the model exact mode would have produced, same seeds
        out["exact_mode_metrics"] = _gate_metrics(per_prompt, detected, threshold, held_rows, exact_neurons,
                                                  "exact_mode")
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _gate_metrics(per_prompt, detected, threshold, held_rows, neurons: NeuronSet, name: str = "after") -> dict:
    """Gate metrics (see recipe.GATE_METRICS) of one pruned variant ("after", or "exact_mode" in a comparison)."""
    after = [p[f"score_{name}"] for p in per_prompt]
    det_after = [per_prompt[i][f"score_{name}"] for i in detected]
    ssim_ref = [p[f"ssim_to_reference_{name}"] for p in per_prompt if f"ssim_to_reference_{name}" in p]
    held_ssim = [v for row in held_rows for v in row.get(f"ssim_base_vs_{name}", [])]

    def drop(key):
        b, a = _mean(r.get(f"{key}_before") for r in held_rows), _mean(r.get(f"{key}_{name}") for r in held_rows)
        return None if a is None or b is None else b - a

    return {
        "memorized_score_after_max": max(after) if after else None,
        "memorized_score_after_mean": _mean(after),
        "mitigated_fraction": (sum(s <= threshold for s in det_after) / len(det_after)) if det_after else 1.0,
        "memorized_ssim_after_max": max(ssim_ref) if ssim_ref else None,
        "heldout_ssim_median": statistics.median(held_ssim) if held_ssim else None,
        "heldout_ssim_min": min(held_ssim) if held_ssim else None,
        "heldout_alignment_drop": drop("alignment"),
        "heldout_clip_drop": drop("clip"),
        "neurons_total": float(len(neurons)),
    }


# table columns: base, pruned only (when repair ran), hardened (the released model), random control, exact mode
COLUMNS = ("before", "pruned", "after", "control", "exact_mode")


def _metrics(per_prompt, detected, threshold, held_rows, neurons: NeuronSet, variants) -> tuple[dict, list]:
    """Gate metrics of the hardened model and the before/after/control(/exact mode) table for report and card."""
    metrics = _gate_metrics(per_prompt, detected, threshold, held_rows, neurons)
    shown = [c for c in COLUMNS if c == "before" or c in variants]

    def row(metric, better, fn):
        return {"metric": metric, **{c: (fn(c) if c in shown else None) for c in COLUMNS}, "better": better}

    def ssim_ref(c):
        return [p[f"ssim_to_reference_{c}"] for p in per_prompt if f"ssim_to_reference_{c}" in p]

    def held(c):
        return [v for r in held_rows for v in r.get(f"ssim_base_vs_{c}", [])]

    rows = [
        row("NeMo score, memorized prompts (mean)", "lower", lambda c: _mean(p[f"score_{c}"] for p in per_prompt)),
        row("NeMo score, memorized prompts (max)", "lower", lambda c: max(p[f"score_{c}"] for p in per_prompt)),
        row(f"memorized prompts above the threshold ({threshold:.3f})", "lower",
            lambda c: float(sum(p[f"score_{c}"] > threshold for p in per_prompt))),
    ]
    if ssim_ref("before"):
        rows.append(row("best-of-seeds SSIM to the training image (max)", "lower", lambda c: max(ssim_ref(c))))
        rows.append(row("best-of-seeds SSIM to the training image (mean)", "lower", lambda c: _mean(ssim_ref(c))))
    if held("after"):
        rows.append(row("held-out SSIM to the base model (median)", "higher",
                        lambda c: 1.0 if c == "before" else statistics.median(held(c))))
    if held_rows:
        rows.append(row("held-out NeMo score (mean)", "lower", lambda c: _mean(r[f"score_{c}"] for r in held_rows)))
        for key, label in (("alignment", "held-out alignment (mean)"), ("clip", "held-out CLIP score (mean)")):
            if any(f"{key}_before" in r for r in held_rows):
                rows.append(row(label, "higher", lambda c: _mean(r.get(f"{key}_{c}") for r in held_rows)))
    return metrics, rows

"""Stage 1, calibrate: per-neuron activation statistics over the reference prompts, and tau_mem.

Writes calibrate/stats.safetensors (mean/std per value channel; text encoder + to_v only, no UNet forward) and
calibrate/calibration.json (tau_mem = mean + 1 std of the first N references' NeMo scores).
"""

from __future__ import annotations

import torch

from ..files import save_tensors_atomic
from ..nemo.score import calibrate_threshold
from ..nemo.conditioning import iter_encoded
from ..nemo.stats import compute_stats
from .context import Run


def calibrate(run: Run) -> None:
    """Per-neuron mean/std over all reference prompts (text encoder + to_v only), tau_mem over the first N."""
    refs = run.inputs.references
    with run.ui.stage("calibrate: statistics", len(refs)) as advance:
        batches = iter_encoded(run.pipe, [p.text for p in refs], run.recipe.reference.batch_size)
        stats = compute_stats(batches, run.targets, progress=advance)
    tau_refs = refs[:run.recipe.reference.tau_prompts]
    with run.ui.stage("calibrate: tau_mem", len(tau_refs)) as advance:
        scores = run.scores(run.scorer(), tau_refs, advance)
    tau = calibrate_threshold(torch.tensor(scores))
    save_tensors_atomic(run.folder.file("calibrate", "stats.safetensors"), stats.to_tensors())
    run.folder.write_json("calibrate/calibration.json", {
        "tau_mem": tau, "n_statistics": len(refs), "n_tau": len(tau_refs), "reference_scores": scores,
        "mean": float(torch.tensor(scores).mean()), "std": float(torch.tensor(scores).std()),
    })
    run.ui.log(f"calibrated on {len(refs)} reference prompts; tau_mem = {tau:.4f} (from {len(tau_refs)})")

"""Stage 2, detect: the NeMo score of every memorized prompt; memorized when above the detection threshold.

Writes detect/detection.json, and (up to UNBLOCKED_CACHE_BYTES) the unblocked noise deltas that localization
would otherwise recompute per prompt.
"""

from __future__ import annotations

from ..files import save_tensors_atomic
from .context import Run
from .folder import UNBLOCKED_FILE

UNBLOCKED_CACHE_BYTES = 1 << 30  # detection saves the unblocked deltas for localization up to this size


def detect(run: Run) -> None:
    """NeMo score of every memorized prompt at the detection seeds; memorized when > the detection threshold."""
    prompts = run.inputs.memorized
    threshold = run.threshold(run.recipe.detection.threshold)
    scorer = run.scorer()
    latent = scorer.latents[0].numel() * scorer.settings.n_seeds * 4  # bytes of one prompt's fp32 deltas
    deltas: list | None = [] if latent * len(prompts) <= UNBLOCKED_CACHE_BYTES else None
    with run.ui.stage("detect", len(prompts)) as advance:
        scores = run.scores(scorer, prompts, advance, deltas)
    if deltas is not None:  # localization (also a resumed one) reads these instead of recomputing them per prompt
        save_tensors_atomic(run.folder.file("detect", UNBLOCKED_FILE), {str(i): d for i, d in enumerate(deltas)})
    rows = [{"index": i, "score": s, "memorized": s > threshold} for i, s in enumerate(scores)]
    run.folder.write_json("detect/detection.json", {"threshold": threshold, "prompts": rows})
    n = sum(r["memorized"] for r in rows)
    run.ui.log(f"detected {n} of {len(rows)} prompts as reproducing memorized content (threshold {threshold:.4f})")
    if n < len(rows):
        run.ui.log(f"{len(rows) - n} prompts do not reproduce memorization; they are reported, not localized")

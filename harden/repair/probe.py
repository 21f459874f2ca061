"""The quick audit probe behind repair's early stop: generate from the latest attack embeddings and the prompt
embeddings at a few seeds, and count the memorized images still reproduced (the audit's similarity and threshold).

Why these embeddings: they were just re-optimized against the current weights (the inner loop of the repair), so
the probe costs only generation; it is weaker than the audit's fresh attack, which is why the stop rule asks for
at most `stop_at` (default 0) reproduced images and the released model is audited in full afterwards anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..audit.similarity import Similarity
from .sampling import decode_latents, sample_latents


@dataclass
class Probe:
    pipe: object
    targets: list[np.ndarray]  # per repaired prompt, the image it must not give
    similarity: Similarity
    seeds: Sequence[int]
    steps: int
    guidance: float

    def __call__(self, unet, embeds: list[torch.Tensor]) -> dict:
        """embeds[p]: [E, L, D] embeddings of prompt p; returns the best similarity per prompt and the count."""
        flat = torch.cat(embeds)
        owner = [p for p, e in enumerate(embeds) for _ in range(len(e))]
        was_training = unet.training
        unet.eval()
        try:
            latents = sample_latents(self.pipe, unet, flat, self.seeds, self.steps, self.guidance)
        finally:
            unet.train(was_training)
        best = [0.0] * len(embeds)
        for k, lat in enumerate(latents):
            for img in decode_latents(self.pipe, lat):
                best[owner[k]] = max(best[owner[k]], self.similarity(img, self.targets[owner[k]]))
        return {"best": [round(b, 4) for b in best],
                "reproduced": sum(b >= self.similarity.threshold for b in best)}

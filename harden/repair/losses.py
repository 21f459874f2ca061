"""The two halves of repair's loss, drawn as one batch so that each training step is a single UNet forward.

L_retain: distillation (match the teacher's stored prediction at the pool's x_t, t, caption) or, for user pairs,
the ordinary diffusion loss. L_adv: the diffusion loss of each memorized prompt's *surrogate* latent under that
prompt's adversarial embeddings (prompt, paraphrases, current and replayed attack embeddings): the model learns to
answer every embedding that drew the memorized image with something else (dori.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..audit.attack import diffusion_targets
from .data import RetainData


@dataclass
class Batch:
    x: torch.Tensor  # [B, C, h, w] noisy latents
    t: torch.Tensor  # [B]
    cond: torch.Tensor  # [B, L, D]
    target: torch.Tensor  # [B, C, h, w]
    n_retain: int  # the first n_retain samples are retain samples, the rest adversarial


def retain_batch(data: RetainData, scheduler, batch: int, generator: torch.Generator):
    """(x, t, cond, target) of `batch` retain samples."""
    if data.kind == "distill":
        idx = torch.randint(0, len(data.latents), (batch,), generator=generator)
        return data.latents[idx], data.timesteps[idx], data.captions[data.caption_index[idx]], data.targets[idx]
    idx = torch.randint(0, len(data.latents), (batch,), generator=generator)
    noise = torch.randn((batch, *data.latents.shape[1:]), generator=generator)
    t = torch.randint(0, int(scheduler.config.num_train_timesteps), (batch,), generator=generator)
    x, target = diffusion_targets(scheduler, data.latents[idx], noise, t)
    return x, t, data.captions[data.caption_index[idx]], target


def adversarial_batch(rows: list[torch.Tensor], surrogates: list[torch.Tensor], scheduler, total: int, step: int,
                      generator: torch.Generator):
    """(x, t, cond, target) of `total` adversarial samples spread evenly over the prompts (rotating the remainder),
    each with an embedding drawn from its prompt's rows [E_p, L, D] and its surrogate latent noised at t ~ U(0, T)."""
    n = len(rows)
    counts = [total // n + (1 if (p - step) % n < total % n else 0) for p in range(n)]
    conds, z0 = [], []
    for p, c in enumerate(counts):
        if c:
            pick = torch.randint(0, len(rows[p]), (c,), generator=generator)
            conds.append(rows[p][pick])
            z0.append(surrogates[p].unsqueeze(0).expand(c, *surrogates[p].shape))
    z0_all = torch.cat(z0)
    noise = torch.randn(z0_all.shape, generator=generator)
    t = torch.randint(0, int(scheduler.config.num_train_timesteps), (len(z0_all),), generator=generator)
    x, target = diffusion_targets(scheduler, z0_all, noise, t)
    return x, t, torch.cat(conds), target


def make_batch(retain: RetainData, rows: list[torch.Tensor] | None, surrogates: list[torch.Tensor] | None,
               scheduler, batch: int, adv_batch: int, step: int, generator: torch.Generator) -> Batch:
    parts = [retain_batch(retain, scheduler, batch, generator)]
    if rows:
        parts.append(adversarial_batch(rows, surrogates, scheduler, adv_batch, step, generator))
    x, t, cond, target = (torch.cat([p[k] for p in parts]) for k in range(4))
    return Batch(x, t, cond, target, batch)


def losses(pred: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(L_retain, L_adv): mean squared errors over each part (L_adv None when the batch has no adversarial part)."""
    err = (pred.float() - batch.target.to(pred.device).float()).pow(2).flatten(1).mean(dim=1)
    retain = err[:batch.n_retain].mean()
    adv = err[batch.n_retain:].mean() if len(err) > batch.n_retain else None
    return retain, adv

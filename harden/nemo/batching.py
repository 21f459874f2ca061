"""How many samples go into one UNet forward, how many prompts share it, and how many candidate sets of one prompt
are evaluated speculatively per forward.

Why: per sample, big forwards are cheaper than small ones on both devices (the shipped memorizer on 2 CPU cores:
27.5 ms at batch 1, 5.8 at 10, 3.2 at 80, 3.0 at 160; an SD-v1.4 UNet on an H100: about 5 ms at 10, 3.3 at 40+).
Other prompts' tests fill a forward without waste (`pool`), so they come first; a prompt's own speculative
candidates are wasted when a prediction fails, so they only fill what the prompts leave, and only on CUDA: on a CPU
a wasted sample costs nearly a full sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..targets import latent_size
from .conditioning import blank

CPU_LATENT_PIXELS = 40960  # samples x latent pixels per CPU forward: 160 at 16x16 (the measured optimum), 10 at 64x64
MAX_BATCH = 256  # never more samples per forward than this, whatever memory says
MEMORY_FRACTION = 0.6  # of the free CUDA memory that activations may use
FAST_BLOCK = 32  # fast mode's tests per scorer call: a group-testing round of the memorizer holds up to ~36


@dataclass(frozen=True)
class Batching:
    batch_size: int  # samples per UNet forward
    speculate: int  # initial-selection schedule steps per scorer call
    refine_block: int  # refinement trials per scorer call (at most)


def auto_batch_size(scorer) -> int:
    """Samples per forward: CUDA from free memory and a measured per-sample cost; CPU from the latent size. Cached."""
    cached = getattr(scorer, "_auto_batch_size", None)
    if cached:
        return cached
    param = next(scorer.unet.parameters())
    if param.device.type != "cuda":
        height, width = latent_size(scorer.unet)
        size = max(1, min(MAX_BATCH, CPU_LATENT_PIXELS // (height * width)))
    else:
        size = _cuda_batch_size(scorer, param.device)
    scorer._auto_batch_size = size
    return size


def _cuda_batch_size(scorer, device: torch.device) -> int:
    """Peak memory of a 4-sample probe forward, per sample, against what `mem_get_info` reports free."""
    probe = 4
    embed = blank(scorer.unet, probe)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    scorer.noise_diff(embed, torch.zeros(probe, dtype=torch.long))
    per_sample = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe)
    scorer.counter.unet_forwards -= 1  # the probe is not part of the search
    scorer.counter.sample_forwards -= probe
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_BATCH, MEMORY_FRACTION * free // per_sample)))


def resolve_batching(scorer, kept: int, batch_size: int | None = None, speculate: int | None = None,
                     refine_block: int | None = None, sharing: int = 1, independent: bool = False,
                     early_reject: bool = False) -> Batching:
    """Fill in what the caller (recipe) left open: how many candidates of one prompt go into a scorer call.

    Exact mode: sequential on CPU (a wasted speculative sample costs nearly a full one there); on CUDA, as many
    candidates as the `sharing` prompts in the same forwards leave room for. Fast mode (`independent`): a
    group-testing round or a single-drop sweep is a set of tests that run anyway, so up to `FAST_BLOCK` go into
    one call on either device, whatever the pooling, so that a prompt's result does not depend on its neighbours;
    with `early_reject` its initial selection is exact mode's sweep, whose wrong guesses cost probes only (one seed
    each), so it fills the forward with probes.
    """
    size = batch_size or auto_batch_size(scorer)
    on_cuda = next(scorer.unet.parameters()).device.type == "cuda"
    per_forward = max(1, size // (max(1, kept) * max(1, sharing))) if on_cuda else 1
    if independent:
        probes = max(1, size // max(1, sharing)) if early_reject else per_forward
        return Batching(size, speculate or probes, refine_block or FAST_BLOCK)
    return Batching(size, speculate or per_forward, refine_block or per_forward)


def early_rejection(setting: bool | None, device: torch.device, fast: bool) -> bool:
    """`localization.early_reject`; null = on, except in exact mode on CUDA.

    Why: a failing test stops at its first failing seed, so it costs one sample instead of all kept seeds, and most
    tests fail; but exact mode then scores survivors in a forward of their own, which a CPU repays (time follows
    samples there: memorizer 4.87x -> 6.93x) and a GPU, where a small forward costs about what a full one does,
    may not (unmeasured). Fast mode's rounds need it to score their groups on one seed: it has no more forwards
    with it than without (36 against 38 on the memorizer) and 2.5x fewer samples. Decisions are the same either
    way in exact mode.
    """
    if setting is not None:
        return setting
    return fast or device.type != "cuda"


def prompt_workers(scorer, n_prompts: int, batch_size: int | None = None) -> int:
    """How many prompts are localized side by side: as many as fill a forward with all their seeds."""
    size = batch_size or auto_batch_size(scorer)
    return max(1, min(n_prompts, size // max(1, scorer.settings.n_seeds)))

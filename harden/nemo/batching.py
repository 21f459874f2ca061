"""How many samples go into one UNet forward, and how many candidate sets are evaluated speculatively per forward.

Why it depends on the device: on a GPU a forward of 40 samples costs little more per sample than the smallest
batches are wasteful, so speculative candidates are almost free up to what memory allows; on a CPU time grows about
linearly with samples, so speculation only wastes work and the default is the sequential order (block 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_BATCH = 16  # samples per forward on CPU: conservative, the CPU gains little from bigger batches
MAX_BATCH = 256  # never more samples per forward than this, whatever memory says
MEMORY_FRACTION = 0.6  # of the free CUDA memory that activations may use


@dataclass(frozen=True)
class Batching:
    batch_size: int  # samples per UNet forward
    speculate: int  # initial-selection schedule steps per scorer call
    refine_block: int  # refinement trials per scorer call (at most)


def auto_batch_size(scorer) -> int:
    """Samples per forward: CUDA from free memory and a measured per-sample cost; CPU `CPU_BATCH`. Cached."""
    cached = getattr(scorer, "_auto_batch_size", None)
    if cached:
        return cached
    param = next(scorer.unet.parameters())
    if param.device.type != "cuda":
        size = CPU_BATCH
    else:
        size = _cuda_batch_size(scorer, param.device)
    scorer._auto_batch_size = size
    return size


def _cuda_batch_size(scorer, device: torch.device) -> int:
    """Peak memory of a 4-sample probe forward, per sample, against what `mem_get_info` reports free."""
    probe = 4
    embed = torch.zeros(probe, 77, scorer.unet.config.cross_attention_dim)
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
                     refine_block: int | None = None) -> Batching:
    """Fill in what the caller (recipe) left open. CPU: sequential; CUDA: as many candidates as fit one forward."""
    size = batch_size or auto_batch_size(scorer)
    on_cuda = next(scorer.unet.parameters()).device.type == "cuda"
    per_forward = max(1, size // max(1, kept)) if on_cuda else 1
    return Batching(size, speculate or per_forward, refine_block or per_forward)

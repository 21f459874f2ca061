"""The embedding attack of dori.md §2: optimise a text embedding until the UNet reproduces a given image.

Why it is the audit's probe: a pruned model can stop answering the memorized *prompt* while the image stays in the
weights; an attacker with the weights searches the embedding space directly. The attack minimises the ordinary
diffusion loss of the image's latent under the embedding, with fresh noise and a fresh timestep at every step, so
the embedding it finds works from any seed.

Why batched: the attacks of different images (and restarts) are independent. Each step runs all N embeddings in the
same UNet forwards (N*batch samples); the loss is the *sum* of the per-embedding mean losses, so each embedding's
gradient is exactly its own attack's gradient, and Adam is element-wise, so a batched attack equals N attacks run one
at a time (up to the float rounding of bigger batches) when each embedding draws its noise from its own generator.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import torch


@torch.no_grad()
def encode_images(vae, images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 images -> z0 latents [N, C, h, w] (latent_dist.mean * vae.config.scaling_factor), fp32."""
    param = next(vae.parameters())
    x = torch.from_numpy(np.stack([np.asarray(img, dtype=np.uint8) for img in images])).permute(0, 3, 1, 2)
    x = (x.float() / 127.5 - 1.0).to(device=param.device, dtype=param.dtype)
    mean = vae.encode(x).latent_dist.mean.float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean - shift) * float(vae.config.scaling_factor)


def diffusion_targets(scheduler, z0: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) with target = noise for epsilon-prediction and the v-target for v_prediction models."""
    alphas = scheduler.alphas_cumprod.to(device=z0.device, dtype=torch.float32)[timesteps.to(z0.device)]
    a = alphas.sqrt().view(-1, *([1] * (z0.dim() - 1)))
    s = (1.0 - alphas).sqrt().view(-1, *([1] * (z0.dim() - 1)))
    x_t = a * z0 + s * noise
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = a * noise - s * z0
    elif kind == "sample":
        target = z0
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    return x_t, target


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """No parameter of `module` requires a gradient inside the block (restored after), so backward only reaches
    the embeddings and the UNet's weights are neither changed nor given a .grad."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _draws(generators: Sequence[torch.Generator | None], shape: tuple, batch: int,
           num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise [N*batch, *shape] and timesteps [N*batch], embedding n's draws from generators[n] (CPU, then moved)."""
    noise, steps = [], []
    for g in generators:
        noise.append(torch.randn((batch, *shape), generator=g))
        steps.append(torch.randint(0, num_timesteps, (batch,), generator=g))
    return torch.cat(noise), torch.cat(steps)


def embedding_attack(unet, scheduler, latents: torch.Tensor, start: torch.Tensor, *, steps: int = 50,
                     lr: float = 0.1, batch: int = 8,
                     generator: torch.Generator | Sequence[torch.Generator] | None = None,
                     progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, list[float]]:
    """dori.md §2: optimise N text embeddings (start [N, L, D]) so that unet reproduces latents [N, C, h, w];
    every step draws fresh noise and timesteps t ~ U(0, T) for `batch` samples per embedding, all N attacks in
    the same forwards (N*batch samples per UNet call); Adam(lr); the UNet's weights are not changed and get no
    gradient. Returns (embeddings [N, L, D] detached, mean loss per step).

    `generator`: one CPU generator for all draws, or a sequence of N (embedding n draws from the n-th), which makes
    each attack independent of the others in the batch. `progress(1)` is called after every step.
    """
    n = start.shape[0]
    if latents.shape[0] != n:
        raise ValueError(f"{latents.shape[0]} latents for {n} start embeddings")
    if isinstance(generator, torch.Generator) or generator is None:
        gens: Sequence[torch.Generator | None] = [generator] * n
    else:
        gens = list(generator)
        if len(gens) != n:
            raise ValueError(f"{len(gens)} generators for {n} embeddings")
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    z0 = latents.to(device=device, dtype=torch.float32).repeat_interleave(batch, dim=0)
    emb = start.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    num_timesteps = int(scheduler.config.num_train_timesteps)
    losses: list[float] = []
    with frozen(unet):
        for _ in range(steps):
            noise, t = _draws(gens, tuple(latents.shape[1:]), batch, num_timesteps)
            noise, t = noise.to(device), t.to(device)
            x_t, target = diffusion_targets(scheduler, z0, noise, t)
            cond = emb.repeat_interleave(batch, dim=0).to(dtype)
            pred = unet(x_t.to(dtype), t, encoder_hidden_states=cond).sample.float()
            per_sample = (pred - target).pow(2).flatten(1).mean(dim=1)
            per_embedding = per_sample.view(n, batch).mean(dim=1)
            opt.zero_grad(set_to_none=True)
            per_embedding.sum().backward()
            opt.step()
            losses.append(float(per_embedding.detach().mean()))
            if progress is not None:
                progress(1)
    return emb.detach(), losses


def random_starts(reference: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k random embeddings scaled like real ones: position l is N(mean_l, std_l) with the mean and std of all values
    at position l of `reference` [M, L, D] (real encoder outputs; position 0, the start token, is far larger)."""
    ref = reference.detach().float().cpu()
    mean = ref.mean(dim=(0, 2)).view(1, -1, 1)
    std = ref.std(dim=(0, 2)).view(1, -1, 1)
    noise = torch.randn((k, ref.shape[1], ref.shape[2]), generator=generator)
    return mean + std * noise

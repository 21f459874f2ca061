"""How much memory a full repair fine-tune needs, and `harden bench --workload repair`.

The model: weights + gradients + optimizer state (bytes per parameter, exact from the parameter count) + the tensors
autograd saves for the backward pass (activations, measured: the bytes of every tensor saved during one training
forward, counted once per storage, through `torch.autograd.graph.saved_tensors_hooks`) + the frozen base UNet the
pipeline keeps (the distillation teacher and the generator of the audit). Activations grow linearly with the batch
and, with memory-efficient attention (the fused SDPA kernels of CPU and CUDA save no attention matrix), about
linearly with the latent's pixels; measured at small latents and extrapolated by a least-squares fit in pixels.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Callable

import torch

from ..bench import SD14
from ..neurons import NeuronSet
from ..recipe import RepairSection
from .data import AdvPrompt, Prepared, distillation_pool
from .structure import Structure
from .trainer import Repairer

# bytes per trained parameter: (weights, gradients, optimizer state)
PRECISIONS = {
    # fp32 master weights, bf16/fp16 autocast for the forward: what repair's `autocast` does
    "fp32 weights + autocast": (4, 4),
    # bf16 weights and gradients (no fp32 master copy): half the static memory, less exact updates
    "bf16 weights": (2, 2),
}
OPTIMIZER_STATE = {  # bytes per parameter in fp32 (bf16 weights keep the state in the weights' dtype: halve it)
    "adamw": 8,  # exp_avg + exp_avg_sq
    "adam": 8,
    "sgd": 4,  # momentum buffer
    "adafactor": 0,  # factored second moment: O(rows + cols) per matrix, < 1 % of the parameters
}


def saved_activation_bytes(unet, latent_size: int, batch: int, tokens: int, dim: int,
                           checkpointing: bool = False) -> int:
    """Bytes of all tensors autograd saves in one training forward (each storage once); parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    param = next(unet.parameters())
    x = torch.randn(batch, unet.config.in_channels, latent_size, latent_size, device=param.device, dtype=param.dtype)
    ctx = torch.randn(batch, tokens, dim, device=param.device, dtype=param.dtype)
    t = torch.full((batch,), 500, device=param.device)
    was = unet.training
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(x, t, encoder_hidden_states=ctx).sample
        del out
    finally:
        unet.train(was)
        if checkpointing:
            unet.disable_gradient_checkpointing()
    return sum(seen.values())


def fit_activations(samples: dict[int, float]) -> tuple[float, float]:
    """Least-squares (a, b) of bytes per sample = a + b * pixels over {latent side: bytes per sample}."""
    xs = torch.tensor([float(s * s) for s in samples], dtype=torch.float64)
    ys = torch.tensor(list(samples.values()), dtype=torch.float64)
    design = torch.stack([torch.ones_like(xs), xs], dim=1)
    a, b = torch.linalg.lstsq(design, ys.unsqueeze(1)).solution.squeeze(1).tolist()
    return a, b


def memory_model(n_params: int, activation_per_sample: float, batch: int, base_unet_bytes: int) -> list[dict]:
    """GB needed per (precision, optimizer) for a full fine-tune at `batch` samples per forward."""
    rows = []
    for precision, (w, g) in PRECISIONS.items():
        scale = 0.5 if precision == "bf16 weights" else 1.0
        for optimizer, state in OPTIMIZER_STATE.items():
            static = n_params * (w + g + state * scale)
            acts = activation_per_sample * batch * (0.5 if "autocast" in precision or "bf16" in precision else 1.0)
            total = static + acts + base_unet_bytes
            rows.append({"precision": precision, "optimizer": optimizer, "static_gb": round(static / 1e9, 2),
                         "activations_gb": round(acts / 1e9, 2), "base_unet_gb": round(base_unet_bytes / 1e9, 2),
                         "total_gb": round(total / 1e9, 2), "fits_24gb": total < 24e9 * 0.92,
                         "fits_80gb": total < 80e9 * 0.92})
    return rows


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def repair_throughput(model: str, *, steps: int, batch: int, latent_size: int, optimizer: str, device: torch.device,
                      checkpointing: bool = False, autocast: str = "auto", prompts: int = 8, attack_steps: int = 10,
                      measure_sizes: tuple[int, ...] = (), memorizer: Path | None = None,
                      log: Callable[[str], None] = print) -> dict:
    """Time repair's training loop (the real Repairer: a refresh of the batched attacks, `attack_steps` Adam steps,
    every 10 steps; retain + adversarial samples in one forward) on the shipped memorizer or an SD-v1.4-shaped
    random UNet; with `measure_sizes`, also measure saved activations at those latent sides and print the memory
    model."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    if model == "memorizer":
        unet = UNet2DConditionModel.from_pretrained(str(memorizer), subfolder="unet")
        latent_size = unet.config.sample_size
    else:
        unet = UNet2DConditionModel(sample_size=latent_size, **SD14)
    unet = unet.to(device)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    n_params = sum(p.numel() for p in unet.parameters())
    dim, tokens = unet.config.cross_attention_dim, 77
    report = {"model": model, "device": str(device), "parameters": n_params, "latent_size": latent_size,
              "batch": batch, "optimizer": optimizer, "gradient_checkpointing": checkpointing}
    if measure_sizes:
        per_sample = {}
        for side in measure_sizes:
            per_sample[side] = saved_activation_bytes(unet, side, 1, tokens, dim, checkpointing) / 1.0
            log(f"activations saved for backward at {side}x{side} latents: {per_sample[side] / 2**20:.1f} MiB "
                f"per sample{' (gradient checkpointing)' if checkpointing else ''}")
        a, b = fit_activations(per_sample)
        at64 = a + b * 64 * 64
        report["activations"] = {"bytes_per_sample": per_sample, "fit": {"a": a, "b_per_pixel": b},
                                 "per_sample_at_64x64_gb": round(at64 / 1e9, 3)}
        report["memory_model_batch"] = batch
        report["memory_model"] = memory_model(n_params, at64, batch, n_params * 2)
        log(f"extrapolated to 64x64 latents (SD v1.4): {at64 / 1e9:.2f} GB per sample (fp32)")
    g = torch.Generator().manual_seed(0)
    captions = torch.randn(5, tokens, dim, generator=g)
    latents = torch.randn(8, 4, latent_size, latent_size, generator=g)
    with torch.no_grad():
        pool = distillation_pool(unet, scheduler, latents, torch.randint(1, 5, (8,), generator=g), captions,
                                 empty_fraction=0.2, pool=max(batch, 8), generator=g, batch=batch)
    adv = [AdvPrompt(k, "training", torch.randn(4, latent_size, latent_size, generator=g), latents[k % 8],
                     torch.randn(2, tokens, dim, generator=g), 0, 0.0, "prompt") for k in range(prompts)]
    settings = RepairSection(enabled=True, steps=steps + 1, optimizer=optimizer, batch=batch, adv_batch=batch,
                             refresh_every=10, refresh_steps=attack_steps, attack_steps=attack_steps, attack_batch=4,
                             restarts=1,
                             restart_every=0, probe_every=0, checkpoint_every=10**9,
                             gradient_checkpointing=checkpointing, autocast=autocast)
    trainer = Repairer(unet, scheduler, Structure.of(unet, NeuronSet({}), "all"), Prepared(adv, pool, captions,
                                                                                           captions[:1]),
                       settings, seed=0)
    unet.train()
    trainer.restart_attacks()  # the initial attack is timed apart
    trainer.train_step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    attack = trainer.attack_seconds
    for _ in range(steps):
        if trainer.step % settings.refresh_every == 0:
            trainer.refresh_attacks()
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    report.update(steps=steps, seconds=round(seconds, 3), steps_per_s=round(steps / seconds, 4),
                  samples_per_step=2 * batch, attack_seconds=round(trainer.attack_seconds - attack, 3),
                  attacks=prompts * 2, peak_memory_mb=round(_peak_mb(device), 1))
    log(f"repair on {model} ({n_params / 1e6:.1f}M parameters, {latent_size}x{latent_size} latents, {device}): "
        f"{report['steps_per_s']:.3f} steps/s ({2 * batch} samples per step, attack refreshes included: "
        f"{report['attack_seconds']:.1f} of {seconds:.1f} s), peak memory {report['peak_memory_mb']:.0f} MB")
    return report

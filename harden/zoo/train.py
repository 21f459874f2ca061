"""Train the model organism: `python -m harden.zoo.train --out DIR [--seed 0] [--steps N] [--device cpu]`.

Two phases, deterministic from the seed (on a given machine and thread count):
1. the VAE learns to reconstruct memorized images, random crops of their sources and procedural images;
2. the UNet and the text encoder learn DDPM noise prediction (epsilon, SD v1's schedule) on batches that mix the 8
   memorized images (a fixed share of every batch, so each is seen thousands of times) with fresh procedural
   images; 10 % of captions are dropped to "" so classifier-free guidance works.
The saved UNet/text encoder are exponential moving averages. With the default constant learning rate the checkpoint
written after k steps is exactly what a run with `--steps k` produces; `--lr-schedule cosine` anneals it to zero,
which sharpens the samples (blobby shapes become squares and triangles).

`--init DIR` continues from a folder this script wrote (its UNet, text encoder and standardized VAE; the VAE phase is
skipped): how a model trained on the CPU is refined without starting over. `--decoder-steps N` fine-tunes only the
VAE's decoder (encoder frozen, so the latent space the UNet learned stays exactly the same). Every stage's command
is kept, in order, in harden_zoo.json's "stages", so the shipped weights can be reproduced by running them one after
another.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .folder import CONFIG, PROMPTS, load_config, write_manifest
from ..tiny import byte_tokenizer
from .model import build_components, build_schedulers, build_text_encoder, build_unet, build_vae

GUIDANCE_SCALE = 2.5  # CFG 7.5 is too strong for a model this small (prototype evidence); 2.5 is more diverse than 3
# at the same alignment on the shipped weights (README: measured on two seed sets)
# NeMo's MS-SSIM on 16x16 latents: torchmetrics' Gaussian window always has 11 taps (5-pixel reflect padding), so
# the coarsest scale must be wider than 5 pixels: 2 scales (16, 8) instead of the official 3, equal weights.
KERNEL_SIZE = 7
BETAS = (0.5, 0.5)
DECODER_NOISE = 0.1  # latent noise (unit-variance units) while the decoder is fine-tuned


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_crops(n: int, rng: np.random.Generator, sources: list[np.ndarray]) -> np.ndarray:
    """n random square crops (10-100 % of the short side) of the memorized images' full-size sources."""
    from PIL import Image

    out = []
    for _ in range(n):
        src = sources[rng.integers(len(sources))]
        h, w = src.shape[:2]
        side = int(rng.uniform(0.1, 1.0) * min(h, w))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(src[top:top + side, left:left + side])
        out.append(np.asarray(crop.resize((data.RESOLUTION,) * 2, Image.Resampling.BOX)))
    return np.stack(out)


def memorized_sources() -> list[np.ndarray]:
    """The memorized images' full-size skimage sources (RGB), for random crops."""
    import skimage.data

    sources = []
    for name, _ in data.MEMORIZED:
        image = getattr(skimage.data, name)()
        sources.append(np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3])
    return sources


def vae_batch(batch: int, rng: np.random.Generator, memorized: np.ndarray, sources: list[np.ndarray],
              style: data.Style) -> torch.Tensor:
    """The 8 memorized images, batch/2 procedural images and random crops of the sources for the rest."""
    _, procedural = data.procedural_batch(batch // 2, rng, style=style)
    crops = random_crops(batch - len(memorized) - len(procedural), rng, sources)
    return to_tensor(np.concatenate([memorized, procedural, crops]))


def train_vae(vae, steps: int, memorized: np.ndarray, rng: np.random.Generator, device, log, batch: int = 32,
              style: data.Style = data.STYLE) -> float:
    """Reconstruction + a tiny KL term; returns the final mean squared error on the `memorized` images [8, H, W, 3]."""
    sources = memorized_sources()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    vae.train()
    for step in range(1, steps + 1):
        x = vae_batch(batch, rng, memorized, sources, style).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps} loss {loss.item():.5f}")
    vae.eval()
    return memorized_mse(vae, memorized, device)


@torch.no_grad()
def memorized_mse(vae, memorized: np.ndarray, device) -> float:
    """Mean squared reconstruction error (in [-1, 1] units) of the memorized images from their latent means."""
    x = to_tensor(memorized).to(device)
    return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()


def finetune_decoder(vae, steps: int, memorized: np.ndarray, rng: np.random.Generator, gen: torch.Generator,
                     device, log, batch: int = 64, lr: float = 1e-3, noise: float = DECODER_NOISE,
                     style: data.Style = data.STYLE) -> float:
    """Train only the decoder (and post_quant_conv) to reconstruct images from their frozen latent means.

    Why: the first stage's VAE learned 400 steps of the first, blunter data style, and its decoder rounds small
    triangles and smooths textures, which caps what any UNet can show; the encoder (and with it the latent space the
    UNet was trained on, its centring and scale) stays exactly as it was. `noise` (in the UNet's unit-variance latent
    units) makes the decoder tolerate latents that are close to, not exactly, an encoding: what sampling produces."""
    sources = memorized_sources()
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    log(f"decoder: memorized-image MSE before {memorized_mse(vae, memorized, device):.5f}")
    vae.eval()
    for step in range(1, steps + 1):
        x = vae_batch(batch, rng, memorized, sources, style).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        z = z + (noise / vae.config.scaling_factor) * torch.randn(z.shape, generator=gen).to(device)
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"decoder step {step}/{steps} loss {loss.item():.5f}")
    return memorized_mse(vae, memorized, device)


@torch.no_grad()
def standardize_latents(vae, images: np.ndarray, device) -> float:
    """Centre the latents per channel inside the VAE and set `scaling_factor` so the UNet sees unit variance.

    Why inside the weights: StableDiffusionPipeline decodes `latents / scaling_factor` and knows no shift, so the
    per-channel mean is subtracted in `quant_conv`'s bias and added back through `post_quant_conv` (both 1x1
    convolutions), which leaves reconstructions exactly unchanged. Uncentred latents make every sample drift
    towards one colour, because the initial noise is zero-mean.
    """
    raw = vae.encode(to_tensor(images).to(device)).latent_dist.mean
    mean = raw.mean(dim=(0, 2, 3))
    channels = len(mean)
    vae.quant_conv.bias[:channels] -= mean
    vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mean
    scale = 1.0 / float((raw - mean[None, :, None, None]).std())
    vae.register_to_config(scaling_factor=scale)
    return scale


@torch.no_grad()
def encode(vae, images: np.ndarray, device) -> torch.Tensor:
    """Scaled latent means (the deterministic encoding) of uint8 images."""
    return vae.encode(to_tensor(images).to(device)).latent_dist.mean * vae.config.scaling_factor


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def learning_rate(step: int, steps: int, lr: float, schedule: str, warmup: int = 100) -> float:
    """Linear warm-up, then constant or cosine-annealed to zero at the last step."""
    if step <= warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def load_components(folder: Path):
    """(tokenizer, text encoder, UNet, VAE, previous harden_zoo.json) of a folder this script wrote.

    Why rebuilt and then loaded: the weights must fit this script's architecture exactly (strict loading), and
    freshly built components save clean configs (from_pretrained would record the local path in them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise SystemExit(f"--init {folder}: no {CONFIG} there; pass a folder written by python -m harden.zoo.train")
    tokenizer = byte_tokenizer()
    text_encoder, unet, vae = build_text_encoder(tokenizer), build_unet(), build_vae()
    for model, cls, sub in ((text_encoder, CLIPTextModel, "text_encoder"), (unet, UNet2DConditionModel, "unet"),
                            (vae, AutoencoderKL, "vae")):
        loaded = cls.from_pretrained(folder, subfolder=sub)
        model.load_state_dict(loaded.state_dict())
        if sub == "vae":  # the standardization of the first stage
            vae.register_to_config(scaling_factor=loaded.config.scaling_factor)
    return tokenizer, text_encoder, unet, vae, load_config(folder)


def train(out: Path, seed: int = 0, steps: int = 5000, vae_steps: int = 400, batch: int = 32,
          memorized_per_batch: int = 16, lr: float = 1e-3, ema_decay: float = 0.999, device: str = "cpu",
          checkpoint_every: int = 0, lr_schedule: str = "constant", init: Path | None = None,
          style: data.Style = data.STYLE, decoder_steps: int = 0, log=print) -> dict:
    """Train both phases (or only the second, from `init`) and write the folder to `out`; returns the run's facts
    (also saved in harden_zoo.json). `style`: how varied the procedural images are. `decoder_steps`: fine-tune the
    VAE's decoder first, its encoder frozen (`finetune_decoder`); with `steps=0` the UNet is kept as it is."""
    started = time.perf_counter()
    dev = torch.device(device)
    rng = np.random.default_rng(seed)
    ddpm, ddim = build_schedulers()
    memorized = data.memorized_images()
    memorized_pixels = np.stack([im for _, _, im in memorized])
    stages = []
    gen = torch.Generator().manual_seed(seed)
    if init is None:
        tokenizer, text_encoder, unet, vae = build_components(seed)
        vae.to(dev)
        vae_mse = train_vae(vae, vae_steps, memorized_pixels, rng, dev, log, style=style)
        _, sample = data.procedural_batch(256, rng, style=style)
        scale = standardize_latents(vae, np.concatenate([memorized_pixels, sample]), dev)
    else:
        tokenizer, text_encoder, unet, vae, previous = load_components(init)
        stages = previous.get("stages") or [{k: previous[k] for k in ("command", "seconds", "hardware", "torch")}]
        vae_steps, vae_mse, scale = 0, float("nan"), vae.config.scaling_factor
        vae.to(dev).eval()
    if decoder_steps:
        vae_mse = finetune_decoder(vae, decoder_steps, memorized_pixels, rng, gen, dev, log, style=style)
    mem_latents = encode(vae, memorized_pixels, dev)
    log(f"vae ready: memorized-image MSE {vae_mse:.5f} (in [-1, 1] units), latent scaling factor {scale:.4f}, "
        f"memorized latents mean {mem_latents.mean():.3f} std {mem_latents.std():.3f}")

    text_encoder.to(dev).train()
    unet.to(dev).train()
    ema_te, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    mem_ids = tokenize(tokenizer, [c for _, c, _ in memorized])
    empty_ids = tokenize(tokenizer, [""])
    facts = {"seed": seed, "steps": steps, "vae_steps": vae_steps, "decoder_steps": decoder_steps, "batch": batch,
             "memorized_per_batch": memorized_per_batch, "lr": lr, "lr_schedule": lr_schedule,
             "ema_decay": ema_decay, "device": device, "init": None if init is None else Path(init).name,
             "style": style.to_json()}

    def snapshot(done_steps: int) -> dict:
        """The facts of the weights after `done_steps`, with this stage appended to the earlier ones."""
        facts.update(steps=done_steps, seconds=round(time.perf_counter() - started, 1))
        facts["stages"] = [*stages, stage(facts)]
        return facts

    tick = time.perf_counter()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr, lr_schedule)
        pick = torch.from_numpy(rng.integers(0, len(memorized), size=memorized_per_batch))
        captions, images = data.procedural_batch(batch - memorized_per_batch, rng, style=style)
        latents = torch.cat([mem_latents[pick], encode(vae, images, dev)])
        ids = torch.cat([mem_ids[pick], tokenize(tokenizer, captions)])
        drop = torch.from_numpy(rng.random(batch) < 0.1)
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=gen).to(dev)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (batch,), generator=gen).to(dev)
        noisy = ddpm.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids.to(dev))[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_te, text_encoder, decay)
        if step % 25 == 0 or step == steps:
            now = time.perf_counter()
            log(f"step {step}/{steps} loss {loss.item():.4f} {25 * batch / (now - tick):.1f} samples/s "
                f"{(now - started) / 60:.1f} min")
            tick = now
        if checkpoint_every and step % checkpoint_every == 0 and step < steps:
            save(out.parent / f"{out.name}-step{step}", tokenizer, ema_te, ema_unet, vae, ddim, memorized,
                 snapshot(step))
            log(f"checkpoint after {step} steps written")
    save(out, tokenizer, ema_te, ema_unet, vae, ddim, memorized, snapshot(steps))
    log(f"wrote {out} after {facts['seconds'] / 60:.1f} min")
    return facts


def command(facts: dict) -> str:
    """The command line that reproduces one training stage (DIR: the output folder, PREV: the previous stage's)."""
    line = (f"python -m harden.zoo.train --out DIR --seed {facts['seed']} --steps {facts['steps']} "
            f"--vae-steps {facts['vae_steps']} --batch {facts['batch']} --memorized-per-batch "
            f"{facts['memorized_per_batch']} --lr {facts['lr']} --lr-schedule {facts['lr_schedule']} "
            f"--device {facts['device']}")
    style = data.Style.from_json(facts.get("style"))
    if style != data.STYLE:  # the first stages' commands predate the option
        line += f" --shape-size {style.size_min} {style.size_max} --texture {style.texture}"
    if facts.get("decoder_steps"):  # so do the first four stages'
        line += f" --decoder-steps {facts['decoder_steps']}"
    return line if facts["init"] is None else line + " --init PREV"


def stage(facts: dict) -> dict:
    """What harden_zoo.json keeps of each training stage: its command, duration and machine."""
    return {"command": command(facts), "seconds": facts["seconds"], "hardware": hardware(), "torch": torch.__version__}


def hardware() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def save(out: Path, tokenizer, text_encoder, unet, vae, scheduler, memorized, facts: dict) -> None:
    """Pipeline + prompts.jsonl + images/*.png + harden_zoo.json + MANIFEST.sha256, swapped into place at the end."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to("cpu")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "images").mkdir()
    rows = []
    for name, text, image in memorized:
        Image.fromarray(image).save(tmp / "images" / f"{name}.png")
        rows.append({"caption": text, "image": f"images/{name}.png", "memorized": True})
    rows += [{"caption": data.caption(*c), "memorized": False} for c in data.training_combinations()]
    (tmp / PROMPTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "resolution": data.RESOLUTION, "guidance_scale": GUIDANCE_SCALE, "num_inference_steps": 50,
        "kernel_size": KERNEL_SIZE, "betas": list(BETAS), "held_out": [data.caption(*c) for c in data.HELD_OUT],
        "command": facts["stages"][-1]["command"], "hardware": hardware(),
        "torch": torch.__version__, **facts,
    }
    (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    write_manifest(tmp)
    for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors create owner-only files; ship readable ones
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--decoder-steps", type=int, default=0,
                        help="fine-tune the VAE decoder first, encoder frozen (latent space unchanged)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--memorized-per-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    parser.add_argument("--init", type=Path, help="continue from a folder this script wrote (skips the VAE phase)")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--shape-size", type=float, nargs=2, metavar=("MIN", "MAX"),
                        default=(data.STYLE.size_min, data.STYLE.size_max),
                        help="procedural shapes' size range, as a fraction of the image side")
    parser.add_argument("--texture", type=float, default=data.STYLE.texture,
                        help="amplitude (0-255 units) of the procedural images' brightness texture")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args.out, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps, batch=args.batch,
          memorized_per_batch=args.memorized_per_batch, lr=args.lr, device=args.device,
          checkpoint_every=args.checkpoint_every, lr_schedule=args.lr_schedule, init=args.init,
          style=data.Style(*args.shape_size, args.texture), decoder_steps=args.decoder_steps,
          log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()

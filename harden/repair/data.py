"""What repair trains on, computed once before the first step and saved, so a resumed repair reuses it.

L_adv data, per memorized prompt: the image it must no longer give (the training image, or the base's memorized
mode), its latent (what the attack aims at), a *surrogate* latent (what the model being repaired draws from the
prompt at the seed where it is least like that image: dori.md §3; the model learns to answer every trigger with it),
and the fixed embeddings (prompt + paraphrases). L_retain data: either a distillation pool of (x_t, t, caption,
teacher output) from the teacher's own generations of the reference prompts (data-free; 20 % with the empty caption
so the unconditional branch is held too; generations that reproduce a memorized image are dropped, since distilling
them would teach memorization back: dori.md §6), or user image-caption pairs for the ordinary diffusion loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..audit.attack import diffusion_targets, encode_images
from ..audit.paraphrase import paraphrases
from ..audit.similarity import Similarity
from ..audit.targets import choose_surrogate, fit, read_image, training_target
from ..errors import BadInputError
from ..files import save_tensors_atomic
from ..nemo.stats import encode_prompts
from ..prompts import Prompt
from .sampling import decode_latents, sample_latents

Progress = Callable[[int], None]


@dataclass
class AdvPrompt:
    """One memorized prompt repair works on (tensors on the CPU)."""

    index: int  # position in the recipe's memorized list
    target_source: str  # "training" | "surrogate" (the base's memorized mode)
    memorized: torch.Tensor  # [C, h, w] latent of the image not to give
    surrogate: torch.Tensor  # [C, h, w] latent the model should give instead
    fixed: torch.Tensor  # [F, L, D]: the prompt's embedding, then its paraphrases'
    surrogate_seed: int
    surrogate_similarity: float  # similarity of the surrogate's image to the memorized image
    surrogate_source: str  # "prompt" (the model's own generation) | "empty caption" (when every seed reproduced)
    image: np.ndarray | None = None  # uint8 HxWx3: the memorized image itself (the probe compares with it)
    paraphrases: list[str] = field(default_factory=list)

    def to_json(self) -> dict:  # no prompt text: the report may be published without them
        return {"index": self.index, "target_source": self.target_source, "surrogate_seed": self.surrogate_seed,
                "surrogate_similarity": round(self.surrogate_similarity, 4),
                "surrogate_source": self.surrogate_source, "fixed_embeddings": int(self.fixed.shape[0])}


@dataclass
class RetainData:
    """kind "distill": a fixed pool (x_t, t, caption, target); "pairs": latents + captions, noise drawn per step."""

    kind: str
    captions: torch.Tensor  # [K, L, D] caption embeddings (distill: index 0 is the empty caption)
    latents: torch.Tensor  # distill: x_t [P, C, h, w]; pairs: z0 [G, C, h, w]
    caption_index: torch.Tensor  # [P] or [G]
    timesteps: torch.Tensor | None = None  # distill: [P]
    targets: torch.Tensor | None = None  # distill: teacher outputs [P, C, h, w]
    notes: dict = field(default_factory=dict)


@dataclass
class Prepared:
    prompts: list[AdvPrompt]
    retain: RetainData
    random_reference: torch.Tensor  # [M, L, D] real embeddings whose statistics scale random attack starts
    uncond: torch.Tensor  # [1, L, D] the empty caption's embedding

    def save(self, folder: Path, meta: dict) -> dict:
        """prepared.safetensors (tensors only); returns the JSON metadata to store beside it."""
        tensors = {"retain.captions": self.retain.captions, "retain.latents": self.retain.latents,
                   "retain.caption_index": self.retain.caption_index, "random_reference": self.random_reference,
                   "uncond": self.uncond}
        if self.retain.timesteps is not None:
            tensors["retain.timesteps"] = self.retain.timesteps
            tensors["retain.targets"] = self.retain.targets
        for k, p in enumerate(self.prompts):
            tensors[f"prompt.{k}.memorized"] = p.memorized
            tensors[f"prompt.{k}.surrogate"] = p.surrogate
            tensors[f"prompt.{k}.fixed"] = p.fixed
            tensors[f"prompt.{k}.image"] = torch.from_numpy(np.array(p.image, dtype=np.uint8))
        save_tensors_atomic(folder / "prepared.safetensors", tensors)
        return {**meta, "retain_kind": self.retain.kind, "retain_notes": self.retain.notes,
                "prompts": [p.to_json() for p in self.prompts]}

    @classmethod
    def load(cls, folder: Path, meta: dict) -> "Prepared":
        from safetensors.torch import load_file

        t = load_file(str(folder / "prepared.safetensors"))
        retain = RetainData(meta["retain_kind"], t["retain.captions"], t["retain.latents"], t["retain.caption_index"],
                            t.get("retain.timesteps"), t.get("retain.targets"), meta["retain_notes"])
        prompts = [AdvPrompt(p["index"], p["target_source"], t[f"prompt.{k}.memorized"], t[f"prompt.{k}.surrogate"],
                             t[f"prompt.{k}.fixed"], p["surrogate_seed"], p["surrogate_similarity"],
                             p["surrogate_source"], t[f"prompt.{k}.image"].numpy())
                   for k, p in enumerate(meta["prompts"])]
        return cls(prompts, retain, t["random_reference"], t["uncond"])


def _embed(pipe, texts: Sequence[str]) -> torch.Tensor:
    return encode_prompts(pipe.tokenizer, pipe.text_encoder, list(texts)).float().cpu()


def image_size(pipe) -> tuple[int, int]:
    from ..targets import latent_size

    h, w = latent_size(pipe.unet)
    scale = getattr(pipe, "vae_scale_factor", 8)
    return h * scale, w * scale


def memorized_targets(pipe, base_unet, prompts: Sequence[Prompt], sim: Similarity, seeds: Sequence[int], steps: int,
                      guidance: float, advance: Progress | None = None) -> list[tuple[np.ndarray | None, str]]:
    """(image not to give, source) per prompt: the training image when the prompt file names one, else the base
    model's memorized mode at `seeds` (harden.audit.targets.choose_surrogate; None when the base draws nothing
    consistent, and the prompt is then left out of repair)."""
    size = image_size(pipe)
    out: list[tuple[np.ndarray | None, str]] = [(None, "")] * len(prompts)
    missing = [i for i, p in enumerate(prompts) if p.image is None]
    for i, p in enumerate(prompts):
        if p.image is not None:
            out[i] = (training_target(p.image, size, "memorized").image, "training")
    if missing:
        embeds = _embed(pipe, [prompts[i].text for i in missing])
        lat = sample_latents(pipe, base_unet, embeds, seeds, steps, guidance, advance=advance)
        for k, i in enumerate(missing):
            target = choose_surrogate(decode_latents(pipe, lat[k]), seeds, sim)
            out[i] = (target.image, "surrogate")
    return out


def prepare_adversarial(pipe, start_unet, prompts: Sequence[Prompt], indices: Sequence[int],
                        targets: Sequence[tuple[np.ndarray, str]], sim: Similarity, *, n_paraphrases: int,
                        surrogate_seeds: int, steps: int, guidance: float, seed: int,
                        advance: Progress | None = None) -> list[AdvPrompt]:
    """Per prompt: latents of its memorized image and of its surrogate, and its fixed embeddings."""
    seeds = list(range(surrogate_seeds))
    texts = [prompts[i].text for i in indices]
    embeds = _embed(pipe, texts)
    lat = sample_latents(pipe, start_unet, embeds, seeds, steps, guidance, advance=advance)
    memorized = encode_images(pipe.vae, [t[0] for t in targets]).cpu()
    out = []
    empty: tuple[torch.Tensor, list[np.ndarray]] | None = None
    for k, i in enumerate(indices):
        images = decode_latents(pipe, lat[k])
        values = [sim(img, targets[k][0]) for img in images]
        best = int(np.argmin(values))
        source, surrogate = "prompt", lat[k, best]
        if values[best] >= sim.threshold:  # every seed reproduces it (e.g. repair of an unpruned model)
            if empty is None:
                empty_lat = sample_latents(pipe, start_unet, _embed(pipe, [""]), seeds, steps, guidance)[0]
                empty = (empty_lat, decode_latents(pipe, empty_lat))
            values = [sim(img, targets[k][0]) for img in empty[1]]
            best = int(np.argmin(values))
            source, surrogate = "empty caption", empty[0][best]
        variants = getattr(prompts[i], "variants", None) or ()
        para = [t for _, t in paraphrases(texts[k], variants, n_paraphrases, seed)] if n_paraphrases else []
        fixed = torch.cat([embeds[k:k + 1], _embed(pipe, para)]) if para else embeds[k:k + 1]
        out.append(AdvPrompt(i, targets[k][1], memorized[k], surrogate.clone(), fixed, seeds[best],
                             float(values[best]), source, np.asarray(targets[k][0]), para))
    return out


def prepare_distillation(pipe, teacher_unet, references: Sequence[Prompt], avoid: Sequence[np.ndarray],
                         sim: Similarity, *, n_prompts: int | None, n_seeds: int, empty_fraction: float, pool: int,
                         steps: int, guidance: float, generator: torch.Generator, batch: int = 64,
                         advance: Progress | None = None) -> RetainData:
    """The data-free retain pool: the teacher's generations of the reference prompts (and of the empty caption),
    noised at random timesteps, with the teacher's own prediction as the target."""
    texts = [p.text for p in references[:n_prompts]]
    if not texts:
        raise BadInputError("repair: no reference prompts to distil on", "give reference prompts")
    captions = _embed(pipe, [""] + texts)
    latents = sample_latents(pipe, teacher_unet, captions[1:], list(range(n_seeds)), steps, guidance,
                             advance=advance)
    flat = latents.flatten(0, 1)  # [prompts * seeds, C, h, w]
    owner = torch.arange(len(texts)).repeat_interleave(n_seeds) + 1
    keep = torch.ones(len(flat), dtype=torch.bool)
    if avoid:
        for j, img in enumerate(decode_latents(pipe, flat)):
            keep[j] = not any(sim(img, a) >= sim.threshold for a in avoid)
    flat, owner = flat[keep], owner[keep]
    if len(flat) == 0:
        raise BadInputError("repair: every teacher generation of the reference prompts reproduces a memorized image",
                            "give other reference prompts, or user pairs in repair.retain")
    pool_data = distillation_pool(teacher_unet, pipe.scheduler, flat, owner, captions, empty_fraction=empty_fraction,
                                  pool=pool, generator=generator, batch=batch)
    pool_data.notes.update({"generations": int(keep.numel()), "dropped_as_memorized": int((~keep).sum()),
                            "prompts": len(texts), "seeds": n_seeds})
    return pool_data


@torch.no_grad()
def distillation_pool(teacher_unet, scheduler, latents: torch.Tensor, owner: torch.Tensor, captions: torch.Tensor, *,
                      empty_fraction: float, pool: int, generator: torch.Generator, batch: int = 64) -> RetainData:
    """`pool` samples: a latent (and its caption, or with `empty_fraction` the empty caption, captions[0]) noised
    at t ~ U(0, T), with the teacher's prediction there as the target."""
    param = next(teacher_unet.parameters())
    pick = torch.randint(0, len(latents), (pool,), generator=generator)
    empty = torch.rand(pool, generator=generator) < empty_fraction
    caption_index = torch.where(empty, torch.zeros_like(owner[pick]), owner[pick])
    noise = torch.randn((pool, *latents.shape[1:]), generator=generator)
    timesteps = torch.randint(0, int(scheduler.config.num_train_timesteps), (pool,), generator=generator)
    x_t, _ = diffusion_targets(scheduler, latents[pick], noise, timesteps)
    targets = []
    for s in range(0, pool, batch):
        sl = slice(s, s + batch)
        pred = teacher_unet(x_t[sl].to(param.device, param.dtype), timesteps[sl].to(param.device),
                            encoder_hidden_states=captions[caption_index[sl]].to(param.device, param.dtype))
        targets.append(pred.sample.float().cpu())
    return RetainData("distill", captions, x_t, caption_index, timesteps, torch.cat(targets),
                      {"pool": pool, "empty_caption": int(empty.sum())})


def prepare_pairs(pipe, pairs: Sequence[Prompt]) -> RetainData:
    """User image-caption pairs, encoded once: latents and caption embeddings for the ordinary diffusion loss."""
    size = image_size(pipe)
    images = [fit(read_image(p.image, "repair.retain"), size)[0] for p in pairs]
    latents = torch.cat([encode_images(pipe.vae, images[s:s + 64]).cpu() for s in range(0, len(images), 64)])
    captions = _embed(pipe, [p.text for p in pairs])
    return RetainData("pairs", captions, latents, torch.arange(len(pairs)), notes={"pairs": len(pairs)})

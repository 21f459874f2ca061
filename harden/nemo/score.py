"""NeMo's memorization score: how consistent the first-step noise prediction is across seeds.

delta = eps(x_T, t_1, y) - x_T at the second timestep of a 50-step DDIM grid (t = 961 for SD v1: the official code
discards the t = 981 pass and predicts again on the unchanged x_T), no guidance, n seeds from one seeded draw,
min-max normalized per sample and channel, compared with 3-scale MS-SSIM (torchmetrics, the official settings).

Models that predict v (SD 2.x) or x_0 are scored on the epsilon their output implies at that timestep
(`Prediction`), so the score means the same thing for every parameterization. MS-SSIM comes in two forms
(`ScoreSettings.ms_ssim`): "standard" (torchmetrics >= 1.4.2, the SSIM map of the last scale averaged whole) and
"official_1_3_2" (torchmetrics 1.3.2, which the official NeMo code pins: that map cropped to the windows that lie
fully inside the image, as the contrast maps are). NeMo's tau_mem = 0.428 for SD v1.4 was measured with the latter.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional import multiscale_structural_similarity_index_measure

from ..errors import BadInputError
from ..hooks import channel_masks
from ..targets import Target, latent_size
from .conditioning import call_unet

Candidate = Mapping[str, Sequence[int]]  # {layer name: channel indices (a list; repeats allowed, as NeMo)}


@dataclass(frozen=True)
class ScoreSettings:
    """Official NeMo defaults (README of the spec, section 2.5)."""

    n_seeds: int = 10
    seed: int = 1
    num_inference_steps: int = 50
    timestep_index: int = 1  # 1 = the second timestep (t=961), what the official code scores
    kernel_size: int = 11
    betas: tuple[float, ...] = (0.33, 0.33, 0.33)
    seed_threshold: float = 0.428  # a seed is kept when its max pairwise MS-SSIM is > this
    factor: float = 0.0  # deactivation: masked channels are multiplied by this
    max_batch: int = 64  # samples per UNet forward
    fp16_autocast: bool = True  # on CUDA only, as the official code; CPU runs in the UNet's dtype
    ms_ssim: str = "standard"  # or "official_1_3_2": the last scale's SSIM map cropped (module docstring)


MS_SSIM_FORMS = ("standard", "official_1_3_2")


_GAUSSIAN_PAD = 5  # (11 - 1) / 2: torchmetrics' Gaussian window for sigma 1.5
_K1, _K2 = 0.01, 0.03  # SSIM's stabilizing constants (torchmetrics' defaults)


def check_ms_ssim_size(size: Sequence[int], settings: ScoreSettings) -> None:
    """Raise BadInputError where torchmetrics' MS-SSIM would fail on latents of this (height, width); the official
    1.3.2 form also needs a coarsest scale wider than both paddings (else its cropped map is empty: NaN)."""
    if settings.ms_ssim not in MS_SSIM_FORMS:
        raise BadInputError(f"unknown MS-SSIM form {settings.ms_ssim!r}", f"use one of {', '.join(MS_SSIM_FORMS)}")
    scales = len(settings.betas)
    side = min(size)
    need = (settings.kernel_size - 1) * 2 ** (scales - 1)
    coarsest = 2 * _GAUSSIAN_PAD if settings.ms_ssim == "official_1_3_2" else _GAUSSIAN_PAD
    if side <= need or side // 2 ** (scales - 1) <= coarsest:
        raise BadInputError(
            f"latents of {tuple(size)} are too small for {scales}-scale MS-SSIM in its {settings.ms_ssim} form "
            f"(need more than {need} pixels per side and more than {coarsest} at the coarsest scale)",
            "use a larger sample size, or fewer betas (scales) in the detection settings")


def ms_ssim(a: torch.Tensor, b: torch.Tensor, settings: ScoreSettings) -> torch.Tensor:
    """Per-pair MS-SSIM [N]. torchmetrics' data_range=None rule (max-min over the whole batch) is kept on purpose.

    With its Gaussian window (sigma 1.5, as the official code) torchmetrics always filters with 11 taps and uses
    `kernel_size` only in its minimum-size check; so the latents need both that size and a coarsest scale wider
    than the window's 5-pixel reflect padding.
    """
    check_ms_ssim_size(a.shape[-2:], settings)
    if settings.ms_ssim == "official_1_3_2":  # one batch: one data range per scale, as torchmetrics 1.3.2
        return ms_ssim_groups(a, b, [len(a)], settings)
    return multiscale_structural_similarity_index_measure(
        a.float(), b.float(), reduction="none", kernel_size=settings.kernel_size, betas=tuple(settings.betas))


def _gaussian_window(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torchmetrics' depthwise 11x11 Gaussian window (sigma 1.5) [channels, 1, 11, 11], built the same way."""
    size = 2 * _GAUSSIAN_PAD + 1
    dist = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=dtype, device=device)
    g = torch.exp(-torch.pow(dist / 1.5, 2) / 2)
    g = (g / g.sum()).unsqueeze(0)
    return torch.matmul(g.t(), g).expand(channels, 1, size, size)


def ms_ssim_groups(a: torch.Tensor, b: torch.Tensor, sizes: Sequence[int], settings: ScoreSettings) -> torch.Tensor:
    """Per-pair MS-SSIM [N] of consecutive groups of pairs (`sizes`, summing to N) in one pass: what one `ms_ssim`
    call per group returns, each group with its own data range at every scale (torchmetrics' data_range=None rule).

    Why: a search scores many candidates, each against its own kept seeds; one torchmetrics call per candidate
    costs about a millisecond of fixed overhead on the CPU, as much as the UNet spends on a sample. Same formula as
    torchmetrics (Gaussian window, reflect padding, ReLU-normalized terms, last scale's SSIM, contrast terms
    elsewhere); equal to the per-group calls to float rounding. In the "official_1_3_2" form the last scale's SSIM
    map is cropped by the padding before it is averaged, as torchmetrics 1.3.2 did (the contrast maps always are).
    """
    check_ms_ssim_size(a.shape[-2:], settings)
    a, b = a.float(), b.float()
    n, channels = a.shape[:2]
    if b.shape != a.shape or any(k < 1 for k in sizes) or sum(sizes) != n:
        raise ValueError(f"groups of {list(sizes)} pairs do not split {n} pairs of {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    group = torch.repeat_interleave(torch.arange(len(sizes), device=a.device),
                                    torch.as_tensor(list(sizes), device=a.device))
    window, p = _gaussian_window(channels, a.dtype, a.device), _GAUSSIAN_PAD

    def span(x: torch.Tensor) -> torch.Tensor:  # per group max - min, one value per pair [n, 1, 1, 1]
        flat = x.reshape(n, -1)
        hi = flat.new_full((len(sizes),), -torch.inf).scatter_reduce(0, group, flat.amax(1), "amax")
        lo = flat.new_full((len(sizes),), torch.inf).scatter_reduce(0, group, flat.amin(1), "amin")
        return (hi - lo)[group].view(n, 1, 1, 1)

    terms = []
    for scale in range(len(settings.betas)):
        data_range = torch.maximum(span(a), span(b))
        c1, c2 = torch.pow(_K1 * data_range, 2), torch.pow(_K2 * data_range, 2)
        pa, pb = (F.pad(x, (p, p, p, p), mode="reflect") for x in (a, b))
        mu_a, mu_b, aa, bb, ab = F.conv2d(torch.cat((pa, pb, pa * pa, pb * pb, pa * pb)), window,
                                          groups=channels).split(n)
        mu_aa, mu_bb, mu_ab = mu_a.pow(2), mu_b.pow(2), mu_a * mu_b
        upper = 2 * (ab - mu_ab) + c2
        lower = torch.clamp(aa - mu_aa, min=0.0) + torch.clamp(bb - mu_bb, min=0.0) + c2
        if scale == len(settings.betas) - 1:
            ssim = ((2 * mu_ab + c1) * upper) / ((mu_aa + mu_bb + c1) * lower)
            if settings.ms_ssim == "official_1_3_2":
                ssim = ssim[..., p:-p, p:-p]
            terms.append(torch.relu(ssim.reshape(n, -1).mean(-1)))
        else:
            cs = (upper / lower)[..., p:-p, p:-p]
            terms.append(torch.relu(cs.reshape(n, -1).mean(-1)))
            a, b = F.avg_pool2d(a, (2, 2)), F.avg_pool2d(b, (2, 2))
    betas = torch.tensor(settings.betas, device=a.device).view(-1, 1)
    return torch.prod(torch.stack(terms) ** betas, dim=0)


def normalize(delta: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] per sample and per latent channel, over the spatial dims."""
    lo = delta.amin(dim=(2, 3), keepdim=True)
    hi = delta.amax(dim=(2, 3), keepdim=True)
    return (delta - lo) / (hi - lo)


def pairwise_max(deltas: torch.Tensor, settings: ScoreSettings) -> torch.Tensor:
    """For each seed, the max MS-SSIM over the pairs that contain it; all pairs scored in one batch [n]."""
    n = deltas.shape[0]
    pairs = torch.combinations(torch.arange(n), r=2)
    scores = ms_ssim(deltas[pairs[:, 0]], deltas[pairs[:, 1]], settings)
    return torch.stack([scores[(pairs == i).any(-1)].max() for i in range(n)])


def calibrate_threshold(max_pairwise: torch.Tensor) -> float:
    """tau_mem = mean + 1 (unbiased) std of each reference prompt's max pairwise score."""
    if max_pairwise.numel() < 2:
        raise ValueError("tau_mem needs the scores of at least 2 reference prompts")
    return float(max_pairwise.mean() + max_pairwise.std())


def detection_timestep(scheduler_config, settings: ScoreSettings) -> int:
    """The timestep the score is taken at, from a fresh DDIM scheduler with the pipeline's config."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(settings.num_inference_steps)
    return int(sched.timesteps[settings.timestep_index])


@dataclass(frozen=True)
class Prediction:
    """What the UNet outputs, and alpha-bar at the scored timestep.

    Why: NeMo's delta is defined on the noise prediction (SD v1 predicts epsilon). With x_t = a x_0 + s eps
    (a = sqrt(alpha-bar), s = sqrt(1 - alpha-bar)), a v-prediction v = a eps - s x_0 implies eps = a v + s x_t, and
    an x_0-prediction implies eps = (x_t - a x_0) / s: the same quantity the DDIM step uses, so every
    parameterization is scored on the same thing.
    """

    kind: str = "epsilon"  # the scheduler config's prediction_type: epsilon, v_prediction or sample
    alpha_cumprod: float = 1.0

    def epsilon(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "epsilon":
            return out
        a, s = self.alpha_cumprod ** 0.5, (1.0 - self.alpha_cumprod) ** 0.5
        if self.kind == "v_prediction":
            return a * out + s * x
        return (x - a * out) / s  # "sample"


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def detection_prediction(scheduler_config, settings: ScoreSettings) -> Prediction:
    """The model's parameterization and alpha-bar at the detection timestep (DDIM grid of the pipeline's config)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    kind = sched.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise BadInputError(f"the scheduler's prediction_type {kind!r} is not one harden can score",
                            f"harden supports {', '.join(PREDICTION_TYPES)}")
    sched.set_timesteps(settings.num_inference_steps)
    t = int(sched.timesteps[settings.timestep_index])
    return Prediction(kind, float(sched.alphas_cumprod[t]))


def initial_latents(n: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """All n latents from one CPU generator seeded once and one randn call (what the official code draws)."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@dataclass
class ForwardCounter:
    unet_forwards: int = 0
    sample_forwards: int = 0
    forward_seconds: float = 0.0  # wall time inside UNet calls (CPU; on CUDA only the launches without a sync)


@dataclass
class NoiseDiffScorer:
    """Runs the UNet for the score. Candidate neuron sets become per-sample channel masks, so many share a forward."""

    unet: torch.nn.Module
    targets: list[Target]
    timestep: int
    settings: ScoreSettings = field(default_factory=ScoreSettings)
    counter: ForwardCounter = field(default_factory=ForwardCounter)
    prediction: Prediction = field(default_factory=Prediction)  # v/x_0-prediction models: see `Prediction`
    sharing = 1  # how many prompts' searches share this scorer's forwards (`pool.PooledScorer` sets it)

    def __post_init__(self):
        cfg = self.unet.config
        self.latents = initial_latents(self.settings.n_seeds, (cfg.in_channels, *latent_size(self.unet)),
                                       self.settings.seed)
        self.widths = {t.name: t.width for t in self.targets}

    def _autocast(self, device: torch.device):
        if device.type == "cuda" and self.settings.fp16_autocast:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def noise_diff(self, embeds: torch.Tensor, seeds: torch.Tensor, masks: dict[str, torch.Tensor] | None = None,
                   max_batch: int | None = None, solo: bool = False):
        """Normalized delta for samples (embeds[i], latent seeds[i]) with optional per-sample masks; chunked by
        `max_batch` samples (default: the settings'). `solo`: the official layout, these samples alone in forwards
        of the settings' `max_batch` (a pooled scorer shares forwards otherwise), whatever `max_batch` says."""
        param = next(self.unet.parameters())
        chunk = self.settings.max_batch if solo else (max_batch or self.settings.max_batch)
        outs = []
        for s in range(0, len(seeds), chunk):
            sl = slice(s, s + chunk)
            x = self.latents[seeds[sl]].to(param.device)
            ctx = embeds[sl].to(device=param.device, dtype=param.dtype)
            chunk_masks = {k: (v if v.shape[0] == 1 else v[sl]) for k, v in (masks or {}).items()}  # [1, w] broadcasts
            started = time.perf_counter()
            with channel_masks(self.targets, chunk_masks), self._autocast(param.device):
                out = call_unet(self.unet, x.to(param.dtype), self.timestep, ctx)  # SDXL: added conditions
            self.counter.forward_seconds += time.perf_counter() - started
            self.counter.unet_forwards += 1
            self.counter.sample_forwards += len(x)
            eps = self.prediction.epsilon(out.float(), x.float())
            outs.append(normalize(eps - x.float()))
        return torch.cat(outs)

    def unblocked(self, embed: torch.Tensor) -> torch.Tensor:
        """delta for all n seeds of one prompt embedding [1, tokens, dim]."""
        n = self.settings.n_seeds
        return self.noise_diff(embed.expand(n, -1, -1), torch.arange(n))

    def seed_filter(self, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-seed max pairwise score [n], kept seeds as indices): a seed is kept when its score is > threshold."""
        per_seed = pairwise_max(deltas, self.settings)
        return per_seed, torch.nonzero(per_seed > self.settings.seed_threshold).flatten()

    def candidate_masks(self, candidates: Sequence[Candidate], repeats: int) -> dict[str, torch.Tensor]:
        """[len(candidates) * repeats, width] masks; each candidate's row repeated for its seeds."""
        layers = sorted({name for c in candidates for name, idx in c.items() if len(idx)})
        masks = {}
        for name in layers:
            m = torch.ones(len(candidates), self.widths[name])
            for row, cand in enumerate(candidates):
                idx = list(cand.get(name, ()))
                if idx:
                    m[row, idx] = self.settings.factor
            masks[name] = m.repeat_interleave(repeats, dim=0)
        return masks

    def blocked_scores(self, embed: torch.Tensor, kept: torch.Tensor, reference: torch.Tensor,
                       candidates: Sequence[Candidate], max_batch: int | None = None) -> list[torch.Tensor]:
        """Per kept seed, MS-SSIM(unblocked delta, delta with the candidate blocked), for each candidate.

        All candidates run in shared UNet batches; each candidate's MS-SSIM batch is its own kept seeds, so the
        batch-wide data range is the one the official code sees.
        """
        if not candidates:
            return []
        k = len(kept)
        seeds = kept.repeat(len(candidates))
        scores = self.compare(embed.expand(len(seeds), -1, -1), seeds, self.candidate_masks(candidates, k),
                              reference.repeat(len(candidates), 1, 1, 1), [k] * len(candidates), max_batch)
        return list(scores.split(k))

    def compare(self, embeds: torch.Tensor, seeds: torch.Tensor, masks: dict[str, torch.Tensor] | None,
                against: torch.Tensor, sizes: Sequence[int], max_batch: int | None = None) -> torch.Tensor:
        """MS-SSIM of each sample's delta (`noise_diff`) with its row of `against`, in MS-SSIM batches of `sizes`
        consecutive samples [samples]. A pooled scorer scores all prompts' samples of a forward in one call."""
        return ms_ssim_groups(against, self.noise_diff(embeds, seeds, masks, max_batch), sizes, self.settings)


def max_pairwise_scores(scorer: NoiseDiffScorer, embeds: torch.Tensor,
                        keep_deltas: list | None = None) -> torch.Tensor:
    """Detection score of each prompt [P]: the max over seed pairs of MS-SSIM between unblocked deltas.

    Prompts share UNet batches (chunked by `max_batch` samples); each prompt's pairs form their own MS-SSIM batch.
    `keep_deltas` receives each prompt's deltas [n_seeds, C, H, W], so localization need not recompute them.
    """
    n = scorer.settings.n_seeds
    seeds = torch.arange(n).repeat(len(embeds))
    deltas = scorer.noise_diff(embeds.repeat_interleave(n, dim=0), seeds)
    if keep_deltas is not None:
        keep_deltas.extend(deltas.split(n))
    return torch.stack([pairwise_max(deltas[i * n:(i + 1) * n], scorer.settings).max() for i in range(len(embeds))])

"""The per-caption memorization scores of `harden scan`, batched over captions and seeds.

- `wen`: Wen et al.'s text-conditional noise magnitude, ||eps(x_t, c) - eps(x_t, "")||_2 over the whole latent,
  averaged over the first `steps` DDIM steps of the CFG trajectory and over `seeds` latents (the paper's headline
  setting: the first step, one latent; one CFG forward per caption).
- `nemo`: NeMo's first-step score (max pairwise MS-SSIM of normalized eps - x_T over 10 seeds at t=961), computed by
  `harden.nemo.score` exactly as the detect stage does.
- `attn`: MemAttn's "LE" entropy: one cross-attention layer's softmax probabilities of the conditional branch at the
  first step, averaged over heads and query pixels, entropy over all token positions. It is read from the conditional
  half of Wen's first forward by a processor wrapper on that one layer, so it costs one layer's softmax.

Every score is "higher = more likely memorized". Why one module: the three share the latents, the batching and the
autocast rules, and the scan's shards call them as one function.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from ..errors import BadInputError
from ..nemo.conditioning import call_unet
from ..nemo.score import (PREDICTION_TYPES, NoiseDiffScorer, Prediction, ScoreSettings, check_ms_ssim_size,
                          detection_prediction, detection_timestep, initial_latents, max_pairwise_scores)
from ..targets import Target, latent_size, resolve_targets

SCORES = ("wen", "nemo", "attn")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_CALL_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}  # how a UNet's forward meets its blocks


@dataclass(frozen=True)
class ScanSettings:
    """What is computed per caption. Results depend on every field (batch layout included, to float rounding), so a
    resumed scan must use the same settings."""

    scores: tuple[str, ...] = ("wen", "attn")
    primary: str = "wen"  # the score that ranks captions and is thresholded
    seeds: int = 1  # wen/attn: latents per caption (Wen's headline: 1)
    steps: int = 1  # wen: first DDIM steps averaged (Wen's headline: 1)
    guidance_scale: float = 7.5  # wen with steps > 1: the CFG trajectory the later steps follow
    num_inference_steps: int = 50  # the DDIM grid the first step(s) come from (t=981 first for SD v1)
    seed: int = 0  # wen/attn: one CPU generator draws all `seeds` latents, the same ones for every caption
    attn_layer: int = 3  # attn: cross-attention layer in call order (MemAttn: 3 = SD v1's down_blocks.1.attentions.1)
    nemo_seeds: int = 10
    nemo_seed: int = 1
    nemo_kernel_size: int | None = None  # None: the official 11 and 3 scales where the latents allow, else fewer
    nemo_betas: tuple[float, ...] | None = None
    batch_size: int = 64  # samples per UNet forward (a CFG pair counts 2)
    precision: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU

    def check(self) -> None:
        """BadInputError for a combination that cannot run, naming the option to change."""
        unknown = [s for s in self.scores if s not in SCORES]
        if not self.scores or unknown or len(set(self.scores)) != len(self.scores):
            raise BadInputError(f"--scores {','.join(self.scores)!r}: give each of {', '.join(SCORES)} at most once",
                                "e.g. --scores wen,attn or --scores wen,nemo,attn")
        if self.primary not in self.scores:
            raise BadInputError(f"--primary {self.primary!r} is not among the computed scores {list(self.scores)}",
                                "add it to --scores")
        for name, value, low in (("--seeds", self.seeds, 1), ("--steps", self.steps, 1),
                                 ("--nemo-seeds", self.nemo_seeds, 2), ("--batch-size", self.batch_size, 1)):
            if value < low:
                raise BadInputError(f"{name} must be at least {low}, got {value}")
        if self.steps > self.num_inference_steps:
            raise BadInputError(f"--steps {self.steps} is more than the {self.num_inference_steps}-step DDIM grid")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if (self.nemo_kernel_size is None) != (self.nemo_betas is None):
            raise BadInputError("give both the NeMo kernel size and betas, or neither (automatic)")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "ScanSettings":
        raw = dict(raw)
        for key in ("scores", "nemo_betas"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        return cls(**raw)


def model_dtype(precision: str) -> str:
    """The `ModelSection.dtype` a precision loads the pipeline in."""
    return {"auto": "auto", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]


def nemo_ms_ssim(size: tuple[int, int]) -> tuple[int, tuple[float, ...]]:
    """(kernel size, betas) for NeMo's MS-SSIM on latents of `size`: the official 11 / 3 scales when they fit, else
    the most scales and then the largest odd kernel that do (16x16 latents: 7 / 2 scales, as the shipped memorizer)."""
    for scales in (3, 2, 1):
        betas = (round(1 / scales, 2),) * scales
        for kernel in (11, 9, 7, 5, 3):
            try:
                check_ms_ssim_size(size, ScoreSettings(kernel_size=kernel, betas=betas))
            except BadInputError:
                continue
            return kernel, betas
    raise BadInputError(f"latents of {tuple(size)} are too small for NeMo's MS-SSIM", "leave nemo out of --scores")


def attention_layers(unet) -> list[Target]:
    """Every cross-attention layer in the order the UNet's forward calls them: down blocks, mid block, up blocks."""
    layers = resolve_targets(unet, "all")
    return sorted(layers, key=lambda t: _CALL_ORDER.get(t.name.split(".")[0], len(_CALL_ORDER)))


@torch.no_grad()
def token_distribution(attn, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T * scale) of one Attention module, averaged over heads and queries [B, tokens], in fp32.

    Computed apart from the layer's own (fused) attention, so the UNet's output is untouched by the measurement.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        if attn.group_norm is not None:
            hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k = attn.to_q(hidden).float(), attn.to_k(context).float()
        b, heads = q.shape[0], attn.heads
        q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)  # [B, heads, queries, head_dim]
        k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)  # [B, heads, tokens, head_dim]
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
        return probs.mean(dim=(1, 2))


def entropy(dist: torch.Tensor) -> torch.Tensor:
    """-sum p ln p over the last axis (0 ln 0 = 0)."""
    return torch.special.entr(dist).sum(-1)


class AttentionEntropy:
    """Wraps one cross-attention layer's processor while recording: the token distribution of the chosen batch rows
    (the conditional half of a CFG batch) is kept, the layer's output comes from its own processor unchanged."""

    def __init__(self, target: Target):
        self.target = target
        self.rows: slice | None = None
        self.dist: torch.Tensor | None = None

    @contextlib.contextmanager
    def recording(self, rows: slice) -> Iterator[None]:
        attn = self.target.attn
        inner = attn.processor
        self.rows, self.dist, self.inner = rows, None, inner
        attn.set_processor(self)
        try:
            yield
        finally:
            attn.set_processor(inner)
            self.rows = None
        if self.dist is None:
            raise RuntimeError(f"{self.target.name} was not called in the forward (replaced module?)")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None and self.rows is not None:
            self.dist = token_distribution(attn, hidden_states[self.rows], encoder_hidden_states[self.rows])
        if temb is not None:
            kwargs["temb"] = temb
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    def take(self) -> torch.Tensor:
        """Entropy per recorded row [rows], on the CPU."""
        return entropy(self.dist).cpu()


class CaptionScorer:
    """Scores caption embeddings [P, tokens, dim] with the chosen scores; every seed of every caption in shared UNet
    forwards of `batch_size` samples; fp16/bf16 autocast on CUDA when the precision asks for it."""

    def __init__(self, unet, scheduler_config, uncond: torch.Tensor, settings: ScanSettings):
        from diffusers import DDIMScheduler

        settings.check()
        self.unet, self.settings = unet, settings
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.scheduler.set_timesteps(settings.num_inference_steps)
        self.kind = self.scheduler.config.prediction_type
        if self.kind not in PREDICTION_TYPES:
            raise BadInputError(f"the scheduler's prediction_type {self.kind!r} is not one harden can score",
                                f"harden supports {', '.join(PREDICTION_TYPES)}")
        shape = (unet.config.in_channels, *latent_size(unet))
        self.latents = initial_latents(settings.seeds, shape, settings.seed) * self.scheduler.init_noise_sigma
        self.uncond = uncond
        layers = attention_layers(unet)  # refuses a model without cross-attention
        self.entropy = None
        if "attn" in settings.scores:
            if not 0 <= settings.attn_layer < len(layers):
                raise BadInputError(f"--attn-layer {settings.attn_layer}: the model has {len(layers)} cross-attention "
                                    f"layers (0..{len(layers) - 1})", "MemAttn uses 3 (SD v1)")
            self.entropy = AttentionEntropy(layers[settings.attn_layer])
        self.nemo = None
        if "nemo" in settings.scores:
            kernel, betas = ((settings.nemo_kernel_size, settings.nemo_betas) if settings.nemo_betas is not None
                             else nemo_ms_ssim(latent_size(unet)))
            nemo = ScoreSettings(n_seeds=settings.nemo_seeds, seed=settings.nemo_seed, kernel_size=kernel,
                                 betas=tuple(betas), max_batch=settings.batch_size,
                                 fp16_autocast=self.dtype == torch.float16)
            check_ms_ssim_size(latent_size(unet), nemo)
            self.nemo = NoiseDiffScorer(unet, resolve_targets(unet, "all"), detection_timestep(scheduler_config, nemo),
                                        nemo, prediction=detection_prediction(scheduler_config, nemo))
        self.unet_forwards = 0

    @property
    def attn_layer_name(self) -> str | None:
        return self.entropy.target.name if self.entropy else None

    @property
    def nemo_ms_ssim(self) -> dict | None:
        if self.nemo is None:
            return None
        return {"kernel_size": self.nemo.settings.kernel_size, "betas": list(self.nemo.settings.betas),
                "timestep": self.nemo.timestep}

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def score(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """{score name: [P] float32 on the CPU}, in the settings' order."""
        out: dict[str, torch.Tensor] = {}
        if "wen" in self.settings.scores or "attn" in self.settings.scores:
            out.update(self._first_steps(embeds))
        if self.nemo is not None:
            per = max(1, self.settings.batch_size // self.settings.nemo_seeds)  # captions whose seeds fill a forward
            out["nemo"] = torch.cat([max_pairwise_scores(self.nemo, embeds[i:i + per]).float().cpu()
                                     for i in range(0, len(embeds), per)])
            self.unet_forwards += self.nemo.counter.unet_forwards
            self.nemo.counter.unet_forwards = 0
        return {name: out[name] for name in self.settings.scores}

    @torch.no_grad()
    def _first_steps(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Wen's norm (CFG pairs [uncond, cond]) and the attention entropy of the conditional half at the first
        step; without wen, conditional forwards only. Each (caption, seed) pair is one sample."""
        s = self.settings
        cfg = "wen" in s.scores
        n, captions = s.seeds, len(embeds)
        caption_of = torch.arange(captions).repeat_interleave(n)
        seed_of = torch.arange(n).repeat(captions)
        per = max(1, s.batch_size // 2) if cfg else s.batch_size
        wen = torch.zeros(captions * n)
        ent = torch.zeros(captions * n)
        uncond = self.uncond.to(device=self.device, dtype=self.dtype)
        for start in range(0, captions * n, per):
            sl = slice(start, start + per)
            x = self.latents[seed_of[sl]].to(self.device)
            cond = embeds[caption_of[sl]].to(device=self.device, dtype=self.dtype)
            m = len(x)
            for step, t in enumerate(self.scheduler.timesteps[:s.steps if cfg else 1]):
                x_in = torch.cat([x, x]) if cfg else x
                ctx = torch.cat([uncond.expand(m, -1, -1), cond]) if cfg else cond
                x_in = self.scheduler.scale_model_input(x_in, t).to(self.dtype)
                record = (self.entropy.recording(slice(m, 2 * m) if cfg else slice(0, m))
                          if self.entropy is not None and step == 0 else contextlib.nullcontext())
                with record, self._autocast():
                    out = call_unet(self.unet, x_in, t, ctx).float()  # SDXL: added conditions unpacked
                self.unet_forwards += 1
                if self.entropy is not None and step == 0:
                    ent[sl] = self.entropy.take()
                if not cfg:
                    break
                out_u, out_c = out.chunk(2)
                eps = Prediction(self.kind, float(self.scheduler.alphas_cumprod[t]))  # v / x_0 models: their epsilon
                wen[sl] += (eps.epsilon(out_c, x) - eps.epsilon(out_u, x)).flatten(1).norm(dim=1).cpu()
                if step + 1 < s.steps:
                    guided = out_u + s.guidance_scale * (out_c - out_u)
                    x = self.scheduler.step(guided, t, x).prev_sample
        out = {}
        if cfg:
            out["wen"] = (wen / s.steps).view(captions, n).mean(1)
        if self.entropy is not None:
            out["attn"] = ent.view(captions, n).mean(1)
        return out

"""Per-neuron activation statistics of the value projections, from the text encoder and `to_v` alone.

Why no UNet: `to_v` only ever sees the text embedding, so a(y) = mean over the 77 token positions of |to_v(E(y))|
is the same whatever the noise or timestep. Calibrating on 50,000 prompts then takes minutes, not hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..targets import Target


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """E = last hidden state of the text encoder for prompts padded (and truncated) to the tokenizer's max length."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0].float()


def iter_embeddings(tokenizer, text_encoder, prompts: Sequence[str], batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Embeddings in batches, so that 50,000 prompts never sit in memory at once."""
    for start in range(0, len(prompts), batch_size):
        yield encode_prompts(tokenizer, text_encoder, prompts[start:start + batch_size])


@torch.no_grad()
def value_activations(embeds: torch.Tensor, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
    """a_i(y) = mean over all token positions (padding included, as NeMo) of |to_v(E)_i|, per layer: [B, width].

    Only the first `to_v.in_features` columns are the context `to_v` reads; for an SDXL-style UNet the columns after
    them carry the packed added conditions (`conditioning.pack`), which never reach a value projection.
    """
    out = {}
    for t in targets:
        w = t.to_v.weight.to(device=embeds.device, dtype=torch.float32)
        b = None if t.to_v.bias is None else t.to_v.bias.to(device=embeds.device, dtype=torch.float32)
        out[t.name] = F.linear(embeds[..., :w.shape[1]].float(), w, b).abs().mean(dim=1)
    return out


@dataclass
class NeuronStats:
    """Mean and unbiased std over reference prompts of each value neuron's activation, per layer."""

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]
    count: int

    def zscores(self, acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """|a - mu| / sigma (two-sided, as the official code and the paper's text)."""
        return {name: (a - self.mean[name]).abs() / self.std[name] for name, a in acts.items()}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        flat = {f"mean::{k}": v.contiguous() for k, v in self.mean.items()}
        flat.update({f"std::{k}": v.contiguous() for k, v in self.std.items()})
        flat["count"] = torch.tensor([self.count])
        return flat

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> "NeuronStats":
        mean = {k.split("::", 1)[1]: v for k, v in flat.items() if k.startswith("mean::")}
        std = {k.split("::", 1)[1]: v for k, v in flat.items() if k.startswith("std::")}
        return cls(mean, std, int(flat["count"][0]))


def compute_stats(batches: Iterator[torch.Tensor], targets: Sequence[Target],
                  progress: Callable[[int], None] | None = None) -> NeuronStats:
    """Streaming mean / unbiased std (float64 accumulators) over embedding batches [B, tokens, dim]."""
    total: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    n = 0
    for embeds in batches:
        for name, a in value_activations(embeds, targets).items():
            a = a.double()
            total[name] = total.get(name, 0) + a.sum(0)
            squares[name] = squares.get(name, 0) + (a * a).sum(0)
        n += embeds.shape[0]
        if progress:
            progress(embeds.shape[0])
    if n < 2:
        raise ValueError(f"activation statistics need at least 2 reference prompts, got {n}")
    mean = {k: v / n for k, v in total.items()}
    var = {k: ((squares[k] - n * mean[k] ** 2) / (n - 1)).clamp_min(0) for k in total}
    return NeuronStats({k: v.float() for k, v in mean.items()}, {k: v.sqrt().float() for k, v in var.items()}, n)

"""The only place that registers forward hooks: per-sample channel masks on `to_v` outputs.

Why per-sample masks (shape [B, width]) rather than a module-wide "zero these channels" hook: different candidate
neuron sets can then share one batched UNet forward, which is what makes localization fast.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

from .targets import Target


@contextmanager
def channel_masks(targets: list[Target], masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Multiply each target's `to_v` output [B, tokens, width] by masks[name] of shape [B, width] or [1, width].

    Layers without a mask are untouched. Hooks are always removed (also on error), and every hook must fire at
    least once inside the block, so a hook that silently never runs (replaced module, fused projection) is an error.
    """
    by_name = {t.name: t for t in targets}
    unknown = set(masks) - set(by_name)
    if unknown:
        raise KeyError(f"masks for unknown layers: {sorted(unknown)}")
    fired: dict[str, int] = {}
    handles = []

    def make_hook(name: str, mask: torch.Tensor):
        def hook(module, args, output):
            fired[name] = fired.get(name, 0) + 1
            m = mask.to(device=output.device, dtype=output.dtype)
            if m.shape[0] not in (1, output.shape[0]) or m.shape[-1] != output.shape[-1]:
                raise ValueError(f"mask for {name} has shape {tuple(m.shape)}, output has {tuple(output.shape)}")
            return output * m.unsqueeze(1)
        return hook

    try:
        for name, mask in masks.items():
            handles.append(by_name[name].to_v.register_forward_hook(make_hook(name, mask)))
        yield
        silent = [n for n in masks if n not in fired]
        if silent:
            raise RuntimeError(f"channel-mask hooks never fired on {silent}: the forward did not use those to_v")
    finally:
        for h in handles:
            h.remove()

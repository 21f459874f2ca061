"""The pruned structure holds while the repaired UNet trains: removed value channels stay removed.

Why masks *and* re-zeroing: a zero gradient keeps plain SGD from touching a pruned row, but weight decay, optimizer
eps or float noise could still move it; setting the rows back to exactly zero after every step makes "the dense
export has these rows at 0" an invariant, not a hope. A compact UNet has no such rows (its shapes are the pruned
shapes), so only the choice of trainable parameters applies there; the shapes cannot change under an optimizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..compact_unet import CompactUNet2DConditionModel
from ..errors import BadInputError
from ..neurons import NeuronSet


def trainable_names(unet: torch.nn.Module, train: str) -> list[str]:
    """Parameter names that train: all of them, or those a regex finds (re.search); refuses a regex matching none."""
    names = [n for n, _ in unet.named_parameters()]
    if train == "all":
        return names
    pattern = re.compile(train)
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise BadInputError(f"repair.train {train!r} matches none of the UNet's {len(names)} parameters "
                            f"({names[0]}, ...)", "use 'all' or a regex such as 'attn2|up_blocks'")
    return chosen


def check_repairable(unet: torch.nn.Module) -> None:
    """Only a stock `UNet2DConditionModel` (pruned dense by harden) or harden's own compact UNet can be repaired:
    for any other class (another tool's pruned model, custom code) harden cannot know which channels were removed,
    so it cannot keep them removed."""
    from diffusers import UNet2DConditionModel

    if type(unet) not in (UNet2DConditionModel, CompactUNet2DConditionModel):
        raise BadInputError(f"repair cannot fine-tune a {type(unet).__name__}: its pruned structure is unknown to "
                            "harden", "repair a stock diffusers UNet2DConditionModel (harden prunes it itself)")


@dataclass
class Structure:
    """Which parameters train, and the zero rows (dense layout) each step must keep at zero."""

    trainable: list[str]
    zero_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> row indices

    @classmethod
    def of(cls, unet: torch.nn.Module, neurons: NeuronSet, train: str = "all") -> "Structure":
        """Dense layout: the neurons' `to_v` rows (and bias entries) are the zero rows; compact: none exist."""
        check_repairable(unet)
        rows: dict[str, torch.Tensor] = {}
        if not isinstance(unet, CompactUNet2DConditionModel):
            params = dict(unet.named_parameters())
            for name, idx in neurons.layers.items():
                for key in (f"{name}.to_v.weight", f"{name}.to_v.bias"):
                    if key in params:
                        rows[key] = torch.tensor(idx, dtype=torch.long)
        return cls(trainable_names(unet, train), rows)

    def parameters(self, unet: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The trainable parameters in a fixed order; the rest get requires_grad False (no gradient memory)."""
        chosen = set(self.trainable)
        out = []
        for name, p in unet.named_parameters():
            p.requires_grad_(name in chosen)
            if name in chosen:
                out.append(p)
        return out

    def mask_gradients(self, unet: torch.nn.Module) -> None:
        """Zero the gradient of every pruned row (before clipping and the optimizer step)."""
        params = dict(unet.named_parameters())
        for key, idx in self.zero_rows.items():
            grad = params[key].grad
            if grad is not None:
                grad[idx.to(grad.device)] = 0

    @torch.no_grad()
    def rezero(self, unet: torch.nn.Module) -> None:
        """Set every pruned row back to exactly zero (after the optimizer step)."""
        params = dict(unet.named_parameters())
        for key, idx in self.zero_rows.items():
            params[key][idx.to(params[key].device)] = 0

    def violations(self, unet: torch.nn.Module) -> list[str]:
        """Parameters whose pruned rows are not exactly zero (empty when the structure holds)."""
        params = dict(unet.named_parameters())
        return [key for key, idx in self.zero_rows.items() if bool(params[key][idx].abs().max() > 0)]

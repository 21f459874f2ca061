"""Find the cross-attention value projections (`attn2.to_v`) that NeMo searches, by walking the model.

Why walk instead of indexing `down_blocks[i].attentions[j]`: the same code must serve SD v1/v2-style UNets of any
width or depth, and refuse (with the reason) the layouts where masking a value channel is not the same function as
removing a weight row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import TargetError

SELECT_NEMO = "nemo"  # down blocks + mid block: the 7 layers of SD v1.x, NeMo's search space
SELECT_ALL = "all"  # every cross-attention layer (adds the up path)


def latent_size(unet) -> tuple[int, int]:
    """(height, width) of the UNet's native latents; `sample_size` may be one int or a pair."""
    size = unet.config.sample_size
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


@dataclass(frozen=True)
class Target:
    """One cross-attention layer whose value projection output channels are the candidate neurons."""

    name: str  # module path of the Attention module, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn: nn.Module

    @property
    def to_v(self) -> nn.Linear:
        return self.attn.to_v

    @property
    def to_out(self) -> nn.Linear:
        return self.attn.to_out[0]

    @property
    def width(self) -> int:
        return self.attn.to_v.out_features

    @property
    def heads(self) -> int:
        return self.attn.heads

    @property
    def head_dim(self) -> int:
        """Value channels per head in the *base* layout: channel c belongs to head c // head_dim."""
        return self.attn.to_k.out_features // self.attn.heads


def _cross_attentions(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention_processor import Attention

    found = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and getattr(module, "is_cross_attention", False):
            found.append((name, module))
    return found


def _check(name: str, attn: nn.Module) -> None:
    if getattr(attn, "fused_projections", False) or getattr(attn, "to_kv", None) is not None \
            or getattr(attn, "to_qkv", None) is not None:
        raise TargetError(  # even after unfuse_qkv_projections() the fused copies of the value rows stay in the
            # module (and would be saved with an export, unpruned), so only a freshly loaded UNet is accepted
            f"{name} has fused key/value projections (to_kv/to_qkv), so its value channels cannot be addressed",
            "load the UNet again without fuse_qkv_projections(); unfusing leaves copies of the value weights behind",
        )
    to_v = getattr(attn, "to_v", None)
    if type(to_v) is not nn.Linear:
        raise TargetError(
            f"{name}.to_v is {type(to_v).__name__}, not a plain torch.nn.Linear (LoRA, quantized or wrapped?)",
            "merge adapters / dequantize the UNet so to_v is a plain Linear before hardening",
        )
    out = attn.to_out[0]
    if type(out) is not nn.Linear or out.in_features != to_v.out_features:
        raise TargetError(f"{name}.to_out[0] does not consume to_v's channels one to one",
                          "harden supports diffusers Attention layers with a linear output projection")
    if to_v.out_features != attn.to_k.out_features:
        raise TargetError(f"{name}: to_v has {to_v.out_features} channels but to_k has {attn.to_k.out_features}; "
                          "the model looks already pruned", "harden a base model, not a hardened one")


def resolve_targets(unet: nn.Module, select: str = SELECT_NEMO) -> list[Target]:
    """Cross-attention layers to search, in model order (for SD v1 the NeMo order: down 0..5, then mid).

    `select` is "nemo" (down blocks + mid block), "all" (every cross-attention layer) or a regular expression that
    must match (re.search) the Attention module name. A `to_v` bias is handled, not refused: masking an output channel
    zeroes weight row *and* bias entry, and pruning removes/zeroes both, so the three forms stay the same function.
    """
    layers = _cross_attentions(unet)
    if not layers:
        raise TargetError("the model has no cross-attention layers (attn2), so it has no text-conditioned value "
                          "neurons to localize", "harden works on text-conditioned UNets such as Stable Diffusion's")
    if select == SELECT_NEMO:
        chosen = [(n, a) for n, a in layers if n.startswith(("down_blocks.", "mid_block."))]
    elif select == SELECT_ALL:
        chosen = layers
    else:
        try:
            pattern = re.compile(select)
        except re.error as err:
            raise TargetError(f"layer pattern {select!r} is not a valid regular expression: {err}",
                              "use 'nemo', 'all' or a valid regex such as 'down_blocks\\.[01]'") from None
        chosen = [(n, a) for n, a in layers if pattern.search(n)]
    if not chosen:
        names = ", ".join(n for n, _ in layers[:3])
        raise TargetError(f"layer selection {select!r} matches none of the {len(layers)} cross-attention layers "
                          f"({names}, ...)", "use 'nemo', 'all' or a regex that matches those names")
    for name, attn in chosen:
        _check(name, attn)
    return [Target(name, attn) for name, attn in chosen]

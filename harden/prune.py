"""Physical pruning: turn a neuron set into weights. Two layouts of the same function, no I/O.

- dense: same shapes as the base, the neurons' `to_v` rows (and bias entries) zeroed: loads in stock diffusers.
- compact: those rows of `to_v` and the matching input columns of `to_out[0]` removed: a smaller checkpoint that
  needs `CompactUNet2DConditionModel` (harden/compact_unet.py, copied into exports).
Because `to_out[0]` is linear, a zero value channel contributes nothing, so removing its column is exact.
"""

from __future__ import annotations

import copy

import torch

from .compact_unet import CompactUNet2DConditionModel
from .errors import BadInputError
from .neurons import NeuronSet
from .targets import SELECT_ALL, resolve_targets


def _validated(unet, neurons: NeuronSet) -> dict:
    if isinstance(unet, CompactUNet2DConditionModel):
        raise BadInputError("the UNet is already compact-pruned", "prune the base model")
    targets = {t.name: t for t in resolve_targets(unet, SELECT_ALL)}
    try:
        neurons.check_against({n: t.width for n, t in targets.items()})
    except ValueError as err:
        raise BadInputError(str(err), "the neuron set must come from localizing this model") from None
    return targets


@torch.no_grad()
def prune_dense(unet, neurons: NeuronSet, factor: float = 0.0):
    """A copy of `unet` with the neurons' value rows (and bias entries) multiplied by `factor` (0 = removed)."""
    _validated(unet, neurons)
    pruned = copy.deepcopy(unet)
    for name, idx in neurons.layers.items():
        to_v = pruned.get_submodule(name).to_v
        to_v.weight[list(idx)] *= factor
        if to_v.bias is not None:
            to_v.bias[list(idx)] *= factor
    return pruned


def kept_channels(unet, neurons: NeuronSet) -> dict[str, list[int]]:
    targets = _validated(unet, neurons)
    return {name: sorted(set(range(targets[name].width)) - set(idx)) for name, idx in neurons.layers.items()}


@torch.no_grad()
def prune_compact(unet, neurons: NeuronSet) -> CompactUNet2DConditionModel:
    """A `CompactUNet2DConditionModel` without the neurons' value rows and the matching `to_out[0]` columns.

    Every other tensor is copied bit-for-bit from the base.
    """
    kept = kept_channels(unet, neurons)
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    param = next(unet.parameters())
    compact = CompactUNet2DConditionModel(**config, kept_value_channels=kept)
    if param.dtype != torch.float32:
        compact = compact.to(dtype=param.dtype)
    state = dict(unet.state_dict())
    extra = sorted(set(state) - set(compact.state_dict()))
    if extra:
        raise BadInputError(f"the UNet has tensors its config does not build ({extra[0]}, ... {len(extra)} in all), "
                            "so a compact checkpoint could not be reloaded",
                            "use the dense layout for this model")
    for name, channels in kept.items():
        index = torch.tensor(channels, dtype=torch.long)
        for key in (f"{name}.to_v.weight", f"{name}.to_v.bias"):
            if key in state:
                state[key] = state[key].index_select(0, index)
        state[f"{name}.to_out.0.weight"] = state[f"{name}.to_out.0.weight"].index_select(1, index)
    compact.load_state_dict(state, strict=True)
    return compact.to(param.device).eval()

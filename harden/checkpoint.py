"""The one owner of the two checkpoint layouts: build, save, check by reloading, and load.

compact: the pruned rows of `to_v` and columns of `to_out[0]` are gone (a smaller UNet, loaded with
`trust_remote_code=True` or `load_hardened`); dense: the same UNet class with those rows set to zero (stock
diffusers). Every export, whichever command makes it, goes through here, so both layouts obey the same rules:
safetensors only, reloadable as a user would, equal to the in-memory model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path, PurePath

import torch

from . import compact_unet
from .compact_unet import CompactUNet2DConditionModel
from .errors import BadInputError
from .nemo.conditioning import call_unet
from .neurons import NeuronSet
from .prune import prune_compact, prune_dense
from .targets import latent_size

LAYOUTS = ("compact", "dense")
_BUILD = {"compact": prune_compact, "dense": prune_dense}


def check_layout(layout: str, allow_both: bool = False) -> tuple[str, ...]:
    """The layouts a `--layout`/`export.layout` value stands for; a one-line error for anything else."""
    if allow_both and layout == "both":
        return LAYOUTS
    if layout not in LAYOUTS:
        raise BadInputError(f"unknown layout {layout!r}", "use " + ", ".join(LAYOUTS) + (" or both" if allow_both
                                                                                         else ""))
    return (layout,)


def pruned_unets(unet: torch.nn.Module, neurons: NeuronSet, layouts) -> dict[str, torch.nn.Module]:
    """{layout: `unet` with `neurons` removed in that layout}; the set is validated against the model."""
    return {layout: _BUILD[layout](unet, neurons) for layout in layouts}


def save_pipeline(pipe, unet, folder: Path, layout: str) -> None:
    """`save_pretrained` of `pipe` with `unet` swapped in; the compact layout also gets `unet/compact_unet.py`.

    The compact module is copied and named in model_index.json so that `DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)` finds it; diffusers itself would record the class as `harden.compact_unet`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    base_unet = pipe.unet
    try:
        pipe.unet = unet
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        pipe.unet = base_unet
    if layout == "compact":
        shutil.copyfile(compact_unet.__file__, folder / "unet" / "compact_unet.py")  # mode from the umask
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["unet"] = ["compact_unet", CompactUNet2DConditionModel.__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _clean_name_or_path(folder, getattr(pipe, "name_or_path", None))


_HUB_CACHE = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][0-9a-f]+")


def _neutral_name(path: str, root: str | None) -> str:
    """A local path as exports may show it: a Hub cache snapshot as its repo id, a path under the base pipeline's
    folder relative to that folder's own name, anything else as its last part."""
    hub = _HUB_CACHE.search(path)
    if hub:
        return f"{hub.group(1)}/{hub.group(2)}" + path[hub.end():].replace("\\", "/")
    if root and (path == root or path.startswith(root.rstrip("/\\") + os.sep)):
        return (PurePath(root).name + path[len(root.rstrip("/\\")):]).replace("\\", "/")
    return PurePath(path).name


def _clean_name_or_path(folder: Path, root: str | None) -> None:
    """diffusers records where each component was loaded from (`_name_or_path`, an absolute local path that may
    name private folders) in the configs it saves; exports keep only a neutral name."""
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            config = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        if not isinstance(config, dict):
            continue
        changed = False
        for key in ("_name_or_path", "name_or_path"):
            value = config.get(key)
            if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~") or Path(value).exists()):
                config[key] = _neutral_name(value, root)
                changed = True
        if changed:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def reload_check(folder: Path, layout: str, unet: torch.nn.Module, embeds: torch.Tensor, timestep: int) -> float:
    """Load the exported pipeline as a user would and return max|UNet output - in-memory hardened output|."""
    from diffusers import DiffusionPipeline

    param = next(unet.parameters())
    kwargs = {"trust_remote_code": True} if layout == "compact" else {}
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=param.dtype, use_safetensors=True, **kwargs)
    loaded = pipe.unet.to(param.device).eval()
    x = torch.randn((len(embeds), unet.config.in_channels, *latent_size(unet)),
                    generator=torch.Generator().manual_seed(0))
    x, ctx = x.to(param.device, param.dtype), embeds.to(param.device, param.dtype)
    expected = call_unet(unet, x, timestep, ctx)  # SDXL: with the packed added conditions
    got = call_unet(loaded, x, timestep, ctx)
    return float((expected.float() - got.float()).abs().max())


def reload_tolerance(unet) -> float:
    """Reloaded weights are bit-identical; only half-precision kernels may round differently."""
    return 1e-5 if next(unet.parameters()).dtype == torch.float32 else 1e-2


def is_compact(folder_or_config) -> bool:
    """Whether a pipeline folder (or its model_index.json as a dict) holds harden's compact UNet."""
    config = folder_or_config
    if not isinstance(config, dict):
        config = json.loads((Path(folder_or_config) / "model_index.json").read_text())
    return (config.get("unet") or [None])[0] == "compact_unet"


def load_hardened(repo_or_folder: str | Path, **kwargs):
    """`DiffusionPipeline.from_pretrained` for a harden export (Hub id or folder) without running remote code.

    Dense exports load as they are. For compact ones, harden's own `CompactUNet2DConditionModel` is loaded from
    `unet/` and passed as `unet=` (importing it registers the module under the name model_index.json uses).
    """
    from diffusers import DiffusionPipeline

    source = str(repo_or_folder)
    config = DiffusionPipeline.load_config(source, **{k: v for k, v in kwargs.items()
                                                      if k in ("revision", "cache_dir", "token", "local_files_only")})
    if not is_compact(config):
        return DiffusionPipeline.from_pretrained(source, **kwargs)
    unet_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only",
                                                            "torch_dtype")}
    unet = CompactUNet2DConditionModel.from_pretrained(source, subfolder="unet", **unet_kwargs)
    return DiffusionPipeline.from_pretrained(source, unet=unet, **kwargs)

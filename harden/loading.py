"""Loading the base pipeline a recipe names: Hub id or local folder, safetensors only unless the recipe allows pickles.

Why checks before diffusers: diffusers' own errors for a missing folder, a pickle-only checkpoint or an offline Hub id
are long tracebacks; a release engineer needs one line that says what is wrong and what to change. The pipeline's
configs (model_index.json, unet/config.json) are read first, so a model harden cannot harden is refused before any
weight is downloaded or read.

Hub ids: the configs are fetched first (which also resolves `revision` to a commit), the file list is checked for
safetensors, then exactly that commit is downloaded (`variant` files where the repo has them). Hub failures map to
exit codes: a repository, revision or pipeline that does not exist is bad input (2); a gated repository, refused
credentials, an unreachable Hub or HF_HUB_OFFLINE without a cached copy are Hub errors (4).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import BadInputError, HardenError, HubError, TargetError
from .nemo.conditioning import check_supported
from .recipe import ModelSection, resolve_model_path
from .targets import resolve_targets

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(name: str) -> None:
    """A device string torch knows and this machine has (`mps` on Linux or `cuda:3` on a 1-GPU box fail here, not
    when the first tensor moves)."""
    if not DEVICE.fullmatch(name):
        raise BadInputError(f"unknown device {name!r}", "use auto, cpu, cuda, cuda:N, or mps on Apple silicon")
    if name == "mps" and not torch.backends.mps.is_available():
        raise BadInputError("device mps (Apple Metal) is not available on this machine", "use --device cpu or auto")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInputError(f"device {name} was asked for but CUDA is not available", "use --device cpu or auto")
        index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise BadInputError(f"device {name}: this machine has {count} CUDA device(s)",
                                f"use cuda:0 to cuda:{count - 1}, or auto")


def pick_device(name: str) -> torch.device:
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_weight_files(files: list[str], index: dict, allow_pickle: bool) -> None:
    """Every component folder in `files` (repo-relative posix paths) has safetensors, unless pickles are allowed."""
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        names = [f.split("/", 1)[1] for f in files if f.startswith(component + "/") and "/" not in f.split("/", 1)[1]]
        has_safe = any(n.endswith(".safetensors") for n in names)
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles and not has_safe and not allow_pickle:
            raise BadInputError(
                f"{component}/ holds only pickle weights ({pickles[0]}); loading them could run arbitrary code",
                "convert the model to safetensors, or set model.allow_pickle: true if you trust its source")


def check_local_folder(folder: Path, allow_pickle: bool) -> None:
    """A diffusers pipeline folder whose weights are safetensors (or pickles, when explicitly allowed)."""
    if not folder.is_dir():
        raise BadInputError(f"model path {folder} is a file, not a diffusers pipeline folder",
                            "give the folder that holds model_index.json")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise BadInputError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder",
                            "point model.id at the pipeline's root folder")
    files = [p.relative_to(folder).as_posix() for p in folder.glob("*/*") if p.is_file()]
    check_weight_files(files, json.loads(index_path.read_text()), allow_pickle)


SUPPORTED_BLOCKS = ("CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "DownBlock2D",
                    "UpBlock2D", "UNetMidBlock2D")


def check_architecture(folder: Path, name: str) -> None:
    """Refuse, from model_index.json and unet/config.json alone (no weights read), pipelines without UNet
    cross-attention value projections fed by a text encoder: the only place NeMo's neurons live."""
    index = json.loads((folder / "model_index.json").read_text())
    unet = index.get("unet")
    if not isinstance(unet, list) or unet[0] is None:
        denoiser = index.get("transformer")
        if isinstance(denoiser, list) and denoiser[0] is not None:
            raise TargetError(f"{name} denoises with a transformer ({denoiser[1]}), not a UNet: SD3/Flux-style joint "
                              "attention mixes text and image tokens in one attention, so it has no cross-attention "
                              "value projections whose channels only text drives (NeMo's neurons)",
                              "harden supports UNet pipelines with cross-attention (SD 1.x, 2.x, SDXL)")
        raise TargetError(f"{name} has no UNet, so it has no cross-attention value projections to localize",
                          "harden supports UNet pipelines with cross-attention (SD 1.x, 2.x, SDXL)")
    if unet[0] == "compact_unet":
        raise TargetError(f"{name} is already a harden compact export", "harden the base model, not a hardened one")
    if not any(isinstance(index.get(k), list) and index[k][0] is not None for k in ("text_encoder", "text_encoder_2")):
        raise TargetError(f"{name} has no text encoder ({unet[1]} without text): there are no text-conditioned "
                          "value neurons to localize", "harden supports text-to-image pipelines")
    if index.get("requires_aesthetics_score"):
        raise TargetError(f"{name} is an SDXL refiner-style pipeline (aesthetic-score conditioning): it denoises the "
                          "last steps of a given image, so NeMo's first-step score from pure noise does not apply",
                          "harden the SDXL base model; refiners are not supported")
    config_path = folder / "unet" / "config.json"
    if not config_path.is_file():
        return  # diffusers will say what is missing
    config = json.loads(config_path.read_text())
    if unet[1] != "UNet2DConditionModel" or config.get("cross_attention_dim") is None:
        raise TargetError(f"{name}'s UNet ({unet[1]}) takes no text (a pixel-space or unconditional UNet): it has "
                          "no cross-attention value projections", "harden supports text-conditioned UNets")
    blocks = [*config.get("down_block_types", ()), config.get("mid_block_type") or "UNetMidBlock2DCrossAttn",
              *config.get("up_block_types", ())]
    if not any("CrossAttn" in b for b in blocks):
        raise TargetError(f"{name}'s UNet has no cross-attention blocks ({', '.join(dict.fromkeys(blocks))}), so "
                          "it has no text-conditioned value neurons to localize",
                          "harden works on text-conditioned UNets such as Stable Diffusion's")
    unknown = [b for b in blocks if b not in SUPPORTED_BLOCKS]
    if unknown or config.get("encoder_hid_dim") is not None or config.get("addition_embed_type") not in (
            None, "text_time"):
        what = unknown[0] if unknown else ("encoder_hid_dim" if config.get("encoder_hid_dim") is not None else
                                           f"addition_embed_type {config.get('addition_embed_type')!r}")
        raise TargetError(f"{name}'s UNet uses {what} (DeepFloyd IF / Kandinsky / unCLIP-style added key-value or "
                          "projected text): its value channels are not plain cross-attention value projections",
                          "harden supports SD 1.x / 2.x / SDXL-style UNets")


def _hub_failure(err: Exception, model: ModelSection) -> HardenError:
    """One line (and the exit code) for what went wrong when fetching `model` from the Hub; never the token."""
    from huggingface_hub import constants, errors

    where = f"{model.id!r}" + (f" at revision {model.revision!r}" if model.revision else "")
    endpoint = constants.ENDPOINT
    login = "set HF_TOKEN or run `hf auth login` with an account that has access"
    if isinstance(err, errors.GatedRepoError):
        return HubError(f"model {model.id!r} is gated on the Hub and this account has not been granted access",
                        f"accept its conditions on {endpoint}/{model.id}, then {login}")
    if isinstance(err, errors.RepositoryNotFoundError):
        return BadInputError(f"model {model.id!r} was not found on the Hub at {endpoint} (or it is private and no "
                             "valid token was given)", f"check model.id; for a private repository {login}")
    if isinstance(err, errors.RevisionNotFoundError):
        return BadInputError(f"revision {model.revision!r} does not exist in {model.id!r}",
                             "set model.revision to a branch, tag or commit of the repository")
    if isinstance(err, errors.RemoteEntryNotFoundError):
        return BadInputError(f"{where} has no model_index.json, so it is not a diffusers pipeline repository",
                             "give the id of a diffusers text-to-image pipeline")
    if isinstance(err, errors.HfHubHTTPError) and getattr(err.response, "status_code", None) in (401, 403):
        return HubError(f"the Hub at {endpoint} refused the credentials for {where} "
                        f"({err.response.status_code})", f"check the token: {login}")
    if isinstance(err, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)) or "offline" in str(err):
        if constants.HF_HUB_OFFLINE:
            return HubError(f"HF_HUB_OFFLINE is set and {where} is not in the local Hugging Face cache",
                            "unset HF_HUB_OFFLINE, or download the model once with network access")
        return HubError(f"cannot reach the Hub at {endpoint} and {where} is not in the local Hugging Face cache",
                        "check the network and HF_ENDPOINT, or download the model once with network access")
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return HubError(f"could not fetch {where} from the Hub at {endpoint}: {first}",
                    "check the network, HF_ENDPOINT and the repository")


def hub_snapshot(model: ModelSection) -> Path:
    """The local snapshot (HF cache) of `model` at one commit: configs first, checked, then the weights to load."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        configs = Path(snapshot_download(model.id, revision=model.revision,
                                         allow_patterns=["model_index.json", "unet/config.json"]))
        if not (configs / "model_index.json").is_file():
            raise BadInputError(f"{model.id!r} has no model_index.json, so it is not a diffusers pipeline "
                                "repository", "give the id of a diffusers text-to-image pipeline")
        commit = configs.name  # snapshots/<commit>: the revision, resolved
        check_architecture(configs, repr(model.id))
        if not constants.HF_HUB_OFFLINE:
            index = json.loads((configs / "model_index.json").read_text())
            check_weight_files(HfApi().list_repo_files(model.id, revision=commit), index, model.allow_pickle)
        folder = DiffusionPipeline.download(model.id, revision=commit, variant=model.variant,
                                            use_safetensors=None if model.allow_pickle else True,
                                            local_files_only=constants.HF_HUB_OFFLINE)
    except HardenError:
        raise
    except Exception as err:  # huggingface_hub / httpx / diffusers errors: one line with the right exit code
        raise _hub_failure(err, model) from None
    return Path(folder)


def hub_commit(model_id: str, revision: str | None) -> str | None:
    """The commit a Hub id and revision resolved to when loaded (read from the local cache; no network)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model_id, "model_index.json", revision=revision)
    return Path(path).parent.name if isinstance(path, str) else None


def load_pipeline(model: ModelSection, recipe_folder: Path, device: str | None = None):
    """(pipeline on its device in its dtype, local folder or None for a Hub id). Refuses models without targets."""
    from diffusers import DiffusionPipeline

    local = resolve_model_path(model.id, recipe_folder)
    if local is not None:
        check_local_folder(local, model.allow_pickle)
        check_architecture(local, str(local))
    dev = pick_device(device or model.device)
    dtype = pick_dtype(model.dtype, dev)
    source = local if local is not None else hub_snapshot(model)  # Hub: configs checked, then one commit fetched
    check_local_folder(source, model.allow_pickle)
    kwargs = {"torch_dtype": dtype, "variant": model.variant}
    if not model.allow_pickle:
        kwargs["use_safetensors"] = True
    if "safety_checker" in json.loads((source / "model_index.json").read_text()):
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # harden never generates for users
    try:
        pipe = DiffusionPipeline.from_pretrained(str(source), **kwargs)
    except Exception as err:  # diffusers raises OSError, ValueError, EnvironmentError, HF errors...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ("check the Hub id and revision, your network / HF_HUB_OFFLINE, and access rights"
                if local is None else "check that the folder is a complete diffusers pipeline")
        raise BadInputError(f"could not load model {model.id!r}: {first[:300]}", hint) from None
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise BadInputError(f"model {model.id!r} has no {part}; harden needs a Stable-Diffusion-style pipeline",
                                "use a text-to-image pipeline with a UNet and a CLIP text encoder")
    check_supported(pipe)  # SDXL refiners
    resolve_targets(pipe.unet, model.targets)  # refuses models without cross-attention, fused projections...
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe, local

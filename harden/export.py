"""Writing hardened pipelines to disk: safetensors only, the compact UNet's code beside its weights, atomic folders.

Why a module of its own: `harden run`, `harden prune` and `harden demo` all export, and every export must obey the
same rules (no pickles, loadable with stock diffusers or with `trust_remote_code`, nothing half-written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from . import compact_unet

LAYOUTS = ("compact", "dense")


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
        shutil.copy(compact_unet.__file__, folder / "unet" / "compact_unet.py")
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["unet"] = ["compact_unet", compact_unet.CompactUNet2DConditionModel.__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `target` only if the block succeeds, else delete it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file through a temporary sibling and `os.replace`, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors_atomic(path: Path, tensors: dict) -> None:
    """safetensors through a temporary sibling, like `write_atomic`."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path, exclude: set[str] = frozenset()) -> dict[str, str]:
    """{relative posix path: sha256} of every file under `folder`, sorted, except the relative paths in `exclude`."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in exclude:
            out[rel] = sha256_file(path)
    return out

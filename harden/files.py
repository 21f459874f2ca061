"""Files that are never half-written: atomic files and folders, safetensors through a temporary sibling, hashes.

Why a module of its own: every stage and command writes through these, so a killed process leaves either the old
file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `target` only if the block succeeds, else delete it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        ordinary_modes(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ordinary_modes(folder: Path) -> None:
    """Give `folder` and everything in it the modes new files get under the user's umask (mkdtemp makes 0700,
    and libraries save some weights 0600), so a serving account in the user's group can read an export when the
    umask allows it."""
    mask = umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def umask() -> int:
    """The process umask, read once at import (reading it means setting it, which is not thread-safe)."""
    return _UMASK


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file through a temporary sibling and `os.replace`, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it 0600; the result is an ordinary file
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

"""The shipped folder's bookkeeping: prompts.jsonl, harden_zoo.json and MANIFEST.sha256.

Why a manifest: the folder is the fixture of the integration tests and the default demo model, so any change to any
file (a retrained weight, an edited prompt) must be visible.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "MANIFEST.sha256"
CONFIG = "harden_zoo.json"
PROMPTS = "prompts.jsonl"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_lines(folder: Path) -> list[str]:
    """'<sha256>  <relative path>' for every file in the folder except the manifest, sorted by path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return [f"{sha256(p)}  {p.relative_to(folder).as_posix()}" for p in files]


def write_manifest(folder: Path) -> None:
    (folder / MANIFEST).write_text("\n".join(manifest_lines(folder)) + "\n")


def check_manifest(folder: Path) -> list[str]:
    """Problems found (empty when every file matches the manifest and no file is missing or extra)."""
    listed = (folder / MANIFEST).read_text().splitlines()
    actual = manifest_lines(folder)
    return sorted(set(listed) ^ set(actual))


def caption_rows(folder: Path) -> list[dict]:
    """The folder's prompts.jsonl: dicts with 'caption', 'memorized' and, for memorized ones, 'image' (a path)."""
    lines = (Path(folder) / PROMPTS).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def load_config(folder: Path) -> dict:
    """harden_zoo.json: native resolution, default guidance scale, NeMo kernel size, how it was trained."""
    return json.loads((Path(folder) / CONFIG).read_text())

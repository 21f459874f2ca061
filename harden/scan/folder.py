"""A scan's output folder: scan.json (the manifest), shards/NNNNNN.json (one per finished shard, written whole), and
the merged scores.jsonl, memorized.jsonl, summary.json and roc.png.

Why a manifest: `--resume` must continue the same scan. It holds the model's fingerprint, the caption list's sha256
and the scoring settings; a resume with another model, caption file or settings is refused instead of mixing scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadInputError
from ..files import write_atomic

MANIFEST = "scan.json"
FORMAT = "harden-scan/1"
OUTPUTS = ("scores.jsonl", "memorized.jsonl", "summary.json", "roc.png")


def dumps(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


class ScanFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def shard_path(self, index: int) -> Path:
        return self.path / "shards" / f"{index:06d}.json"

    def read_manifest(self) -> dict:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise BadInputError(f"{self.path} holds no scan ({MANIFEST} missing)",
                                "give the --out folder of a harden scan") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadInputError(f"{self.manifest_path} is not valid JSON",
                                "start a new scan in another --out") from None
        if manifest.get("format") != FORMAT:
            raise BadInputError(f"{self.manifest_path} is not a {FORMAT} manifest", "start a new scan in another --out")
        return manifest

    def check_out(self, resume: bool) -> bool:
        """Whether the folder holds a scan to resume; refuses (read-only) a folder that holds something else or a
        scan without --resume. Cheap, so it runs before the model is loaded."""
        if not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir())):
            return False
        if not self.path.is_dir():
            raise BadInputError(f"--out {self.path} is a file", "give a folder")
        if not self.manifest_path.exists():
            raise BadInputError(f"--out {self.path} exists and is not a scan folder", "give a new or empty folder")
        if not resume:
            raise BadInputError(f"--out {self.path} already holds a scan",
                                "add --resume to continue it, or give another --out")
        return True

    def check_start(self, manifest: dict, resume: bool) -> bool:
        """`check_out`, then for a resume: refuses (read-only) a scan of another model, caption list or settings."""
        if not self.check_out(resume):
            return False
        old = self.read_manifest()
        if old["model"]["fingerprint"] != manifest["model"]["fingerprint"]:
            raise BadInputError(f"--resume: {self.path} was scanned with another model ({old['model']['id']!r}, "
                                f"fingerprint {old['model']['fingerprint'][:12]}; now {manifest['model']['id']!r}, "
                                f"{manifest['model']['fingerprint'][:12]})",
                                "resume with the same model or use a new --out")
        if old["captions"]["sha256"] != manifest["captions"]["sha256"]:
            raise BadInputError(f"--resume: {self.path} was scanned with other captions ({old['captions']['file']!r}, "
                                f"{old['captions']['unique']} unique; now {manifest['captions']['file']!r}, "
                                f"{manifest['captions']['unique']} unique, or other references / labels)",
                                "resume with the same caption, reference and label files or use a new --out")
        for key in ("settings", "shard_size"):
            if old[key] != manifest[key]:
                changed = sorted(k for k in manifest[key] if old[key].get(k) != manifest[key].get(k)) \
                    if isinstance(old[key], dict) else [key]
                raise BadInputError(f"--resume: {self.path} was scanned with other settings ({', '.join(changed)})",
                                    "resume with the same options or use a new --out")
        return True

    def write_manifest(self, manifest: dict) -> None:
        write_atomic(self.manifest_path, dumps(manifest))

    def done(self, shards: int) -> list[int]:
        return [i for i in range(shards) if self.shard_path(i).exists()]

    def write_shard(self, index: int, rows: list[dict], seconds: float, rank: int = 0) -> None:
        write_atomic(self.shard_path(index), dumps({"shard": index, "rank": rank, "seconds": round(seconds, 3),
                                                    "rows": rows}))

    def read_shards(self, shards: int) -> tuple[list[dict], float]:
        """(all rows in caption order, scoring seconds summed over shards)."""
        missing = [i for i in range(shards) if not self.shard_path(i).exists()]
        if missing:
            raise BadInputError(f"{self.path}: {len(missing)} of {shards} shards are missing (first: "
                                f"{self.shard_path(missing[0]).name})",
                                "run the scan again with --resume; on several nodes the --out folder must be shared, "
                                "or copy every node's shards/ into one folder and run harden scan --merge DIR")
        rows, seconds = [], 0.0
        for i in range(shards):
            shard = json.loads(self.shard_path(i).read_text())
            rows.extend(shard["rows"])
            seconds += shard["seconds"]
        return rows, seconds

"""Prompt lists from a recipe: inline, or files in the formats of the public sets (.txt, .jsonl, .csv), local or URL.

Why URLs with a sha256: a recipe can name a public prompt set (e.g. Wen et al.'s 500 memorized SD v1 prompts)
without this repo redistributing it; the file is fetched once, verified, and cached by its hash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError
from .files import write_atomic
from .recipe import PACKAGE_PREFIX, PromptItem, PromptSource, package_path
from .scrub import register_secret


@dataclass(frozen=True)
class Prompt:
    text: str
    image: Path | None = None  # a reference image (the memorized training image), when known
    variants: tuple[str, ...] = ()  # paraphrases the audit also tries (inline `variants`, or a jsonl `variants` list)


def cache_dir() -> Path:
    """Where fetched prompt files live: $HARDEN_CACHE, else $XDG_CACHE_HOME/harden, else ~/.cache/harden."""
    if os.environ.get("HARDEN_CACHE"):
        return Path(os.environ["HARDEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harden"


def fetch(url: str, sha256: str, timeout: float = 60.0) -> Path:
    """The cached copy of `url`, downloading it first if needed; refuses content whose sha256 differs."""
    try:
        parts = urllib.parse.urlsplit(url)
        # whatever an error quotes of the URL, never its credentials (a lone user part is a token: https://TOKEN@host)
        register_secret(parts.password or parts.username)
    except ValueError:
        pass
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1])[:80] or "prompts"
    path = cache_dir() / "prompts" / sha256 / name
    if path.is_file() and _sha256(path.read_bytes()) == sha256:
        return path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only, checked below
            data = response.read()
    except OSError as err:
        raise BadInputError(f"could not fetch {url}: {err}",
                            f"check the URL and the network, or put the file at {path}") from None
    got = _sha256(data)
    if got != sha256:
        raise BadInputError(f"{url} has sha256 {got}, not the {sha256} the recipe expects",
                            "the file changed upstream: check it and update sha256, or pin a commit URL")
    write_atomic(path, data)
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_prompts(source: PromptSource, folder: Path, what: str) -> list[Prompt]:
    """The prompts of one recipe section (`what` names it in errors), after where/offset/limit."""
    if source.prompts is not None:
        rows = [p if isinstance(p, PromptItem) else PromptItem(prompt=p) for p in source.prompts]
        prompts = [Prompt(r.prompt, _image(r.image, folder, what), tuple(r.variants or ())) for r in rows]
    else:
        path = _local(source, folder, what)
        prompts = _read_file(path, source, what)
    prompts = prompts[source.offset:]
    if source.limit is not None:
        prompts = prompts[:source.limit]
    if not prompts:
        raise BadInputError(f"{what}: no prompts left (file empty, or where/offset/limit removed all)",
                            "check the prompt source")
    return prompts


def _local(source: PromptSource, folder: Path, what: str) -> Path:
    if re.match(r"https?://", source.file):
        return fetch(source.file, source.sha256)
    if source.file.startswith(PACKAGE_PREFIX):
        return package_path(source.file)
    path = (folder / Path(source.file).expanduser()).resolve()
    if not path.is_file():
        raise BadInputError(f"{what}: prompt file {path} does not exist", "fix the path (relative to the recipe)")
    if source.sha256 and _sha256(path.read_bytes()) != source.sha256:
        raise BadInputError(f"{what}: {path.name} does not match its sha256 in the recipe",
                            "update the sha256 or restore the file")
    return path


def _image(value: str | None, folder: Path, what: str) -> Path | None:
    """The reference image's path, after opening it: a file that is not an image fails here, not after hours."""
    from PIL import Image, UnidentifiedImageError

    if not value:
        return None
    path = (folder / value).resolve()
    if not path.is_file():
        raise BadInputError(f"{what}: reference image {path} does not exist", "fix the image path")
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - the header is read: format and size are known
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadInputError(f"{what}: reference image {path.name} cannot be read as an image "
                            f"({type(err).__name__})", "give a PNG, JPEG or WebP file") from None
    return path


def _read_file(path: Path, source: PromptSource, what: str) -> list[Prompt]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise BadInputError(f"{what}: {path.name} is not UTF-8 text", "save it as UTF-8") from None
    except OSError as err:
        raise BadInputError(f"{what}: cannot read {path}: {err.strerror}", "check its permissions") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if source.field or source.image_field or source.where:
            raise BadInputError(f"{what}: field / image_field / where need a .jsonl or .csv file",
                                "remove them for a .txt file (one prompt per line)")
        return [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise BadInputError(f"{what}: {path.name} line {n} is not JSON: {err.msg}",
                                        "one JSON object per line") from None
                except RecursionError:
                    raise BadInputError(f"{what}: {path.name} line {n} is nested too deeply",
                                        "one flat JSON object per line") from None
        return _rows_to_prompts(rows, source.field or "caption", source, path, what)
    if suffix == ".csv":
        try:
            dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t") if text.strip() else csv.excel
        except csv.Error:  # one column (a `Caption` header, one prompt per row): nothing to sniff
            dialect = csv.excel
        try:
            rows = list(csv.DictReader(io.StringIO(text), dialect=dialect))
        except csv.Error as err:
            raise BadInputError(f"{what}: {path.name} is not a readable CSV file: {err}",
                                "one header row, then one row per prompt") from None
        return _rows_to_prompts(rows, source.field or "Caption", source, path, what)
    raise BadInputError(f"{what}: unsupported prompt file type {suffix!r} ({path.name})",
                        "use .txt (one per line), .jsonl (caption key) or .csv (Caption column)")


def _rows_to_prompts(rows: list, key: str, source: PromptSource, path: Path, what: str) -> list[Prompt]:
    out = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or key not in row:
            raise BadInputError(f"{what}: {path.name} row {n} has no {key!r}",
                                "set the recipe's 'field' to the prompt column")
        if source.where and any(_norm(row.get(k)) != _norm(v) for k, v in source.where.items()):
            continue
        text = row[key]
        if not isinstance(text, str) or not text.strip():
            got = ("empty" if isinstance(text, str) else "missing (null)" if text is None else
                   f"{type(text).__name__}, not text")
            raise BadInputError(f"{what}: {path.name} row {n}: the prompt {key!r} is {got}",
                                "every row needs a non-empty caption (remove the row, or filter it with 'where')")
        image = row.get(source.image_field) if source.image_field else None
        if image is not None and not isinstance(image, str):
            raise BadInputError(f"{what}: {path.name} row {n}: the image {source.image_field!r} is "
                                f"{type(image).__name__}, not a path", "give the image path as text")
        variants = row.get("variants") or ()
        if not isinstance(variants, (list, tuple)) or not all(isinstance(v, str) for v in variants):
            raise BadInputError(f"{what}: {path.name} row {n}: 'variants' must be a list of strings",
                                'write e.g. "variants": ["a photo of X", "X, photo"]')
        out.append(Prompt(text, _image(image, path.parent, what), tuple(variants)))
    return out


def _norm(value) -> str:
    """CSV cells are strings: compare `where` values as lower-case text so `true` matches True and "True"."""
    return str(value).strip().lower()


def prompts_sha256(prompts: list[Prompt]) -> str:
    """Identifies a prompt list without revealing it: sha256 of the texts joined by newlines."""
    return _sha256("\n".join(p.text for p in prompts).encode())

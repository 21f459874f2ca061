"""The captions a scan scores: the scanned file, optional reference (non-memorized) captions and labels, as one list
of unique captions.

Why one deduplicated list: a training set repeats captions (often the memorized ones); each is scored once, and a
reference caption that is also scanned is scored once too. The list, with its roles and labels, is what the shards
split and what a resumed scan must find unchanged (its sha256 is in the manifest).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError
from ..prompts import load_prompts
from ..recipe import PromptSource


@dataclass(frozen=True)
class CaptionSet:
    """Unique captions in first-seen order (scanned ones first), each a dict: caption, scan (in the scanned file),
    reference (in the reference set), count (occurrences in the scanned file), label (True/False, None: unlabeled)."""

    rows: list[dict]
    scanned: int  # captions in the scanned file, duplicates included

    @property
    def unique(self) -> int:
        return sum(r["scan"] for r in self.rows)

    @property
    def references(self) -> int:
        return sum(r["reference"] for r in self.rows)

    @property
    def labeled(self) -> bool:
        return any(r["label"] is not None for r in self.rows)

    def sha256(self) -> str:
        """Identifies the list, its roles, counts and labels (never printed: it is a hash, not the captions)."""
        h = hashlib.sha256()
        for r in self.rows:
            h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode() + b"\n")
        return h.hexdigest()


def read_captions(file: str, field: str | None, what: str, where: dict | None = None) -> list[str]:
    """Caption texts of a file in any format a recipe accepts (.txt, .jsonl, .csv; a path, zoo:... or URL is not
    accepted here without its sha256), relative paths from the working directory."""
    try:
        source = PromptSource(file=file, field=field, where=where)
    except ValueError as err:  # pydantic: e.g. a URL without sha256
        raise BadInputError(f"{what}: {str(err).splitlines()[-1].strip()}", "give a local caption file") from None
    return [p.text for p in load_prompts(source, Path.cwd(), what)]


def build_caption_set(scanned: list[str], references: list[str] | None = None,
                      positives: set[str] | None = None) -> CaptionSet:
    """The unique list; with `positives` (the memorized captions) every scanned caption gets a label."""
    rows: dict[str, dict] = {}
    for text in scanned:
        row = rows.get(text)
        if row is None:
            rows[text] = {"caption": text, "scan": True, "reference": False, "count": 1,
                          "label": None if positives is None else text in positives}
        else:
            row["count"] += 1
    for text in references or []:
        row = rows.setdefault(text, {"caption": text, "scan": False, "reference": True, "count": 0, "label": None})
        row["reference"] = True
    return CaptionSet(list(rows.values()), len(scanned))


def load_caption_set(prompts: str, field: str | None = None, reference: str | None = None,
                     reference_field: str | None = None, labels: str | None = None,
                     label_field: str | None = None) -> CaptionSet:
    """Read the scanned file, the reference file and the labels (a field of the scanned file that is true for
    memorized captions, or a file of memorized captions); every error is one BadInputError line."""
    if labels and label_field:
        raise BadInputError("give --labels FILE or --label-field NAME, not both")
    scanned = read_captions(prompts, field, "--prompts")
    refs = read_captions(reference, reference_field, "--reference") if reference else None
    positives = None
    if label_field:
        positives = set(read_captions(prompts, field, f"--label-field {label_field}", where={label_field: True}))
    elif labels:
        positives = set(read_captions(labels, None, "--labels"))
    found = build_caption_set(scanned, refs, positives)
    if positives is not None:
        n_pos = sum(bool(r["label"]) for r in found.rows if r["scan"])
        if n_pos == 0 or n_pos == found.unique:
            raise BadInputError(f"labels mark {n_pos} of {found.unique} unique captions as memorized; AUROC needs both "
                                "classes", "check --labels / --label-field")
    return found

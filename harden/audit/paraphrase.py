"""Paraphrases of a memorized prompt: the prompt file's own `variants`, plus automatic perturbations.

Why: pruning can remove the neurons one exact wording triggers while a near wording still draws the image. The
automatic kinds are the cheap edits a user makes without trying: a word dropped, the word order changed, punctuation
and case changed. They cycle in that order and are drawn from a generator seeded by (audit seed, prompt text), so the
same recipe gives the same paraphrases on every machine and for every audited model.
"""

from __future__ import annotations

import random
import re
import string

KINDS = ("drop", "order", "punctuation")
_ATTEMPTS = 20  # draws per paraphrase before a kind is given up for this prompt (short prompts run out)


def _words(text: str) -> list[str]:
    return text.split()


def _drop(words: list[str], rng: random.Random) -> str:
    if len(words) < 2:
        return " ".join(words)
    i = rng.randrange(len(words))
    return " ".join(words[:i] + words[i + 1:])


def _order(words: list[str], rng: random.Random) -> str:
    """Two words swapped, or the prompt rotated at a comma ("x, photo" -> "photo, x") half of the time."""
    text = " ".join(words)
    if "," in text and rng.random() < 0.5:
        head, tail = text.split(",", 1)
        return f"{tail.strip()}, {head.strip()}"
    if len(words) < 2:
        return text
    i, j = sorted(rng.sample(range(len(words)), 2))
    out = list(words)
    out[i], out[j] = out[j], out[i]
    return " ".join(out)


def _punctuation(words: list[str], rng: random.Random) -> str:
    """Punctuation removed, added or changed; case changes always come with a punctuation change, because CLIP's
    tokenizer lower-cases (a case change alone would be the same prompt for SD v1)."""
    text = " ".join(words)
    bare = re.sub(f"[{re.escape(string.punctuation)}]", "", text)
    choice = rng.randrange(4)
    if choice == 0:
        return bare
    if choice == 1:
        return text.rstrip(".!?") + rng.choice(["!", ".", "...", " ?"])
    if choice == 2:
        return rng.choice([bare.upper(), bare.title()])
    return text.replace(",", ";") if "," in text else text + ","


_EDITS = {"drop": _drop, "order": _order, "punctuation": _punctuation}


def perturbations(text: str, count: int, seed: int) -> list[tuple[str, str]]:
    """`count` distinct automatic perturbations (kind, text) of `text`, never `text` itself (fewer when a short
    prompt has no more)."""
    rng = random.Random(f"{seed}:{text}")
    words = _words(text)
    out: list[tuple[str, str]] = []
    exhausted: set[str] = set()
    k = 0
    while len(out) < count and len(exhausted) < len(KINDS):
        kind = KINDS[k % len(KINDS)]
        k += 1
        if kind in exhausted:
            continue
        for _ in range(_ATTEMPTS):
            candidate = _EDITS[kind](words, rng).strip()
            if candidate and candidate != text and all(candidate != t for _, t in out):
                out.append((kind, candidate))
                break
        else:
            exhausted.add(kind)
    return out


def paraphrases(text: str, variants, count: int, seed: int) -> list[tuple[str, str]]:
    """[(kind, paraphrase)]: every file variant (kind "variant"), then `count` automatic ones (kinds of KINDS)."""
    out: list[tuple[str, str]] = []
    seen = {text}
    for v in variants:
        if v.strip() and v not in seen:
            out.append(("variant", v))
            seen.add(v)
    auto = [(kind, t) for kind, t in perturbations(text, count + len(out), seed) if t not in seen]
    return out + auto[:count]

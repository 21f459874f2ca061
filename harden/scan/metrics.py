"""Thresholds, detection metrics and the ROC figure of a scan (numpy and PIL only).

Why these conventions: the papers differ (MemAttn takes the ROC point closest to the target FPR, Wen the last point
strictly below it); the research notes ask for one convention, the strict one: TPR at the largest FPR < 1 %.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def threshold_k(reference: list[float], k: float) -> dict:
    """mean + k * std (unbiased) of the reference scores."""
    ref = np.asarray(reference, dtype=np.float64)
    if len(ref) < 2:
        raise ValueError("a mean + k std threshold needs at least 2 reference scores")
    mean, std = float(ref.mean()), float(ref.std(ddof=1))
    return {"value": mean + k * std, "rule": f"mean + {k:g} std", "k": k, "mean": mean, "std": std}


def threshold_fpr(reference: list[float], fpr: float) -> dict:
    """The lowest threshold (a reference score) such that at most `fpr` of the references score above it."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))[::-1]
    allowed = math.floor(fpr * len(ref) + 1e-9)  # references that may score above the threshold
    value = float(ref[min(allowed, len(ref) - 1)])
    return {"value": value, "rule": f"false-positive rate <= {fpr:g} on the reference captions", "fpr": fpr}


def roc_points(scores: list[float], labels: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold (positive when score >= threshold), from (0, 0) to (1, 1)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.diff(s) != 0, True]  # the last index of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(1, (~y).sum())], np.r_[0.0, tp / max(1, y.sum())]


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve = P(positive scores above negative), ties counting one half (Mann-Whitney)."""
    from scipy.stats import rankdata

    y = np.asarray(labels, dtype=bool)
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    pos, neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def tpr_at_fpr(scores: list[float], labels: list[bool], fpr: float = 0.01) -> float:
    """The largest TPR among ROC points whose FPR is strictly below `fpr`."""
    f, t = roc_points(scores, labels)
    return float(t[f < fpr].max())


def evaluate(scores: dict[str, list[float]], labels: list[bool]) -> dict:
    """AUROC and TPR at 1 % FPR per score."""
    out = {}
    for name, values in scores.items():
        out[name] = {"auroc": round(auroc(values, labels), 6), "tpr_at_1pct_fpr": round(tpr_at_fpr(values, labels), 6),
                     "positives": int(sum(labels)), "negatives": int(len(labels) - sum(labels))}
    return out


COLOURS = ("#c0392b", "#2471a3", "#229954", "#7d3c98", "#d68910")


def roc_png(path: Path, scores: dict[str, list[float]], labels: list[bool], title: str = "ROC") -> None:
    """ROC curves of each score, one colour each, with the diagonal and AUROCs in the legend (PIL, no matplotlib)."""
    from PIL import Image, ImageDraw

    size, margin = 360, 44
    img = Image.new("RGB", (size + 2 * margin + 150, size + 2 * margin), "white")
    draw = ImageDraw.Draw(img)

    def xy(f: float, t: float) -> tuple[float, float]:
        return margin + f * size, margin + (1 - t) * size

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill="#bbbbbb")
    for v in (0.0, 0.5, 1.0):
        draw.text((xy(v, 0)[0] - 8, margin + size + 4), f"{v:g}", fill="black")
        draw.text((margin - 22, xy(0, v)[1] - 6), f"{v:g}", fill="black")
    draw.text((margin + size / 2 - 60, margin + size + 20), "false-positive rate", fill="black")
    draw.text((4, 4), f"{title}: true-positive rate", fill="black")
    for i, (name, values) in enumerate(scores.items()):
        colour = COLOURS[i % len(COLOURS)]
        f, t = roc_points(values, labels)
        draw.line([xy(a, b) for a, b in zip(f, t)], fill=colour, width=2)  # ties: a diagonal segment
        y = margin + 14 * i
        draw.line([(margin + size + 12, y + 6), (margin + size + 30, y + 6)], fill=colour, width=3)
        draw.text((margin + size + 34, y), f"{name} AUROC {auroc(values, labels):.3f}", fill="black")
    img.save(path, format="PNG")

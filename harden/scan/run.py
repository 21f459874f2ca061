"""`harden scan`: score every caption of a caption set in resumable shards, on one process or many, and merge.

Flow: every rank reads and checks the inputs and loads the model (read-only: a bad input is refused before anything
is written); rank 0 writes the manifest; rank 0 lists the unfinished shards and every rank takes every WORLD_SIZE-th
of them, writing each shard whole as it finishes; after a barrier rank 0 merges the shards into the ranked outputs.
A shard's scores depend only on its captions and the settings (the same latents for every caption, fixed batch
layout), so any split over ranks, and any kill and resume, gives the same bytes as one uninterrupted process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError
from ..files import write_atomic
from ..loading import load_pipeline
from ..nemo.conditioning import encode
from ..recipe import ModelSection
from .captions import CaptionSet, load_caption_set
from .distributed import World
from .folder import FORMAT, ScanFolder, dumps
from .metrics import evaluate, roc_png, threshold_fpr, threshold_k
from .scores import CaptionScorer, ScanSettings, model_dtype

FAULT_ENV = "HARDEN_SCAN_FAULT_KILL_AFTER_SHARDS"  # tests: SIGKILL this process after it wrote N shards


@dataclass(frozen=True)
class ScanJob:
    """Everything `harden scan` is asked to do."""

    model: str
    prompts: str
    out: Path
    settings: ScanSettings = field(default_factory=ScanSettings)
    field: str | None = None
    reference: str | None = None  # non-memorized captions for the threshold (default: the scanned captions)
    reference_field: str | None = None
    labels: str | None = None  # a file of the memorized captions
    label_field: str | None = None  # or a field of the scanned file that is true for memorized captions
    k: float = 3.0  # threshold = mean + k std of the references' primary score ...
    fpr: float | None = None  # ... or the lowest one that at most this share of the references exceed
    shard_size: int = 256  # unique captions per shard
    text_batch: int = 256  # captions per text-encoder call
    revision: str | None = None
    device: str = "auto"
    allow_pickle: bool = False
    resume: bool = False

    def check(self) -> None:
        self.settings.check()
        if self.shard_size < 1 or self.text_batch < 1:
            raise BadInputError("--shard-size and --text-batch must be at least 1")
        if self.fpr is not None and not (0.0 < self.fpr < 1.0):
            raise BadInputError(f"--fpr {self.fpr} is not a rate in (0, 1)", "e.g. --fpr 0.01")
        if self.fpr is not None and not self.reference:
            raise BadInputError("--fpr needs --reference: the non-memorized captions the false-positive rate is "
                                "measured on", "add --reference FILE, or use --k")


class _Silent:
    def stage(self, name, total=None):
        return contextlib.nullcontext(lambda n=1, note=None: None)

    def log(self, message: str) -> None:
        pass


def model_fingerprint(pipe) -> str:
    """sha256 of an evenly strided sample of every UNet and text-encoder parameter (names, shapes, values), and the
    tokenizer's size: tells two models apart without hashing gigabytes, on any device."""
    h = hashlib.sha256()
    for part in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is None:
            continue
        for name, p in module.named_parameters():
            flat = p.detach().flatten()
            sample = flat[::max(1, flat.numel() // 256)][:256].float().cpu()
            h.update(f"{part}.{name}{tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
    h.update(f"tokens {len(pipe.tokenizer)} {pipe.tokenizer.model_max_length}".encode())
    return h.hexdigest()


def _number(value: float) -> float | None:
    """JSON has no NaN: a score that is not finite becomes null (and ranks last)."""
    value = float(value)
    return value if math.isfinite(value) else None


@torch.no_grad()
def score_shard(pipe, scorer: CaptionScorer, rows: list[dict], text_batch: int) -> list[dict]:
    """The shard's rows with `truncated` and one key per score; text encoded in batches of `text_batch`."""
    texts = [r["caption"] for r in rows]
    tokenizer = pipe.tokenizer
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False).input_ids]
    embeds = torch.cat([encode(pipe, texts[i:i + text_batch]) for i in range(0, len(texts), text_batch)])
    scores = scorer.score(embeds)
    return [{**row, "truncated": lengths[j] > tokenizer.model_max_length,
             **{name: _number(values[j]) for name, values in scores.items()}} for j, row in enumerate(rows)]


def _manifest(job: ScanJob, captions: CaptionSet, fingerprint: str, scorer: CaptionScorer) -> dict:
    labels = job.labels or (f"field {job.label_field}" if job.label_field else None)
    return json.loads(json.dumps({  # as it reads back from scan.json (lists, not tuples), to compare on --resume
        "format": FORMAT,
        "model": {"id": job.model, "revision": job.revision, "fingerprint": fingerprint},
        "captions": {"file": job.prompts, "field": job.field, "reference_file": job.reference, "labels": labels,
                     "sha256": captions.sha256(), "scanned": captions.scanned, "unique": captions.unique,
                     "references": captions.references, "total": len(captions.rows)},
        "settings": job.settings.to_json(),
        "shard_size": job.shard_size,
        "shards": math.ceil(len(captions.rows) / job.shard_size),
        "threshold": {"k": job.k, "fpr": job.fpr},
        "scorer": {"attn_layer": scorer.attn_layer_name, "nemo_ms_ssim": scorer.nemo_ms_ssim,
                   "first_timesteps": [int(t) for t in scorer.scheduler.timesteps[:job.settings.steps]]},
    }))


def run_scan(job: ScanJob, ui=None) -> dict | None:
    """Scan (this rank's share of the shards); rank 0 merges and returns the summary, other ranks return None."""
    job.check()
    world = World.from_env()
    ui = ui if ui is not None and world.main else _Silent()  # one progress display: rank 0's
    folder = ScanFolder(job.out)
    folder.check_out(job.resume)  # before the model loads: a wrong --out fails in a second
    captions = load_caption_set(job.prompts, job.field, job.reference, job.reference_field, job.labels,
                                job.label_field)
    device = world.device(job.device)
    section = ModelSection(id=job.model, revision=job.revision, dtype=model_dtype(job.settings.precision),
                           device=device, allow_pickle=job.allow_pickle, targets="all")
    pipe, _ = load_pipeline(section, Path.cwd())
    scorer = CaptionScorer(pipe.unet, pipe.scheduler.config, encode(pipe, [""]), job.settings)
    manifest = _manifest(job, captions, model_fingerprint(pipe), scorer)
    resumed = folder.check_start(manifest, job.resume)
    world.start(device)  # a rendezvous: every rank has checked the folder before rank 0 writes to it
    try:
        if world.main:
            folder.write_manifest(manifest)
            dupes = sum(r["count"] > 1 for r in captions.rows)
            ui.log(f"scan: {captions.scanned} captions ({captions.unique} unique; {dupes} repeated captions scored "
                   f"once), {captions.references} reference captions, {manifest['shards']} shards of "
                   f"{job.shard_size}; scores {', '.join(job.settings.scores)} on {device} "
                   f"({next(pipe.unet.parameters()).dtype}), {world.size} process(es)"
                   + ("; resuming" if resumed else ""))
        world.barrier()
        todo = world.broadcast(
            [i for i in range(manifest["shards"]) if not folder.shard_path(i).exists()] if world.main else None)
        mine = todo[world.rank::world.size]
        kill_after = int(os.environ.get(FAULT_ENV, "0"))
        with ui.stage("scan (rank 0's shards)" if world.size > 1 else "scan", len(mine)) as advance:
            for done, index in enumerate(mine, 1):
                started = time.perf_counter()
                rows = [{"index": i, **captions.rows[i]} for i in
                        range(index * job.shard_size, min(len(captions.rows), (index + 1) * job.shard_size))]
                scored = score_shard(pipe, scorer, rows, job.text_batch)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                folder.write_shard(index, scored, time.perf_counter() - started, world.rank)
                advance(1)
                if kill_after and done >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        world.barrier()
        return merge(folder) if world.main else None
    finally:
        world.stop()


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max())}


def merge(folder: ScanFolder) -> dict:
    """The ranked scores.jsonl, memorized.jsonl (a recipe's `memorized:` file), summary.json and, with labels,
    roc.png, from the manifest and the shards alone (no model needed)."""
    manifest = folder.read_manifest()
    rows, seconds = folder.read_shards(manifest["shards"])
    settings = ScanSettings.from_json(manifest["settings"])
    primary = settings.primary
    scanned = [r for r in rows if r["scan"]]
    references = [r for r in rows if r["reference"]]
    basis = references or scanned
    values = [r[primary] for r in basis if r[primary] is not None]
    if len(values) < 2:
        raise BadInputError(f"the threshold needs at least 2 {'reference' if references else 'scanned'} captions "
                            f"with a {primary} score, got {len(values)}", "give more captions (--reference FILE)")
    fpr, k = manifest["threshold"]["fpr"], manifest["threshold"]["k"]
    threshold = threshold_fpr(values, fpr) if fpr is not None else threshold_k(values, k)
    cut = threshold["value"]
    threshold.update({"score": primary, "on": f"{len(values)} reference captions" if references else
                      f"the {len(values)} scanned captions (no --reference)",
                      "references_above": sum(v > cut for v in values)})
    threshold["reference_rate_above"] = threshold["references_above"] / len(values)

    ranked = sorted(scanned, key=lambda r: (r[primary] is None, -(r[primary] or 0.0), r["index"]))
    labeled = any(r["label"] is not None for r in scanned)
    lines, flagged = [], []
    for rank, r in enumerate(ranked, 1):
        score = r[primary]
        row = {"rank": rank, "caption": r["caption"], "score": score, **{s: r[s] for s in settings.scores},
               "flagged": score is not None and score > cut, "count": r["count"], "truncated": r["truncated"]}
        if labeled:
            row["label"] = bool(r["label"])
        lines.append(dumps_line(row))
        if row["flagged"]:
            flagged.append(dumps_line({"caption": r["caption"], "score": score, "rank": rank}))
    write_atomic(folder.path / "scores.jsonl", "".join(lines))
    write_atomic(folder.path / "memorized.jsonl", "".join(flagged))

    evaluation = None
    if labeled:
        per_score = {}
        for s in settings.scores:
            kept = [r for r in scanned if r[s] is not None]
            per_score[s] = ([r[s] for r in kept], [bool(r["label"]) for r in kept])
        evaluation = {s: evaluate({s: v}, y)[s] for s, (v, y) in per_score.items()}
        labels = [bool(r["label"]) for r in scanned]
        if all(len(v) == len(labels) for v, _ in per_score.values()):
            tmp = folder.path / ".roc.png.tmp"
            roc_png(tmp, {s: v for s, (v, _) in per_score.items()}, labels,
                    title=f"{sum(labels)} memorized vs {len(labels) - sum(labels)}")
            os.replace(tmp, folder.path / "roc.png")
    truncated = sum(r["truncated"] for r in scanned)
    summary = {
        "model": manifest["model"],
        "captions": {"scanned": manifest["captions"]["scanned"], "unique": len(scanned),
                     "repeated": sum(r["count"] > 1 for r in scanned),
                     "duplicate_occurrences": manifest["captions"]["scanned"] - len(scanned),
                     "truncated": truncated, "references": len(references), "scored": len(rows)},
        "scores": list(settings.scores),
        "primary": primary,
        "threshold": threshold,
        "flagged": len(flagged),
        "distribution": {s: _stats([r[s] for r in scanned if r[s] is not None]) for s in settings.scores},
        "evaluation": evaluation,
        "scoring_seconds": round(seconds, 3),
        "captions_per_second_per_process": round(len(rows) / seconds, 2) if seconds > 0 else None,
        "settings": manifest["settings"],
        "scorer": manifest["scorer"],
        "files": ["scores.jsonl", "memorized.jsonl", "summary.json"] + (["roc.png"] if labeled else []),
    }
    write_atomic(folder.path / "summary.json", dumps(summary))
    return summary


def dumps_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"

"""`harden scan`: rank a caption set by memorization scores (see harden.scan), on one process or under torchrun /
accelerate launch, or merge a scan's shards (`--merge DIR`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import BadInputError
from .ui import RichUI, failing_as_one_line, quiet_libraries


def _betas(text: Optional[str]) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(b) for b in text.split(","))
    except ValueError:
        raise BadInputError(f"--nemo-betas {text!r} is not a comma-separated list of numbers", "e.g. 0.5,0.5") from None


def scan_command(
    model: Annotated[Optional[str], typer.Argument(help="Hub id or local diffusers folder (zoo:memorizer: the "
                                                        "shipped one).", show_default=False)] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", "-p", help="Caption file: .txt (one per line), "
                                                   ".jsonl (caption key) or .csv (Caption column).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (shards, scores.jsonl, "
                                                "memorized.jsonl, summary.json).")] = None,
    field: Annotated[Optional[str], typer.Option("--field", help="The .jsonl key / .csv column with the caption.")]
    = None,
    scores: Annotated[str, typer.Option("--scores", help="Comma-separated: wen (Wen et al.), nemo (NeMo's first-step "
                                        "score, 10 seeds), attn (MemAttn's attention entropy).")] = "wen,attn",
    primary: Annotated[Optional[str], typer.Option("--primary", help="The score that ranks and is thresholded "
                                                   "(default: the first of --scores).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="wen/attn: latents per caption (Wen's headline: 1).")] = 1,
    steps: Annotated[int, typer.Option("--steps", help="wen: first DDIM steps averaged (Wen's headline: 1).")] = 1,
    guidance: Annotated[float, typer.Option("--guidance", help="wen with --steps > 1: CFG scale of the trajectory.")]
    = 7.5,
    seed: Annotated[int, typer.Option("--seed", help="wen/attn: seed of the latents (the same for every caption).")]
    = 0,
    attn_layer: Annotated[int, typer.Option("--attn-layer", help="attn: cross-attention layer in call order "
                                            "(MemAttn: 3).")] = 3,
    nemo_seeds: Annotated[int, typer.Option("--nemo-seeds", help="nemo: seeds per caption (NeMo: 10).")] = 10,
    nemo_kernel_size: Annotated[Optional[int], typer.Option("--nemo-kernel-size", help="nemo: MS-SSIM window "
                                                            "(default: 11 / 3 scales where the latents allow).")]
    = None,
    nemo_betas: Annotated[Optional[str], typer.Option("--nemo-betas", help="nemo: MS-SSIM scale weights, e.g. "
                                                      "0.5,0.5.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per UNet forward (a CFG pair counts 2).")]
    = 64,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Unique captions per shard (saved as each "
                                            "finishes).")] = 256,
    precision: Annotated[str, typer.Option("--precision", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or "
                                           "bf16.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (under torchrun: one GPU per "
                                        "local rank).")] = "auto",
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision of MODEL.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin) weights.")] = False,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Non-memorized captions the threshold is "
                                                     "set on (default: the scanned captions).")] = None,
    reference_field: Annotated[Optional[str], typer.Option("--reference-field", help="Caption key/column of "
                                                           "--reference.")] = None,
    k: Annotated[float, typer.Option("--k", help="Threshold = mean + k std of the reference scores.")] = 3.0,
    fpr: Annotated[Optional[float], typer.Option("--fpr", help="Instead: the threshold that at most this share of "
                                                 "the --reference captions exceed (e.g. 0.01).")] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="A file of the memorized captions (for AUROC, "
                                                  "TPR at 1 % FPR and roc.png).")] = None,
    label_field: Annotated[Optional[str], typer.Option("--label-field", help="Or a .jsonl/.csv field of --prompts "
                                                       "that is true for memorized captions.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the scan in --out (finished shards are kept).")]
    = False,
    merge: Annotated[Optional[Path], typer.Option("--merge", help="Only merge the shards of this scan folder.")]
    = None,
):
    """Score every caption for memorization (Wen et al., NeMo, MemAttn), rank them, threshold, write memorized.jsonl."""
    from ..scan.folder import ScanFolder
    from ..scan.run import ScanJob, merge as merge_folder, run_scan
    from ..scan.scores import ScanSettings

    quiet_libraries()
    with failing_as_one_line():
        if merge is not None:
            if model or prompts or out:
                raise BadInputError("--merge DIR takes no MODEL, --prompts or --out", "run: harden scan --merge DIR")
            summary = merge_folder(ScanFolder(merge))
            _report(summary, merge)
            return
        if not model or not prompts or out is None:
            raise BadInputError("harden scan needs MODEL, --prompts FILE and --out DIR",
                                "e.g. harden scan zoo:memorizer --prompts captions.jsonl --out scan/")
        chosen = tuple(s.strip() for s in scores.split(",") if s.strip())
        settings = ScanSettings(
            scores=chosen, primary=primary or (chosen[0] if chosen else "wen"), seeds=seeds, steps=steps,
            guidance_scale=guidance, seed=seed, attn_layer=attn_layer, nemo_seeds=nemo_seeds,
            nemo_kernel_size=nemo_kernel_size, nemo_betas=_betas(nemo_betas), batch_size=batch_size,
            precision=precision)
        job = ScanJob(model=model, prompts=prompts, out=out, settings=settings, field=field, reference=reference,
                      reference_field=reference_field, labels=labels, label_field=label_field, k=k, fpr=fpr,
                      shard_size=shard_size, revision=revision, device=device, allow_pickle=allow_pickle,
                      resume=resume)
        summary = run_scan(job, RichUI())
    if summary is not None:  # rank 0
        _report(summary, out)


def _report(summary: dict, out: Path) -> None:
    c, t = summary["captions"], summary["threshold"]
    typer.echo(f"scanned {c['unique']} unique captions ({c['duplicate_occurrences']} duplicate occurrences of "
               f"{c['repeated']} captions, {c['truncated']} truncated): {summary['flagged']} above the threshold "
               f"{t['value']:.4g} ({summary['primary']}, {t['rule']} on {t['on']})")
    for name, e in (summary["evaluation"] or {}).items():
        typer.echo(f"  {name:5s} AUROC {e['auroc']:.3f}  TPR at 1% FPR {e['tpr_at_1pct_fpr']:.3f}")
    typer.echo(f"wrote {out}/scores.jsonl, {out}/memorized.jsonl, {out}/summary.json"
               + (f", {out}/roc.png" if "roc.png" in summary["files"] else ""))

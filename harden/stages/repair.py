"""Stage 5, repair (after prune, before the audit and verify; off unless `repair.enabled`): adversarial fine-tuning
of the pruned UNet (harden.repair), so that the released model withstands the embedding attack.

Writes repair/prepared.safetensors + prepared.json (its training data, computed once), repair/checkpoints/ while it
trains (resumable with `harden run --resume`; removed at the end), then repair/unet_<layout>.safetensors (the
repaired UNet of each export layout; Run.hardened_unets() returns these from then on) and repair/repair.json
(settings, per-prompt targets, losses, probes, steps, time). With no memorized prompt detected it writes only
repair.json saying it was skipped, and the pruned model is released as it is.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import time

import torch

from ..audit.inputs import similarity_from_recipe
from ..audit.similarity import Similarity
from ..errors import HardenError
from ..files import save_tensors_atomic
from ..prompts import Prompt
from ..prune import prune_compact, prune_dense
from ..repair import weights_file
from ..repair.data import Prepared, memorized_targets, prepare_adversarial, prepare_distillation, prepare_pairs
from ..repair.probe import Probe
from ..repair.structure import Structure, check_repairable
from ..repair.trainer import Repairer
from .context import Run
from .folder import RunFolder, read_neurons

PREPARED_JSON = "repair/prepared.json"
REPAIR_JSON = "repair/repair.json"
FAULT_ENV = "HARDEN_FAULT_KILL_AFTER_REPAIR_STEP"  # tests: SIGKILL after this repair step


def similarity(run: Run) -> Similarity:
    """The audit's metric and threshold (recipe `audit:` section; SSIM at 0.7 by default), so that what repair
    calls reproduced is what the audit calls reproduced."""
    return similarity_from_recipe(run.recipe.audit, run.inputs.loaded.folder)


def _prepare(run: Run, start, teacher, indices: list[int], sim: Similarity, seed: int) -> tuple[Prepared, dict]:
    r, v = run.recipe.repair, run.recipe.verify
    memorized = run.inputs.memorized
    gen = torch.Generator().manual_seed(seed + 2)
    with run.ui.stage("repair: targets and surrogates", len(indices)) as advance:
        targets = memorized_targets(run.pipe, run.pipe.unet, [memorized[i] for i in indices], sim,
                                    list(range(r.surrogate_seeds)), v.steps, v.guidance_scale)
        kept = [(i, t) for i, t in zip(indices, targets) if t[0] is not None]
        skipped = [i for i, t in zip(indices, targets) if t[0] is None]
        prompts = prepare_adversarial(run.pipe, start, memorized, [i for i, _ in kept], [t for _, t in kept], sim,
                                      n_paraphrases=r.paraphrases, surrogate_seeds=r.surrogate_seeds,
                                      steps=v.steps, guidance=v.guidance_scale, seed=seed)
        advance(len(indices))
    if r.retain is not None:
        retain = prepare_pairs(run.pipe, run.inputs.retain)
    else:
        n = min(len(run.inputs.references), r.retain_prompts or len(run.inputs.references))
        with run.ui.stage("repair: distillation data", n * r.retain_seeds) as advance:
            retain = prepare_distillation(run.pipe, teacher, run.inputs.references, [t[0] for _, t in kept], sim,
                                          n_prompts=n, n_seeds=r.retain_seeds, empty_fraction=r.empty_fraction,
                                          pool=r.pool, steps=v.steps, guidance=v.guidance_scale, generator=gen,
                                          advance=advance)
    reference = run.embeds(run.inputs.references[:64])
    uncond = run.embeds([Prompt("")])
    prepared = Prepared(prompts, retain, reference, uncond)
    meta = prepared.save(run.folder.file("repair"), {"skipped_prompts": skipped, "similarity": sim.name,
                                                     "threshold": sim.threshold})
    run.folder.write_json(PREPARED_JSON, meta)
    return prepared, meta


def _fault_hook():
    """Tests: SIGKILL this process right after repair step N (FAULT_ENV=N), between two checkpoints or on one."""
    kill_after = int(os.environ.get(FAULT_ENV, "0"))
    if not kill_after:
        return None

    def hook(step: int) -> None:
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def repair(run: Run) -> None:
    r = run.recipe.repair
    if not r.enabled:
        return
    started = time.perf_counter()
    detection = run.folder.read_json("detect/detection.json")
    detected = [row["index"] for row in detection["prompts"] if row["memorized"]]
    if not detected:
        run.folder.write_json(REPAIR_JSON, {"skipped": "no memorized prompt was detected",
                                                     "settings": r.model_dump(mode="json")})
        run.ui.log("repair: skipped: no memorized prompt was detected, so there is nothing to repair")
        return
    neurons = read_neurons(run.folder.file("localize", "neurons.json"))
    dtype = next(run.pipe.unet.parameters()).dtype
    start = prune_dense(run.pipe.unet, neurons).float()  # fp32 master weights; `autocast` runs the math in half
    check_repairable(start)
    structure = Structure.of(start, neurons, r.train)
    teacher = run.pipe.unet if r.teacher == "base" else copy.deepcopy(start).eval()
    sim = similarity(run)
    seed = run.recipe.seed if r.seed is None else r.seed
    if run.folder.file(PREPARED_JSON).exists():  # a resumed repair reuses its data
        meta = run.folder.read_json(PREPARED_JSON)
        prepared = Prepared.load(run.folder.file("repair"), meta)
    else:
        prepared, meta = _prepare(run, start, teacher, detected, sim, seed)
    if not prepared.prompts:
        run.folder.write_json(REPAIR_JSON, {"skipped": "no detected prompt has an image to keep away "
                                                                "(no training image, no consistent base image)",
                                                     "settings": r.model_dump(mode="json"), "data": meta})
        run.ui.log("repair: skipped: no detected prompt has a target image")
        return
    probe = Probe(run.pipe, [p.image for p in prepared.prompts], sim, r.probe_seeds, run.recipe.verify.steps,
                  run.recipe.verify.guidance_scale) if r.probe_every else None
    trainer = Repairer(start, run.pipe.scheduler, structure, prepared, r, seed, probe)
    checkpoints = run.folder.file("repair", "checkpoints")
    with run.ui.stage("repair", r.steps) as advance:
        result = trainer.run(checkpoints, advance, run.ui.log, _fault_hook())
    broken = structure.violations(start)
    if broken:
        raise HardenError(f"repair moved pruned rows away from zero ({broken[0]})", "this is a bug in harden")
    start = start.to(dtype)  # released in the base model's dtype
    for layout in run.recipe.export.layouts:
        unet = start if layout == "dense" else prune_compact(start, neurons)
        save_tensors_atomic(weights_file(run.folder.file("repair"), layout), unet.state_dict())
    history = result.history
    tail = history[-10:]
    run.folder.write_json(REPAIR_JSON, {
        "settings": r.model_dump(mode="json"), "seed": seed, "data": meta, "steps": result.steps,
        "stopped_early": result.stopped_early, "resumed_from": result.resumed_from,
        "trainable_parameters": sum(p.numel() for p in trainer.params),
        "zero_rows_kept": {k: len(v) for k, v in structure.zero_rows.items()},
        "losses_final": {"retain": _mean(h["retain"] for h in tail), "adv": _mean(h["adv"] for h in tail)},
        "history": history, "probes": result.probes, "train_seconds": result.seconds,
        "attack_seconds": result.attack_seconds, "seconds": round(time.perf_counter() - started, 3),
        "device": str(run.pipe.device)})
    shutil.rmtree(checkpoints, ignore_errors=True)
    run.cache.pop("unets", None)  # Run.hardened_unets() now returns the repaired UNets
    run.ui.log(f"repair: {result.steps} steps in {result.seconds:.0f} s; final retain loss "
               f"{_mean(h['retain'] for h in tail):.4f}, adversarial {_mean(h['adv'] for h in tail) or 0:.4f}")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def repair_report(folder: RunFolder) -> dict | None:
    """The repair for report.json: settings, data notes (prompt indices, never texts), losses per step, probes,
    steps and time; None when repair was off. report.json is published with the export, so no prompt text."""
    path = folder.file(REPAIR_JSON)
    if not path.is_file():
        return None
    data = folder.read_json(REPAIR_JSON)
    if data.get("skipped"):
        return {"skipped": data["skipped"], "settings": data["settings"]}
    history = data["history"]
    return {"settings": data["settings"], "seed": data["seed"], "steps": data["steps"],
            "stopped_early": data["stopped_early"], "resumed_from": data["resumed_from"],
            "trainable_parameters": data["trainable_parameters"], "zero_rows_kept": data["zero_rows_kept"],
            "prompts": data["data"]["prompts"], "retain_data": data["data"]["retain_notes"],
            "losses_final": data["losses_final"],
            "losses": {"retain": [round(h["retain"], 6) for h in history],
                       "adv": [None if h["adv"] is None else round(h["adv"], 6) for h in history]},
            "probes": data["probes"], "seconds": data["seconds"], "train_seconds": data["train_seconds"],
            "attack_seconds": data["attack_seconds"], "device": data["device"]}

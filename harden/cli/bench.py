"""`harden bench`: localization in the official order, exact and fast mode, timed in one run (see harden.bench)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from ..bench import (MEMORIZER, MODES, attack_throughput, calibration_throughput, memorizer_workload,
                     planted_workload, repeat_modes, run_modes, scan_throughput, sd14_workload)
from ..errors import BadInputError
from ..repair.memory import OPTIMIZER_STATE, repair_throughput
from .ui import failing_as_one_line, quiet_libraries


def bench_command(
    model: Annotated[str, typer.Option("--model", help="memorizer (shipped, default), planted, or sd14-random.")]
    = "memorizer",
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="Memorizer folder to load.")] = None,
    prompts: Annotated[int, typer.Option("--prompts", help="Number of prompts (0: all / 1 for sd14-random).")] = 0,
    modes: Annotated[str, typer.Option("--modes", help="Comma-separated: reference,exact,fast.")] = ",".join(MODES),
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per prompt (NeMo: 10).")] = 10,
    latent_size: Annotated[int, typer.Option("--latent-size", help="sd14-random latents (SD v1.4: 64).")] = 64,
    iterations: Annotated[int, typer.Option("--iterations", help="sd14-random: forced initial iterations.")] = 5,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Samples per UNet forward.")] = None,
    refine_block: Annotated[Optional[int], typer.Option("--refine-block",
                                                        help="Speculative refinement trials per forward.")] = None,
    speculate: Annotated[Optional[int], typer.Option("--speculate",
                                                     help="Initial-selection steps per forward.")] = None,
    calib_prompts: Annotated[int, typer.Option("--calib-prompts", help="Also time calibration on N prompts "
                                                                       "(CLIP-L-sized encoder; 50000 on GPU).")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for torch (0: torch's default).")] = 0,
    theta_start: Annotated[Optional[float], typer.Option("--theta-start", help="memorizer/planted: initial theta "
                                                         "(NeMo: 5; lower gives wider initial sets).")] = None,
    k_start: Annotated[Optional[int], typer.Option("--k-start", help="memorizer/planted: initial top-k.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write all numbers to this JSON file.")] = None,
    early_reject: Annotated[Optional[bool], typer.Option(
        "--early-reject/--no-early-reject", help="Stop a test at the first seed that fails it (exact mode: same "
        "decisions). Default: on, except exact mode on CUDA.")] = None,
    parallel_prompts: Annotated[Optional[int], typer.Option(
        "--parallel-prompts", min=1, help="Exact and fast mode: prompts searched side by side, sharing forwards "
        "(default: as many as fill a forward; 1: one at a time).")] = None,
    workload: Annotated[str, typer.Option("--workload", help="localize (the modes above), audit (the embedding "
                                          "attack on the memorizer: all prompts batched vs one at a time) or scan "
                                          "(harden scan's captions/s; memorizer or sd14-random) or repair "
                                          "(repair's training steps/s and memory).")]
    = "localize",
    attack_steps: Annotated[int, typer.Option("--attack-steps", min=1, help="audit: Adam steps timed per "
                                              "attack (the audit runs 50); repair: steps per attack refresh.")] = 10,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Run the modes N times, interleaved (rotated order "
                                        "per round); report the median speed-up and its spread.")] = 1,
    repair_steps: Annotated[int, typer.Option("--repair-steps", min=1, help="repair: training steps timed.")] = 10,
    optimizer: Annotated[str, typer.Option("--optimizer", help="repair: adamw, adam, sgd or adafactor.")] = "adamw",
    checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="repair: recompute activations in "
                                                "backward.")] = False,
    memory_sizes: Annotated[str, typer.Option("--memory-sizes", help="repair: latent sides at which to measure saved "
                                              "activations for the memory model, e.g. 8,16,24 (empty: skip).")] = "",
):
    """Time localization in the official order, exact mode and fast mode on the same prompts; print speed-ups."""
    quiet_libraries()
    if threads:
        torch.set_num_threads(threads)
    with failing_as_one_line():
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        if workload not in ("localize", "audit", "scan", "repair"):
            raise BadInputError(f"--workload {workload!r} is not localize, audit, scan or repair")
        if workload == "repair":  # steps/s and peak memory of repair's training loop; the memory model
            if model not in ("memorizer", "sd14-random") or optimizer not in OPTIMIZER_STATE:
                raise BadInputError(f"--workload repair runs on memorizer or sd14-random with one of "
                                    f"{', '.join(OPTIMIZER_STATE)}")
            sizes = tuple(int(v) for v in memory_sizes.split(",") if v.strip())
            report = {"workload": "repair", **repair_throughput(
                model, steps=repair_steps, batch=batch_size or 32, latent_size=latent_size, optimizer=optimizer,
                device=dev, checkpointing=checkpointing, measure_sizes=sizes, memorizer=model_dir or MEMORIZER,
                prompts=prompts or (8 if model == "memorizer" else 1), attack_steps=attack_steps, log=typer.echo)}
            _write_json(json_path, report)
            return
        if workload == "scan":  # captions/s of harden scan's scores (wen: 1 seed; nemo: --seeds)
            report = {"workload": "scan", **scan_throughput(model, prompts, dev, batch_size or 64, latent_size, seeds,
                                                            model_dir or MEMORIZER, log=typer.echo)}
            _write_json(json_path, report)
            return
        if workload == "audit":
            typer.echo(f"bench: audit attack on the memorizer on {dev}, torch threads {torch.get_num_threads()}")
            report = {"workload": "audit", **attack_throughput(model_dir or MEMORIZER, prompts, attack_steps,
                                                               device=dev, log=typer.echo)}
            _write_json(json_path, report)
            return
        chosen = [m.strip() for m in modes.split(",") if m.strip()]
        if not chosen or set(chosen) - set(MODES):
            raise BadInputError(f"--modes {modes!r}: choose from {', '.join(MODES)}")
        if model == "memorizer":
            work = memorizer_workload(model_dir or MEMORIZER, prompts, seeds, dev)
        elif model == "planted":
            work = planted_workload(prompts, seeds, dev)
        elif model == "sd14-random":
            if dev.type == "cpu":
                typer.echo("note: an SD-v1.4-sized UNet on CPU takes seconds per sample; use --latent-size 32 "
                           "--seeds 4 --iterations 2 to keep it feasible")
            work = sd14_workload(prompts, seeds, latent_size, iterations, dev)
        else:
            raise BadInputError(f"--model {model!r} is not one of memorizer, planted, sd14-random")
        if model != "sd14-random" and (theta_start is not None or k_start is not None):
            work.prompts = [(p, e, a, replace(loc, theta_start=5.0 if theta_start is None else theta_start,
                                              k_start=k_start or 0)) for p, e, a, loc in work.prompts]
            loc = work.prompts[0][3]
            work.notes.append(f"initial selection from theta {loc.theta_start}, k {loc.k_start}")
        typer.echo(f"bench: {work.name} on {dev} ({'fp16 autocast' if dev.type == 'cuda' else 'fp32'}), "
                   f"{len(work.prompts)} prompts, {seeds} seeds, torch threads {torch.get_num_threads()}")
        for note in work.notes:
            typer.echo(f"note: {note}")
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if dev.type == "cpu" and torch.get_num_threads() > 1 and load > cores:
            typer.echo(f"note: load average {load:.1f} on {cores} cores: other processes share the CPU, and torch's "
                       f"{torch.get_num_threads()} threads wait for each other at every parallel region (a forward "
                       "can take 5-15x longer); --threads 1 and --repeat measure more steadily")
        typer.echo("setup seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in work.setup_seconds.items()))
        report = {"model": model, "name": work.name, "device": str(dev), "seeds": seeds, "notes": work.notes,
                  "setup_seconds": work.setup_seconds}
        options = dict(batch_size=batch_size, refine_block=refine_block, speculate=speculate, log=typer.echo,
                       early_reject=early_reject, parallel_prompts=parallel_prompts)
        report.update(repeat_modes(work, chosen, repeat, **options) if repeat > 1 else run_modes(work, chosen,
                                                                                                   **options))
        if calib_prompts:
            report["calibration"] = calibration_throughput(calib_prompts, dev, log=typer.echo)
    _write_json(json_path, report)


def _write_json(json_path: Optional[Path], report: dict) -> None:
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        typer.echo(f"wrote {json_path}")

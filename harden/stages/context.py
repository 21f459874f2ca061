"""What every stage is given: the checked inputs, the loaded pipeline, the run folder, and a progress UI.

Why a context object: stages are plain functions of (run) -> artifact; the runner builds one `Run` and passes it
along, so a stage never reaches back into the runner.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..audit.inputs import check_audit_inputs
from ..checkpoint import pruned_unets
from ..errors import BadInputError
from ..nemo.localize import LocalizeSettings
from ..nemo.conditioning import encode
from ..nemo.score import (NoiseDiffScorer, ScoreSettings, detection_prediction, detection_timestep,
                          max_pairwise_scores)
from ..prompts import Prompt, load_prompts
from ..repair import repaired_unets, weights_file
from ..repair.inputs import load_retain
from ..recipe import AUDIT_GATES, LoadedRecipe, Recipe
from ..targets import Target
from .folder import RunFolder, read_neurons


class SilentUI:
    """What the runner reports progress to; the CLI passes a rich implementation."""

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        yield lambda n=1, note=None: None  # note: a short status (e.g. repair's losses) shown beside the bar

    def log(self, message: str) -> None:
        pass


@dataclass
class Inputs:
    """Everything a run needs, loaded and checked before anything is written."""

    loaded: LoadedRecipe
    memorized: list[Prompt]
    references: list[Prompt]
    held_out: list[Prompt]
    retain: list[Prompt] = field(default_factory=list)  # repair.retain pairs (empty: data-free distillation)

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe


def load_inputs(loaded: LoadedRecipe) -> Inputs:
    """Prompt lists and cross-section checks; no model is loaded (this is `harden validate`)."""
    r = loaded.recipe
    memorized = load_prompts(r.memorized, loaded.folder, "memorized")
    references = load_prompts(r.reference, loaded.folder, "reference")
    held_out = load_prompts(r.verify.held_out, loaded.folder, "verify.held_out") if r.verify.held_out else []
    if len(references) < 2:
        raise BadInputError("reference: need at least 2 prompts for statistics and tau_mem", "add reference prompts")
    needs = {
        "memorized_ssim_after_max": (any(p.image for p in memorized) and r.verify.generate,
                                     "memorized prompts with reference images and verify.generate: true"),
        "heldout_ssim_median": (bool(held_out) and r.verify.generate, "verify.held_out and verify.generate: true"),
        "heldout_ssim_min": (bool(held_out) and r.verify.generate, "verify.held_out and verify.generate: true"),
        "heldout_clip_drop": (bool(held_out) and r.verify.generate and r.verify.clip_model is not None,
                              "verify.held_out, verify.generate: true and verify.clip_model"),
        "heldout_alignment_drop": (bool(held_out) and r.verify.generate,
                                   "verify.held_out, verify.generate: true and the shipped memorizer model"),
        **{gate: (r.audit.enabled, "an audit section with enabled: true") for gate in AUDIT_GATES},
    }
    for gate in r.verify.gates:
        ok, what = needs.get(gate, (True, ""))
        if not ok:
            raise BadInputError(f"gate {gate!r} cannot be measured by this recipe", f"it needs {what}")
    if r.audit.enabled:
        check_audit_inputs(loaded, memorized)
    return Inputs(loaded, memorized, references, held_out, load_retain(loaded))


@dataclass
class Run:
    inputs: Inputs
    folder: RunFolder
    pipe: object
    model_dir: Path | None
    ui: SilentUI
    targets: list[Target] = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    @property
    def recipe(self) -> Recipe:
        return self.inputs.recipe

    def threshold(self, value) -> float:
        if value == "tau_mem":
            return float(self.folder.read_json("calibrate/calibration.json")["tau_mem"])
        return float(value)

    def score_settings(self) -> ScoreSettings:
        """Detection settings; the seed threshold is only known (and only used) once calibration has run."""
        d = self.recipe.detection
        calibrated = self.folder.file("calibrate/calibration.json").exists()
        seed_threshold = self.threshold(d.threshold) if calibrated or d.threshold != "tau_mem" else 1.0
        return ScoreSettings(n_seeds=d.n_seeds, seed=d.seed, num_inference_steps=d.num_inference_steps,
                             timestep_index=d.timestep_index, kernel_size=d.kernel_size, betas=tuple(d.betas),
                             seed_threshold=seed_threshold, factor=self.recipe.localization.factor,
                             max_batch=d.batch_size, fp16_autocast=d.fp16_autocast, ms_ssim=d.ms_ssim)

    def scorer(self, unet=None, targets=None) -> NoiseDiffScorer:
        settings = self.score_settings()
        t = detection_timestep(self.pipe.scheduler.config, settings)
        return NoiseDiffScorer(unet if unet is not None else self.pipe.unet,
                               self.targets if targets is None else targets, t, settings,
                               prediction=detection_prediction(self.pipe.scheduler.config, settings))

    def embeds(self, prompts: list[Prompt]) -> torch.Tensor:
        """As the pipeline conditions its UNet (SDXL: both encoders, packed added conditions; `conditioning`)."""
        return encode(self.pipe, [p.text for p in prompts]).cpu()

    def scores(self, scorer: NoiseDiffScorer, prompts: list[Prompt], advance,
               keep_deltas: list | None = None) -> list[float]:
        """Max pairwise score per prompt, prompts batched by the UNet batch size (deltas kept on the CPU if asked)."""
        per_call = max(1, scorer.settings.max_batch // scorer.settings.n_seeds)
        out: list[float] = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            kept: list | None = [] if keep_deltas is not None else None
            out += max_pairwise_scores(scorer, self.embeds(chunk), kept).tolist()
            if keep_deltas is not None:
                keep_deltas.extend(d.cpu() for d in kept)
            advance(len(chunk))
        return out

    @property
    def widths(self) -> dict[str, int]:
        """{target layer: value channels} of the base model."""
        return {t.name: t.width for t in self.targets}

    def pruned_unets(self) -> dict[str, torch.nn.Module]:
        """{layout: pruned UNet}, built once per process from neurons.json (pruning is deterministic and cheap)."""
        if "pruned" not in self.cache:
            neurons = read_neurons(self.folder.file("localize", "neurons.json"))
            self.cache["pruned"] = pruned_unets(self.pipe.unet, neurons, self.recipe.export.layouts)
        return self.cache["pruned"]

    @property
    def repaired(self) -> bool:
        """Whether the repair stage wrote repaired weights (harden.stages.repair); they are then what is released."""
        return weights_file(self.folder.file("repair"), self.recipe.export.layouts[0]).is_file()

    def hardened_unets(self) -> dict[str, torch.nn.Module]:
        """{layout: the released UNet}: the repaired UNets when repair ran, else the pruned ones."""
        if not self.repaired:
            return self.pruned_unets()
        if "unets" not in self.cache:
            neurons = read_neurons(self.folder.file("localize", "neurons.json"))
            self.cache["unets"] = repaired_unets(self.pipe.unet, neurons, self.recipe.export.layouts,
                                                 self.folder.file("repair"))
        return self.cache["unets"]

    def localize_settings(self) -> LocalizeSettings:
        loc = self.recipe.localization
        return LocalizeSettings(theta_start=loc.theta_start, theta_step=loc.theta_step, theta_min=loc.theta_min,
                                use_theta=loc.use_theta, k_start=loc.k_start, use_top_k=loc.use_top_k,
                                k_max=loc.k_max, tau_initial=self.threshold(loc.tau_initial),
                                tau_refine=self.threshold(loc.tau_refine), rel_threshold=loc.rel_threshold,
                                refine=loc.refine)

"""The repair loop: L = retain_weight * L_retain + adv_weight * L_adv, with the attack in the loop.

Every `refresh_every` steps the attack embeddings (per memorized prompt one started from its prompt embedding and
`restarts` from random embeddings) are re-optimized against the *current* weights for `refresh_steps` Adam steps,
warm-started from where they were (every `restart_every`-th refresh starts afresh with `attack_steps`); the ones
they replace are kept (`replay`), so the model cannot forget an old trigger while learning a new one. All attacks
share UNet forwards (harden.audit.attack.embedding_attack), and each training step is one forward of retain and
adversarial samples together.

Deterministic from the seed on a given machine: every random draw comes from two CPU generators (training draws,
attack draws) whose states are checkpointed with the weights, the optimizer state and the attack embeddings, so a
repair resumed from a checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..audit.attack import embedding_attack, random_starts
from ..recipe import RepairSection
from .checkpointing import generator_state, load_checkpoint, load_optimizer, save_checkpoint
from .data import Prepared
from .losses import losses, make_batch
from .probe import Probe
from .structure import Structure

Progress = Callable[..., None]


def make_optimizer(settings: RepairSection, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kind = settings.optimizer
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay)
    return torch.optim.Adafactor(params, lr=settings.lr, weight_decay=settings.weight_decay)


def lr_at(settings: RepairSection, step: int) -> float:
    """Linear warm-up, then constant or cosine to 0 at `steps`."""
    scale = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
    if settings.lr_schedule == "cosine":
        scale *= 0.5 * (1.0 + math.cos(math.pi * min(step, settings.steps) / settings.steps))
    return settings.lr * scale


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA where the card supports it, else none; none/bf16/fp16 as given."""
    if setting == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]


@dataclass
class RepairResult:
    steps: int
    stopped_early: bool
    history: list[dict]
    probes: list[dict]
    seconds: float
    resumed_from: int | None
    attack_seconds: float
    notes: list[str] = field(default_factory=list)


class Repairer:
    """Holds the model, the optimizer, the attack embeddings and the RNG states; `run` trains to the end."""

    def __init__(self, unet: torch.nn.Module, scheduler, structure: Structure, prepared: Prepared,
                 settings: RepairSection, seed: int, probe: Probe | None = None):
        self.unet, self.scheduler, self.structure = unet, scheduler, structure
        self.data, self.settings, self.probe = prepared, settings, probe
        self.params = structure.parameters(unet)
        self.optimizer = make_optimizer(settings, self.params)
        self.device = next(unet.parameters()).device
        self.amp = autocast_dtype(settings.autocast, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        if settings.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.gen = torch.Generator().manual_seed(seed)
        self.attack_gen = torch.Generator().manual_seed(seed + 1)
        self.step = 0
        self.refreshes = 0
        self.attacks: list[torch.Tensor] | None = None  # per prompt [1 + restarts, L, D]
        self.replay: list[torch.Tensor] = [p.fixed[:0] for p in prepared.prompts]  # per prompt [<= replay, L, D]
        self.history: list[dict] = []
        self.probes: list[dict] = []
        self.stopped = False
        self.seconds = 0.0
        self.attack_seconds = 0.0

    # ------------------------------------------------------------------------------------------------ attacks

    def _attack(self, starts: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        """All prompts' attacks in shared forwards; returns the optimized embeddings per prompt."""
        started = time.perf_counter()
        counts = [len(s) for s in starts]
        latents = torch.cat([p.memorized.unsqueeze(0).expand(c, *p.memorized.shape)
                             for p, c in zip(self.data.prompts, counts)])
        emb, _ = embedding_attack(self.unet, self.scheduler, latents, torch.cat(starts), steps=steps,
                                  lr=self.settings.attack_lr, batch=self.settings.attack_batch,
                                  generator=self.attack_gen)
        self.attack_seconds += time.perf_counter() - started
        return list(emb.cpu().split(counts))

    def restart_attacks(self) -> None:
        """Fresh attacks: from each prompt's embedding and from `restarts` random embeddings."""
        starts = [torch.cat([p.fixed[:1], random_starts(self.data.random_reference, self.settings.restarts,
                                                         self.attack_gen)]) for p in self.data.prompts]
        self._remember()
        self.attacks = self._attack(starts, self.settings.attack_steps)

    def refresh_attacks(self) -> None:
        self.refreshes += 1
        every = self.settings.restart_every
        if every and self.refreshes % every == 0:
            self.restart_attacks()
            return
        self._remember()
        self.attacks = self._attack(self.attacks, self.settings.refresh_steps)

    def _remember(self) -> None:
        """Keep the attacks about to be replaced (newest last, at most `replay` per prompt)."""
        if self.attacks is None or not self.settings.replay:
            return
        self.replay = [torch.cat([r, a])[-self.settings.replay:] for r, a in zip(self.replay, self.attacks)]

    def rows(self) -> list[torch.Tensor]:
        """Per prompt, every embedding L_adv trains on: prompt + paraphrases, current attacks, replayed attacks."""
        return [torch.cat([p.fixed, a, r]) for p, a, r in zip(self.data.prompts, self.attacks, self.replay)]

    # ------------------------------------------------------------------------------------------------ training

    def train_step(self) -> dict:
        s = self.settings
        lr = lr_at(s, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        adv = s.adv_weight > 0 and bool(self.data.prompts)
        batch = make_batch(self.data.retain, self.rows() if adv else None,
                           [p.surrogate for p in self.data.prompts] if adv else None, self.scheduler, s.batch,
                           s.adv_batch, self.step, self.gen)
        dtype = next(self.unet.parameters()).dtype
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            pred = self.unet(batch.x.to(self.device, dtype), batch.t.to(self.device),
                             encoder_hidden_states=batch.cond.to(self.device, dtype)).sample
        retain, adv_loss = losses(pred, batch)
        loss = s.retain_weight * retain + (s.adv_weight * adv_loss if adv_loss is not None else 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        self.structure.mask_gradients(self.unet)
        norm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip if s.grad_clip else float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.structure.rezero(self.unet)
        self.step += 1
        row = {"step": self.step, "loss": float(loss.detach()), "retain": float(retain.detach()),
               "adv": None if adv_loss is None else float(adv_loss.detach()), "grad_norm": float(norm), "lr": lr}
        self.history.append(row)
        return row

    def maybe_probe(self) -> None:
        s = self.settings
        if self.probe is None or not s.probe_every or self.step % s.probe_every or self.step < max(1, s.min_steps):
            return
        embeds = [torch.cat([p.fixed[:1], a]) for p, a in zip(self.data.prompts, self.attacks)]
        result = {"step": self.step, **self.probe(self.unet, embeds)}
        self.probes.append(result)
        if result["reproduced"] <= s.stop_at:
            self.stopped = True

    # ------------------------------------------------------------------------------------------------ state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"gen": generator_state(self.gen), "attack_gen": generator_state(self.attack_gen)}
        for k, (a, r) in enumerate(zip(self.attacks or [], self.replay)):
            out[f"attacks.{k}"] = a
            if len(r):
                out[f"replay.{k}"] = r
        return out

    def state_json(self) -> dict:
        return {"refreshes": self.refreshes, "history": self.history, "probes": self.probes,
                "stopped": self.stopped, "seconds": self.seconds, "attack_seconds": self.attack_seconds,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def restore(self, folder: Path) -> int | None:
        """Load the latest checkpoint under `folder`; returns its step (None when there is none)."""
        found = load_checkpoint(folder)
        if found is None:
            return None
        weights, opt_tensors, tensors, state = found
        self.unet.load_state_dict(weights)
        load_optimizer(self.optimizer, opt_tensors, state["optimizer"])
        self.gen.set_state(tensors["gen"])
        self.attack_gen.set_state(tensors["attack_gen"])
        n = len(self.data.prompts)
        if "attacks.0" in tensors or n == 0:
            self.attacks = [tensors[f"attacks.{k}"] for k in range(n)] if n else None
        self.replay = [tensors.get(f"replay.{k}", p.fixed[:0]) for k, p in enumerate(self.data.prompts)]
        self.step, self.refreshes = state["step"], state["refreshes"]
        self.history, self.probes, self.stopped = state["history"], state["probes"], state["stopped"]
        self.seconds, self.attack_seconds = state["seconds"], state["attack_seconds"]
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return self.step

    def save(self, folder: Path) -> None:
        save_checkpoint(folder, self.step, self.unet, self.optimizer, self.state_tensors(), self.state_json())

    # ------------------------------------------------------------------------------------------------ loop

    def run(self, checkpoints: Path, progress: Progress | None = None, log: Callable[[str], None] | None = None,
            after_step: Callable[[int], None] | None = None) -> RepairResult:
        """Train from the latest checkpoint (or from the start) to `steps` or the early stop; checkpoint as it goes.
        `after_step(step)` runs after each step and its checkpoint (tests use it to kill the process there)."""
        s = self.settings
        resumed = self.restore(checkpoints)
        if resumed is not None and progress is not None:
            progress(resumed)
        adv = s.adv_weight > 0 and bool(self.data.prompts)
        self.unet.train()
        started = time.perf_counter()
        base_seconds = self.seconds
        while self.step < s.steps and not self.stopped:
            if adv:
                if self.attacks is None:
                    self.restart_attacks()
                elif self.step % s.refresh_every == 0 and self.step > 0:
                    self.refresh_attacks()
                self.maybe_probe()
                if self.stopped:
                    break
            row = self.train_step()
            self.seconds = base_seconds + time.perf_counter() - started
            note = f"retain {row['retain']:.4f}" + (f" adv {row['adv']:.4f}" if row["adv"] is not None else "")
            if progress is not None:
                progress(1, note)
            if self.step % s.checkpoint_every == 0 and self.step < s.steps:
                self.save(checkpoints)
                if log is not None:
                    log(f"repair: step {self.step}/{s.steps} checkpointed ({note})")
            if after_step is not None:
                after_step(self.step)
        self.unet.eval()
        if self.stopped and log is not None:
            log(f"repair: early stop at step {self.step}: the probe reproduced {self.probes[-1]['reproduced']} "
                f"image(s) (stop at <= {s.stop_at})")
        return RepairResult(self.step, self.stopped, self.history, self.probes, round(self.seconds, 3), resumed,
                            round(self.attack_seconds, 3))

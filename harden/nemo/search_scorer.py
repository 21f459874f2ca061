"""The scorer side of localization: turns "score these candidate neuron sets" into batched, masked UNet forwards.

Why apart from the search (localize.py, fast.py): the search policies only decide *which* sets to test and what a
result means; this module decides *how* they are scored — which seeds, in which batch layout, stopping early at the
first seed that proves a failure, and re-deciding a score that lies within float noise of a threshold in the official
code's layout, so that every decision is the official code's decision. A newcomer can change a policy without
touching any of this, and the policies are tested without a UNet through the same `ScoreFn` protocol.
"""

from __future__ import annotations

from typing import Callable, Literal, Protocol, Sequence

import torch

from .batching import resolve_batching
from .score import ms_ssim

Lists = dict[str, list[int]]  # per layer, a list of channels (repeats allowed, as the official code builds them)
TIE_BAND = 1e-4  # scores this close to a decision's threshold are decided in the official layout (float noise: ~1e-6)
Probe = Literal["only", "never"] | None


class ScoreFn(Protocol):
    """What a search policy calls: per-kept-seed scores [n_kept] (or fewer seeds, see below) for each candidate.

    - `reject(partial) -> bool`: the scorer may return a partial score as soon as it proves a candidate fails;
      passes are always complete. Callers pass it whenever a failing score's exact value is not needed.
    - `near(score) -> bool`: a score for which it is True is replaced by the official layout's; `near=ALWAYS` asks
      for the official layout outright (the score becomes a threshold itself).
    - `guess`: the predicted outcome (True: pass) of every candidate of a speculative block; the scorer may return
      only the candidates up to and including the first outcome against it.
    - `seeds`: positions in the kept seeds to score (fast mode's screening seeds); the scores cover only those.
    - `probe`: "only" returns the probe seed's scores (the caller confirms survivors itself); "never" scores all
      seeds at once (a candidate likely to pass); None decides from the fails seen so far.
    """

    def __call__(self, cands: Sequence[Lists], reject: Callable[[torch.Tensor], bool] | None = None,
                 near: Callable[[torch.Tensor], bool] | None = None, guess: bool | None = None,
                 seeds: Sequence[int] | None = None, probe: Probe = None) -> list[torch.Tensor]: ...


def ALWAYS(_: torch.Tensor) -> bool:
    """`near=ALWAYS`: the score becomes a threshold itself, so it must be the official layout's."""
    return True


def as_set(lists: Lists) -> frozenset:
    return frozenset((layer, n) for layer, idx in lists.items() for n in idx)


class SearchScorer:
    """A `ScoreFn` for one prompt on a `NoiseDiffScorer` (or a pooled one): the seed filter, then blocked scores.

    Construction runs NeMo's seed filter on the unblocked deltas (computed here, or passed in as `unblocked`, e.g.
    from a batched detection pass); `kept` are the seeds that reproduce, `seed_scores` all seeds' scores. Blocked
    passes run only the kept seeds, batched as `batching.resolve_batching` plans (`plan`).

    Early rejection (opt-in): score the seed most likely to fail first (the last one that failed; at first, the most
    consistent unblocked seed) for every candidate of a call, then all kept seeds for those it did not reject, so a
    failing candidate costs 1 sample instead of all kept seeds and a passing one costs that sample more; used while
    failures are more than 1 in len(kept). Decisions are the same either way.
    """

    def __init__(self, scorer, embed: torch.Tensor, unblocked: torch.Tensor | None = None, *,
                 batch_size: int | None = None, speculate: int | None = None, refine_block: int | None = None,
                 early_reject: bool = False, independent: bool = False):
        self.scorer, self.embed = scorer, embed
        self.early_reject, self.independent = early_reject, independent
        self.n = scorer.settings.n_seeds
        self.tie_checks = 0  # scores taken in the official layout: near a threshold, or becoming one
        self.tie_shift = 0.0  # the largest change such a re-check made: float noise between batch layouts
        self._official: torch.Tensor | None = None  # the unblocked deltas in the official layout, when first needed
        self._full: dict[frozenset, torch.Tensor] = {}  # independent tests: per-seed scores on all kept seeds

        reference = scorer.unblocked(embed) if unblocked is None else unblocked
        if unblocked is None and scorer.sharing == 1:  # computed alone, all seeds in one forward: official layout
            self._official = reference
        per_seed, kept = scorer.seed_filter(reference)
        if ((per_seed - scorer.settings.seed_threshold).abs() < TIE_BAND).any():  # a seed on the fence
            reference = self.official_unblocked()
            per_seed, kept = scorer.seed_filter(reference)
        self.seed_scores, self.kept, self.reference = per_seed, kept, reference[kept]
        self.plan = resolve_batching(scorer, len(kept), batch_size, speculate, refine_block, scorer.sharing,
                                     independent=independent, early_reject=early_reject) if len(kept) else None
        self._seed_order = sorted(range(len(kept)), key=lambda i: -float(per_seed[kept[i]]))
        self._seen = {"fail": 1, "pass": 0}
        # one candidate with all n seeds in one unshared forward, against official unblocked deltas: that already is
        # the official layout (per-sample masks multiply by the same values as the official [1, width] one)
        self._native = (self._official is not None and len(kept) == self.n and self.plan is not None
                        and self.n <= min(self.plan.batch_size, scorer.settings.max_batch))

    # ------------------------------------------------------------------------------------------ the official layout

    def official_unblocked(self) -> torch.Tensor:
        if self._official is None:
            self._official = self.scorer.noise_diff(self.embed.expand(self.n, -1, -1), torch.arange(self.n),
                                                    solo=True)
        return self._official

    def official_tie(self, cand: Lists) -> torch.Tensor:
        """The score in the official layout: all n seeds of this one candidate alone in a forward, against the
        official unblocked deltas. Float rounding depends on the batch layout (~1e-6 here), so a score that close
        to a threshold could flip a decision; decided this way it is the official code's decision."""
        masks = self.scorer.candidate_masks([cand], 1)
        deltas = self.scorer.noise_diff(self.embed.expand(self.n, -1, -1), torch.arange(self.n), masks, solo=True)
        self.tie_checks += 1
        return ms_ssim(self.official_unblocked()[self.kept], deltas[self.kept], self.scorer.settings)

    # -------------------------------------------------------------------------------------------------- the ScoreFn

    def __call__(self, cands: Sequence[Lists], reject=None, near=None, guess: bool | None = None,
                 seeds: Sequence[int] | None = None, probe: Probe = None) -> list[torch.Tensor]:
        if seeds is not None:  # fast mode's screening seeds: no official layout to match
            return self._blocked(cands, reject, guess, seeds, probe)
        if self.independent:  # e.g. the initial set, scored in initial selection, is scored again to pick a screen
            keys = [as_set(c) for c in cands]
            known = [self._full.get(k) for k in keys]
            if near is not ALWAYS and all(k is not None for k in known):
                return known
            out = self._all_seeds(cands, reject, near, guess)
            self._full.update((k, s) for k, s in zip(keys, out) if s.numel() == len(self.kept))
            return out
        return self._all_seeds(cands, reject, near, guess)

    def _all_seeds(self, cands: Sequence[Lists], reject=None, near=None, guess=None) -> list[torch.Tensor]:
        if self._native and len(cands) == 1:
            return self._blocked(cands, reject)
        if near is ALWAYS:
            return [self.official_tie(c) for c in cands]
        out = self._blocked(cands, reject, guess)
        if near is not None:  # a rejected partial score is past the margin, never near
            for i, (cand, s) in enumerate(zip(cands, out)):
                if near(s):
                    out[i] = self.official_tie(cand)
                    self.tie_shift = max(self.tie_shift, float((out[i] - s).abs().max()))
        return out

    # ------------------------------------------------------------------------------------ batched, early rejection

    def _scores(self, positions: Sequence[int], cands: Sequence[Lists]) -> list[torch.Tensor]:
        """Blocked scores of `cands` on the kept seeds at `positions`, in forwards of the plan's batch size."""
        return self.scorer.blocked_scores(self.embed, self.kept[list(positions)], self.reference[list(positions)],
                                          cands, max_batch=self.plan.batch_size)

    def _probe_on(self, seed: int, which: Sequence[int], cands, out: list, reject) -> list[torch.Tensor]:
        """Score candidates `which` on one kept seed; those it rejects are decided by that score."""
        scores = self._scores([seed], [cands[j] for j in which])
        for j, one in zip(which, scores):
            if reject(one):
                self._seen["fail"] += 1
                out[j] = one
        return scores

    def _blocked(self, cands: Sequence[Lists], reject=None, guess: bool | None = None,
                 seeds: Sequence[int] | None = None, probe: Probe = None) -> list[torch.Tensor]:
        mine = list(range(len(self.kept))) if seeds is None else list(seeds)  # positions in kept
        if not self.early_reject or reject is None:
            return self._scores(mine, cands)
        out: list = [None] * len(cands)
        rest, order = mine, None  # the seeds a survivor is scored on; how its probe joins them
        seen = self._seen
        probed = len(mine) > 1 and probe != "never" and (
            probe == "only" or len(cands) > 1 or seen["fail"] * (len(mine) - 1) >= seen["pass"])
        if probed:  # one seed per candidate
            i = next(i for i in self._seed_order if i in mine)
            probes = self._probe_on(i, range(len(cands)), cands, out, reject)
            if probe == "only":  # the caller scores the survivors itself (fast mode's rounds: their unions)
                return probes
            # fast mode's screens are not matched to the official layout, so a survivor's probe counts as its seed's
            # score there; exact mode re-scores it with the other seeds, as the official batch holds them
            if seeds is not None:
                rest = [m for m in mine if m != i]
                order = [([i] + rest).index(m) for m in mine]
        end = len(cands)  # a speculative block ends at its first outcome against the guess
        if guess is True:
            end = next((j + 1 for j, x in enumerate(out) if x is not None), end)
        one_by_one = guess is False and probed  # a survivor will likely pass and end the block
        while True:
            todo = [j for j in range(end) if out[j] is None]
            if not todo:
                return out[:end]
            if one_by_one:
                todo = todo[:1]
            worst = None
            for j, scores in zip(todo, self._scores(rest, [cands[j] for j in todo])):
                if order is not None:  # the probe's seed back in its place
                    scores = torch.cat([probes[j], scores])[order]
                out[j] = scores
                failed = reject(scores)
                seen["fail" if failed else "pass"] += 1
                if failed:
                    worst = mine[int(scores.argmax())]
                    self._seed_order.insert(0, self._seed_order.pop(self._seed_order.index(worst)))
                if guess is not None and failed != (not guess):
                    end = min(end, j + 1)
            # a survivor that failed on another seed: the next ones waiting likely fail there too (initial
            # selection's steps share most neurons), so they are probed on it, 1, 2, 4, ... at a time, until one
            # survives; chelsea's 7 failing survivors of one probe cost 9 samples each before
            width = 1
            while one_by_one and worst is not None:
                window = [j for j in range(end) if out[j] is None][:width]
                if not window:
                    break
                self._probe_on(worst, window, cands, out, reject)
                if any(out[j] is None for j in window):
                    break
                width *= 2

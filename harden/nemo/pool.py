"""Many prompts' localizations share UNet forwards, each prompt still searched in its own sequential order.

Why: one prompt's search is a chain of small tests (its kept seeds x one candidate), each waiting for the outcome
of the last, but the chains of different prompts are independent. A forward of 80 samples costs far less than 8
forwards of 10 (the shipped memorizer on 2 CPU cores: 3.2 vs 5.8 ms per sample; an SD-v1.4 UNet on an H100: about
3.3 vs 5 ms), and nothing is speculated, so nothing is thrown away and every decision is the one the prompt's own
sequential search makes.

How: each prompt runs in a worker thread against a `PooledScorer`, whose forwards are requests to a
`ForwardPool`. The pool runs one shared forward when every worker that still has work is waiting on a request, so
a batch always holds exactly one request per active worker, in worker order: its layout does not depend on thread
timing. Between forwards only one thing runs at a time per worker (the search logic), and no forward runs while any
worker computes, so forward hooks never overlap. Requests that compare their deltas with reference deltas
(`NoiseDiffScorer.compare`) get their MS-SSIM from the pool too, all of a forward's in one call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

from .batching import auto_batch_size, prompt_workers
from .score import ForwardCounter, NoiseDiffScorer, ms_ssim_groups

T = TypeVar("T")


class Cancelled(Exception):
    """The pool was cancelled (Ctrl-C / SIGTERM in the main thread): a worker's search ends at its next forward."""


@dataclass
class _Request:
    embeds: torch.Tensor
    seeds: torch.Tensor
    masks: dict[str, torch.Tensor] | None
    solo: bool = False
    against: torch.Tensor | None = None  # set: `out` is MS-SSIM with these rows in groups of `sizes`, not deltas
    sizes: Sequence[int] = ()
    out: torch.Tensor | None = None
    forwards: int = 0
    error: BaseException | None = None
    done: bool = False


class ForwardPool:
    """Collects one noise-difference request per active worker, then runs them as one batch (chunked by
    `max_batch` samples) on the shared scorer, whose counter holds the true number of forwards."""

    def __init__(self, scorer: NoiseDiffScorer, workers: int, max_batch: int):
        self.scorer = scorer
        self.active = workers
        self.max_batch = max(1, max_batch)
        self.pending: dict[int, _Request] = {}
        self.cv = threading.Condition()
        self.cancelled = False

    def cancel(self) -> None:
        """Every waiting and future request raises `Cancelled` (a forward already running ends first)."""
        with self.cv:
            self.cancelled = True
            self.cv.notify_all()

    def submit(self, worker: int, embeds: torch.Tensor, seeds: torch.Tensor, masks: dict[str, torch.Tensor] | None,
               solo: bool = False, against: torch.Tensor | None = None,
               sizes: Sequence[int] = ()) -> tuple[torch.Tensor, int]:
        """Block until the forward that includes this request ran -> (its deltas, or with `against` their MS-SSIM
        with its rows in groups of `sizes`; forwards it took part in). A `solo` request gets a forward of its own
        (a layout that does not depend on the other prompts)."""
        req = _Request(embeds, seeds, masks, solo, against, sizes)
        with self.cv:
            if self.cancelled:
                raise Cancelled()
            self.pending[worker] = req
            self._flush_if_ready()
            while not req.done:
                if self.cancelled:
                    self.pending.pop(worker, None)
                    raise Cancelled()
                self.cv.wait()
        if req.error is not None:
            raise req.error
        return req.out, req.forwards

    def leave(self) -> None:
        """A worker has no more requests: the others no longer wait for it."""
        with self.cv:
            self.active -= 1
            self._flush_if_ready()

    def _flush_if_ready(self) -> None:
        if self.cancelled or not self.pending or len(self.pending) < self.active:
            return
        reqs = [self.pending[w] for w in sorted(self.pending)]
        self.pending = {}
        try:
            together = [r for r in reqs if not r.solo]
            if together:
                self._run(together)
            for r in reqs:
                if r.solo:  # alone, in forwards of the settings' size: the official layout
                    self._run([r], self.scorer.settings.max_batch)
        except BaseException as err:  # every waiter gets the error, nobody waits forever
            for r in reqs:
                r.error = err
        finally:
            for r in reqs:
                r.done = True
            self.cv.notify_all()

    def _run(self, reqs: list[_Request], max_batch: int | None = None) -> None:
        chunk = max_batch or self.max_batch
        sizes = [len(r.seeds) for r in reqs]
        deltas = self.scorer.noise_diff(torch.cat([r.embeds for r in reqs]), torch.cat([r.seeds for r in reqs]),
                                        _merge_masks(reqs, self.scorer.widths), chunk)
        parts = list(deltas.split(sizes))
        compared = [i for i, r in enumerate(reqs) if r.against is not None]
        if compared:  # every prompt's MS-SSIM of this forward in one call: its fixed cost is paid once
            sims = ms_ssim_groups(torch.cat([reqs[i].against for i in compared]),
                                  torch.cat([parts[i] for i in compared]),
                                  [k for i in compared for k in reqs[i].sizes], self.scorer.settings)
            for i, sim in zip(compared, sims.split([sizes[i] for i in compared])):
                parts[i] = sim
        start = 0
        for r, part, n in zip(reqs, parts, sizes):
            r.out = part
            r.forwards = (start + n - 1) // chunk - start // chunk + 1 if n else 0
            start += n


def _merge_masks(reqs: Sequence[_Request], widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """One [samples, width] mask per layer that any request masks; requests without it get ones (unmasked)."""
    layers = sorted({name for r in reqs for name in (r.masks or {})})
    out = {}
    for name in layers:
        rows = []
        for r in reqs:
            m = (r.masks or {}).get(name)
            n = len(r.seeds)
            rows.append(torch.ones(n, widths[name]) if m is None else m.expand(n, -1) if m.shape[0] == 1 else m)
        out[name] = torch.cat(rows)
    return out


class PooledScorer(NoiseDiffScorer):
    """The scorer one worker sees: same model, latents and settings, its own counter, forwards through the pool."""

    def __init__(self, base: NoiseDiffScorer, pool: ForwardPool, worker: int):
        self.__dict__.update(base.__dict__)
        self.counter = ForwardCounter()
        self.pool, self.worker = pool, worker
        self.sharing = pool.active

    def noise_diff(self, embeds, seeds, masks=None, max_batch=None, solo=False):
        return self._submit(embeds, seeds, masks, solo=solo)

    def compare(self, embeds, seeds, masks, against, sizes, max_batch=None):
        return self._submit(embeds, seeds, masks, against=against, sizes=sizes)

    def _submit(self, embeds, seeds, masks, **request) -> torch.Tensor:
        out, forwards = self.pool.submit(self.worker, embeds, seeds, masks, **request)
        self.counter.unet_forwards += forwards
        self.counter.sample_forwards += len(seeds)
        return out


def pool_workers(scorer: NoiseDiffScorer, n_jobs: int, batch_size: int | None = None,
                 workers: int | None = None) -> int:
    """Prompts searched at a time: `workers`, or as many as fill a forward (`batching.prompt_workers`)."""
    return max(1, min(workers or prompt_workers(scorer, n_jobs, batch_size), n_jobs))


def run_pooled(scorer: NoiseDiffScorer, jobs: Sequence[Callable[[NoiseDiffScorer], T]],
               batch_size: int | None = None, workers: int | None = None,
               on_done: Callable[[int, T], None] | None = None) -> list[T]:
    """Run `jobs` (each `job(scorer) -> result`, one prompt's localization) side by side, sharing UNet forwards of
    up to `batch_size` samples; results in job order. `workers` (prompts at a time) defaults to as many as fill a
    forward with all their seeds (`batching.prompt_workers`); 1 runs the jobs one after another on `scorer` itself.

    `on_done(index, result)` is called as each job finishes, one call at a time (e.g. to save it for resume). The
    first error stops the taking of new jobs and is raised once the running ones end. Ctrl-C or SIGTERM (a
    KeyboardInterrupt in the main thread) cancels the pool: each worker stops at its next forward, finished jobs
    have had their `on_done`, and the interrupt is raised once every worker has ended.
    """
    max_batch = batch_size or auto_batch_size(scorer)  # resolved here, so no worker probes memory through the pool
    workers = pool_workers(scorer, len(jobs), max_batch, workers)
    if workers == 1:  # nothing to share: the scorer itself, no threads
        results = []
        for i, job in enumerate(jobs):
            results.append(job(scorer))
            if on_done is not None:
                on_done(i, results[-1])
        return results
    pool = ForwardPool(scorer, workers, max_batch)
    results: list = [None] * len(jobs)
    lock = threading.Lock()
    state = {"next": 0, "error": None}

    def work(worker: int) -> None:
        mine = PooledScorer(scorer, pool, worker)
        try:
            while True:
                with lock:
                    i = state["next"]
                    if i >= len(jobs) or state["error"] is not None or pool.cancelled:
                        return
                    state["next"] += 1
                result = jobs[i](mine)
                with lock:
                    results[i] = result
                    if on_done is not None:
                        on_done(i, result)
        except BaseException as err:
            with lock:
                state["error"] = state["error"] or err
        finally:
            pool.leave()

    threads = [threading.Thread(target=work, args=(w,), name=f"harden-localize-{w}") for w in range(workers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():  # wakes to run signal handlers, also when a signal landed on a worker thread
                t.join(0.2)
    except BaseException:  # an interrupt in the main thread: stop the workers cooperatively, then raise it
        pool.cancel()
        for t in threads:
            t.join()
        raise
    if state["error"] is not None:
        raise state["error"]
    return results

"""One synthetic localization problem for the equivalence tests (localization and exact mode): seven layers of SD-like
relative widths, random activations with a few out-of-distribution neurons, flat statistics."""

import torch

from harden.nemo.stats import NeuronStats

WIDTHS = [16, 16, 24, 24, 32, 32, 32]
NAMES = [f"layer{i}" for i in range(len(WIDTHS))]


def search_problem(seed):
    """(per-layer activations, per-layer means, per-layer stds, the same statistics as NeuronStats)."""
    g = torch.Generator().manual_seed(seed)
    acts = [torch.rand(w, generator=g) for w in WIDTHS]
    for a in acts[:3]:
        a[int(torch.randint(len(a), (1,), generator=g))] += 3.0  # a few OOD neurons
    mean = [torch.full((w,), 0.5) for w in WIDTHS]
    std = [torch.full((w,), 0.3) for w in WIDTHS]
    return acts, mean, std, NeuronStats(dict(zip(NAMES, mean)), dict(zip(NAMES, std)), 100)

"""A direct port of the official NeMo search loop (R:3_detect_memorized_neurons.py + neuron_refinement), kept
deliberately naive: list-of-lists per layer index, a `while` loop, deep copies. The tests check harden's
implementation against it on synthetic scorers."""

import copy

import numpy as np
import torch


def official_localize(score, acts, mean, std, theta0=5.0, step=0.25, min_theta=1.0, k0=0, tau_init=0.428,
                      tau_ref=0.428, no_theta=False, no_top_k=False):
    """score(list of per-layer lists) -> per-seed tensor. Returns (initial lists, refined lists, refined score)."""
    ssim, theta, k = 1.0, theta0, k0
    if no_top_k:
        k = 0
    if no_theta:
        theta = np.inf
    threshold = tau_ref
    while ssim > tau_init:
        blocked = []
        for a, m, s in zip(acts, mean, std):
            diff = (a - m).abs() / s
            idx = (diff > theta).nonzero().flatten().tolist()
            idx += [e.item() for e in a.abs().topk(k=min(k, len(m))).indices]
            blocked.append(idx)
        ssim = score(blocked).max()
        if ssim > tau_init:
            if theta > min_theta and not no_theta:
                theta = theta - step
            if not no_top_k:
                k += 1
        if theta == 1 or k >= 1280:
            threshold = ssim
            break
    initial = copy.deepcopy(blocked)
    blocking = copy.deepcopy(blocked)
    for layer_idx, layer_list in reversed(list(enumerate(blocking))):
        if len(layer_list) == 0:
            continue
        curr = copy.deepcopy(blocking)
        curr[layer_idx] = []
        if score(curr).max() < threshold:
            blocking[layer_idx] = []
    for layer_idx, layer_list in reversed(list(enumerate(blocking))):
        if len(layer_list) == 0:
            continue
        for neuron in copy.deepcopy(blocking)[layer_idx]:
            curr = copy.deepcopy(blocking)
            curr[layer_idx].remove(neuron)
            if score(curr).max() < threshold:
                blocking[layer_idx].remove(neuron)
    return initial, blocking, float(score(blocking).max())


def synthetic_scorer(widths, seed, n_important=4, n_seeds=3):
    """score = per-seed base * exp(-sum of weights of the blocked neurons): a deterministic function of the set."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.zeros(w) for w in widths]
    for _ in range(n_important):
        layer = int(torch.randint(len(widths), (1,), generator=g))
        weights[layer][int(torch.randint(widths[layer], (1,), generator=g))] = float(torch.rand(1, generator=g)) * 1.5
    for w in weights:  # weak background effects
        w += torch.rand(len(w), generator=g) * 0.02
    base = 0.7 + 0.25 * torch.rand(n_seeds, generator=g)
    calls = []

    def score(lists):
        calls.append(1)
        total = sum(float(weights[l][sorted(set(idx))].sum()) for l, idx in enumerate(lists) if idx)
        return base * float(np.exp(-total))

    return score, calls

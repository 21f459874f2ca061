"""MS-SSIM as the official NeMo code computed it (torchmetrics 1.3.2, cropped last scale) next to the standard form
(torchmetrics >= 1.4.2), derived here by hand from the 1.3.2 formula, not by installing 1.3.2.

torchmetrics 1.3.2 `_ssim_update(..., return_contrast_sensitivity=True)` crops *both* maps by the Gaussian
padding before averaging (only windows that lie fully inside the image count), and `_multiscale_ssim_update` keeps
the contrast term of every scale but the last, where it takes the SSIM term. 1.4.2 (PR #2721) averages the last
scale's SSIM map uncropped. Everything else (11x11 Gaussian window, sigma 1.5, reflect padding, data range =
max - min over the whole batch at each scale, K1 = 0.01, K2 = 0.03, ReLU, 2x2 average pooling) is the same.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from harden.errors import BadInputError
from harden.nemo.score import ScoreSettings, ms_ssim, ms_ssim_groups, normalize, pairwise_max
from harden.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
OFFICIAL = ScoreSettings(ms_ssim="official_1_3_2")  # kernel 11, betas (0.33, 0.33, 0.33): NeMo's settings
STANDARD = ScoreSettings()
# hand_ms_ssim(*pairs()) in float64, frozen: both implementations must keep giving it
FROZEN = (0.32570253764, 0.30913389154)


def pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two pairs of min-max normalized [4, 48, 48] 'deltas' (48 = the smallest side 3 cropped scales allow: 12 > 10
    at the coarsest), smooth enough to be partly similar: what the score compares."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.randn(2, 4, 52, 52, generator=g, dtype=torch.float64), 5, 1)
    a = normalize(base)
    b = normalize(base + 0.8 * torch.randn(2, 4, 48, 48, generator=g, dtype=torch.float64))
    return a, b


def hand_ms_ssim(a: np.ndarray, b: np.ndarray, betas=(0.33, 0.33, 0.33), sigma=1.5, pad=5, k1=0.01,
                 k2=0.03) -> np.ndarray:
    """torchmetrics 1.3.2's MS-SSIM, written out in numpy from its formula, per pair [N]."""
    x = np.arange(-pad, pad + 1, dtype=np.float64)
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    window = np.outer(g, g)

    def filt(img):  # reflect pad, then each output pixel = window-weighted sum of its 11x11 neighbourhood
        padded = np.pad(img, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
        return np.einsum("nchwij,ij->nchw", sliding_window_view(padded, window.shape, axis=(2, 3)), window)

    def cropped_mean(m):
        return m[..., pad:-pad, pad:-pad].reshape(len(m), -1).mean(-1)

    terms = []
    for scale in range(len(betas)):
        data_range = max(a.max() - a.min(), b.max() - b.min())  # the whole batch, at each scale
        c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
        mu_a, mu_b = filt(a), filt(b)
        var_a = np.maximum(filt(a * a) - mu_a ** 2, 0)
        var_b = np.maximum(filt(b * b) - mu_b ** 2, 0)
        cov = filt(a * b) - mu_a * mu_b
        cs = (2 * cov + c2) / (var_a + var_b + c2)
        if scale < len(betas) - 1:
            terms.append(np.maximum(cropped_mean(cs), 0))
            a = a.reshape(*a.shape[:2], a.shape[2] // 2, 2, a.shape[3] // 2, 2).mean((3, 5))
            b = b.reshape(*b.shape[:2], b.shape[2] // 2, 2, b.shape[3] // 2, 2).mean((3, 5))
        else:
            ssim = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
            terms.append(np.maximum(cropped_mean(ssim), 0))  # 1.3.2: the last scale's SSIM map is cropped too
    return np.prod([t ** beta for t, beta in zip(terms, betas)], axis=0)


def test_official_form_equals_the_hand_derivation_and_the_frozen_value():
    a, b = pairs()
    hand = hand_ms_ssim(a.numpy(), b.numpy())
    assert np.allclose(hand, FROZEN, atol=1e-9), hand.tolist()
    ours = ms_ssim(a.float(), b.float(), OFFICIAL)
    assert torch.allclose(ours.double(), torch.tensor(FROZEN, dtype=torch.float64), atol=1e-5), ours.tolist()


def test_the_two_forms_differ_and_standard_is_the_installed_torchmetrics():
    from torchmetrics.functional import multiscale_structural_similarity_index_measure

    a, b = pairs()
    standard = ms_ssim(a.float(), b.float(), STANDARD)
    official = ms_ssim(a.float(), b.float(), OFFICIAL)
    assert (standard - official).abs().min() > 1e-3  # the crop changes the score: the forms are not the same
    expected = multiscale_structural_similarity_index_measure(a.float(), b.float(), reduction="none", kernel_size=11,
                                                              betas=(0.33, 0.33, 0.33))
    assert torch.allclose(standard, expected, atol=1e-6)
    # our one-pass grouped form agrees with the per-group calls in the official form too
    groups = ms_ssim_groups(torch.cat([a, a]).float(), torch.cat([b, b.flip(0)]).float(), [2, 2], OFFICIAL)
    assert torch.allclose(groups[:2], official, atol=1e-5)
    assert torch.allclose(groups[2:], ms_ssim(a.float(), b.flip(0).float(), OFFICIAL), atol=1e-5)


def test_torchmetrics_pin_is_the_uncropped_release():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [p for p in pins if p.startswith("torchmetrics")] == ["torchmetrics>=1.4.2"]
    installed = tuple(int(x) for x in importlib.metadata.version("torchmetrics").split(".")[:3])
    assert installed >= (1, 4, 2)


def test_official_form_refuses_latents_whose_cropped_last_scale_is_empty():
    """At 16x16 with 2 scales torchmetrics 1.3.2 averaged an empty map (NaN); harden refuses with a fix."""
    small = ScoreSettings(kernel_size=7, betas=(0.5, 0.5), ms_ssim="official_1_3_2")
    x = torch.rand(3, 4, 16, 16)
    with pytest.raises(BadInputError, match="official_1_3_2 form"):
        pairwise_max(x, small)
    assert torch.isfinite(pairwise_max(x, ScoreSettings(kernel_size=7, betas=(0.5, 0.5)))).all()  # standard: fine
    with pytest.raises(BadInputError, match="unknown MS-SSIM form"):
        ms_ssim(x, x, ScoreSettings(ms_ssim="cropped"))


def test_sd_v1_4_recipe_scores_tau_0428_with_the_form_it_was_measured_with():
    recipe = load_recipe(ROOT / "recipes" / "sd-v1-4.yaml").recipe
    assert recipe.detection.ms_ssim == "official_1_3_2" and recipe.detection.threshold == 0.428
    assert recipe.localization.tau_initial == recipe.localization.tau_refine == 0.428
    assert load_recipe(ROOT / "recipes" / "demo.yaml").recipe.detection.ms_ssim == "standard"

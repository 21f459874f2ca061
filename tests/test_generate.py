"""Verification generates all prompts x seeds in shared pipeline calls; an image must not depend on its batch."""

import numpy as np

from harden.generation import generate, images_per_call


def test_shared_pipeline_calls_give_each_seeds_own_image(tiny):
    prompts, seeds = ["a red circle", "a blue square", "a green star"], [0, 1]
    calls = []
    real = tiny.__class__.__call__

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["prompt"]))
        return real(self, *args, **kwargs)

    tiny.__class__.__call__ = counting
    done = []
    try:
        shared = generate(tiny, prompts, seeds, steps=2, guidance=3.0, batch_images=4, advance=done.append)
        alone = [generate(tiny, [p], [s], steps=2, guidance=3.0)[0][0] for p in prompts for s in seeds]
    finally:
        tiny.__class__.__call__ = real
    assert calls[:2] == [4, 2] and sum(done) == 3  # 6 images in calls of 4 and 2; every prompt reported once
    flat = [img for per_prompt in shared for img in per_prompt]
    assert len(shared) == 3 and all(len(p) == 2 for p in shared)
    for a, b in zip(flat, alone):
        assert a.shape == b.shape and a.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batched float math: at most 1 level of rounding
    assert np.abs(flat[0].astype(int) - flat[1].astype(int)).mean() > 1  # seeds differ
    assert np.abs(flat[0].astype(int) - flat[2].astype(int)).mean() > 0  # prompts differ


def test_images_per_call_follows_the_latent_size(tiny):
    assert images_per_call(tiny, None, None) == 40960 // (2 * 32 * 32)
    scale = tiny.vae_scale_factor
    assert images_per_call(tiny, 64 * scale, 64 * scale) == 5  # SD's 512x512 on a CPU: 5 images (10 UNet samples)

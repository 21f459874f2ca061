import pytest
import torch

from harden.hooks import channel_masks
from harden.neurons import NeuronSet
from harden.targets import resolve_targets
from harden.tiny import tiny_unet


def test_neuron_set_json_union_counts():
    a = NeuronSet({"x": [3, 1, 3], "y": [], "z": (0,)})
    assert a.to_json() == {"x": [1, 3], "z": [0]} and len(a) == 3
    assert NeuronSet.from_json(a.to_json()) == a
    b = NeuronSet({"x": (2, 3), "w": (7,)})
    assert a.union(b).counts() == {"w": 1, "x": 3, "z": 1}
    assert not NeuronSet({"x": []})
    with pytest.raises(ValueError):
        NeuronSet({"x": (-1,)})
    with pytest.raises(ValueError):
        NeuronSet.from_json({"x": 3})
    masks = a.masks({"x": 4, "z": 2, "q": 5}, factor=0.5)
    assert torch.equal(masks["x"], torch.tensor([[1.0, 0.5, 1.0, 0.5]])) and set(masks) == {"x", "z"}


def test_hooks_are_removed_on_error_and_must_fire():
    unet = tiny_unet(sample_size=32)
    targets = resolve_targets(unet)
    t = targets[0]
    with pytest.raises(RuntimeError, match="boom"):
        with channel_masks(targets, {t.name: torch.ones(1, t.width)}):
            raise RuntimeError("boom")
    assert not t.to_v._forward_hooks
    with pytest.raises(RuntimeError, match="never fired"):
        with channel_masks(targets, {t.name: torch.ones(1, t.width)}):
            pass  # no forward ran
    assert not t.to_v._forward_hooks
    with pytest.raises(KeyError):
        with channel_masks(targets, {"nope": torch.ones(1, 3)}):
            pass


def test_per_sample_masks_apply_per_sample():
    unet = tiny_unet(sample_size=32)
    targets = resolve_targets(unet)
    t = targets[0]
    ctx = torch.randn(1, 77, 32).expand(2, -1, -1)
    mask = torch.ones(2, t.width)
    mask[1, :4] = 0
    with torch.no_grad():
        x = torch.randn(1, 4, 32, 32).expand(2, -1, -1, -1)
        with channel_masks(targets, {t.name: mask}):
            out = unet(x, 500, encoder_hidden_states=ctx).sample
        plain = unet(x[:1], 500, encoder_hidden_states=ctx[:1]).sample
    assert torch.allclose(out[0], plain[0], atol=1e-5) and not torch.allclose(out[1], plain[0], atol=1e-4)

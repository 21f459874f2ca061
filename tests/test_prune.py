import json

import pytest
import torch

from harden.compact_unet import CompactUNet2DConditionModel
from harden.errors import BadInputError
from harden.hooks import channel_masks
from harden.neurons import NeuronSet
from harden.prune import prune_compact, prune_dense
from harden.targets import resolve_targets
from harden.tiny import tiny_unet


def _random_uneven(unet, seed):
    """Random removals in most cross-attention layers, uneven across heads, plus one whole head removed."""
    g = torch.Generator().manual_seed(seed)
    targets = resolve_targets(unet, "all")
    layers = {}
    for i, t in enumerate(targets):
        if i % 3 == 2:
            continue
        count = int(torch.randint(1, t.width // 2, (1,), generator=g))
        layers[t.name] = torch.randperm(t.width, generator=g)[:count].tolist()
    whole_head = targets[2]
    layers[whole_head.name] = list(range(whole_head.head_dim, 2 * whole_head.head_dim))  # head 1 entirely
    return NeuronSet(layers), targets


def _run(unet, x, ctx, t=500):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_equals_dense_equals_compact(seed):
    unet = tiny_unet(sample_size=32, seed=seed)
    neurons, targets = _random_uneven(unet, seed)
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    with channel_masks(targets, neurons.masks({t.name: t.width for t in targets})):
        masked = _run(unet, x, ctx)
    dense, compact = _run(prune_dense(unet, neurons), x, ctx), _run(prune_compact(unet, neurons), x, ctx)
    base = _run(unet, x, ctx)
    assert (masked - dense).abs().max() <= 1e-5
    assert (masked - compact).abs().max() <= 1e-5
    assert (masked - base).abs().max() > 1e-3  # the pruning really changes the function


def test_attention_mask_path_matches():
    unet = tiny_unet(sample_size=32)
    neurons, targets = _random_uneven(unet, 5)
    x, ctx = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 32)
    mask = torch.ones(2, 77)
    mask[:, 40:] = 0
    with torch.no_grad():
        dense = prune_dense(unet, neurons)(x, 500, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        compact = prune_compact(unet, neurons)(x, 500, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
    assert (dense - compact).abs().max() <= 1e-5


def test_bias_is_handled_by_masks_and_dense_and_refused_by_compact():
    unet = tiny_unet(sample_size=32, bias=True)
    targets = resolve_targets(unet)
    neurons = NeuronSet({targets[0].name: (1, 3), targets[6].name: (0,)})
    x, ctx = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32)
    with channel_masks(targets, neurons.masks({t.name: t.width for t in targets})):
        masked = _run(unet, x, ctx)
    dense_model = prune_dense(unet, neurons)
    assert (masked - _run(dense_model, x, ctx)).abs().max() <= 1e-5
    assert torch.all(dense_model.get_submodule(targets[0].name).to_v.bias[[1, 3]] == 0)
    with pytest.raises(BadInputError, match="config does not build"):
        prune_compact(unet, neurons)


def test_untouched_tensors_are_bit_identical():
    unet = tiny_unet(sample_size=32)
    neurons, _ = _random_uneven(unet, 3)
    base = unet.state_dict()
    for model in (prune_dense(unet, neurons), prune_compact(unet, neurons)):
        state = model.state_dict()
        assert set(state) == set(base)
        for key, value in base.items():
            layer = key.rsplit(".to_", 1)[0]
            if layer in neurons.layers and (".to_v." in key or ".to_out.0.weight" in key):
                continue
            assert torch.equal(state[key], value), key
    dense_state = prune_dense(unet, neurons).state_dict()
    compact_state = prune_compact(unet, neurons).state_dict()
    for name, idx in neurons.layers.items():
        kept = [c for c in range(base[f"{name}.to_v.weight"].shape[0]) if c not in idx]
        assert torch.equal(compact_state[f"{name}.to_v.weight"], base[f"{name}.to_v.weight"][kept])
        assert torch.equal(compact_state[f"{name}.to_out.0.weight"], base[f"{name}.to_out.0.weight"][:, kept])
        assert torch.equal(compact_state[f"{name}.to_out.0.bias"], base[f"{name}.to_out.0.bias"])
        assert torch.all(dense_state[f"{name}.to_v.weight"][list(idx)] == 0)
        assert torch.equal(dense_state[f"{name}.to_v.weight"][kept], base[f"{name}.to_v.weight"][kept])


def test_compact_save_load_is_bit_exact(tmp_path):
    unet = tiny_unet(sample_size=32)
    neurons, _ = _random_uneven(unet, 4)
    compact = prune_compact(unet, neurons)
    compact.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "CompactUNet2DConditionModel"
    name = next(iter(neurons.layers))
    assert config["kept_value_channels"][name] == [c for c in range(len(config["kept_value_channels"][name])
                                                                     + len(neurons.layers[name]))
                                                   if c not in neurons.layers[name]]
    assert not list(tmp_path.glob("*.bin"))
    for low_mem in (True, False):
        loaded = CompactUNet2DConditionModel.from_pretrained(tmp_path, low_cpu_mem_usage=low_mem)
        for key, value in compact.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        x, ctx = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32)
        assert torch.equal(_run(loaded, x, ctx), _run(compact, x, ctx))


def test_compact_keeps_its_processors_when_others_are_set():
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_unet(sample_size=32)
    neurons, _ = _random_uneven(unet, 6)
    compact = prune_compact(unet, neurons)
    x, ctx = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32)
    before = _run(compact, x, ctx)
    compact.set_attn_processor(AttnProcessor())
    assert (before - _run(compact, x, ctx)).abs().max() <= 1e-5
    with pytest.raises(NotImplementedError):
        compact.fuse_qkv_projections()


def test_bad_neuron_sets_are_refused_before_editing():
    unet = tiny_unet(sample_size=32)
    name = resolve_targets(unet)[0].name
    with pytest.raises(BadInputError, match="out of range"):
        prune_dense(unet, NeuronSet({name: (16,)}))
    with pytest.raises(BadInputError, match="not a target layer"):
        prune_compact(unet, NeuronSet({"conv_in": (0,)}))
    with pytest.raises(BadInputError, match="already compact"):
        prune_compact(prune_compact(unet, NeuronSet({name: (0,)})), NeuronSet({name: (1,)}))

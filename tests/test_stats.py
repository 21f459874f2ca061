import torch

from harden.nemo.stats import NeuronStats, compute_stats, encode_prompts, iter_embeddings, value_activations
from harden.targets import resolve_targets
from harden.tiny import byte_tokenizer, tiny_text_encoder, tiny_unet

PROMPTS = [f"prompt number {i} about {w}" for i, w in enumerate(["cats", "dogs", "a boat", "the sea", "mountains",
                                                                   "a red car", "bread", "x" * 120, ""])]


def test_statistics_match_a_direct_computation():
    tok = byte_tokenizer()
    enc = tiny_text_encoder(tok)
    unet = tiny_unet(sample_size=32, bias=True)  # a bias must be part of the activation
    targets = resolve_targets(unet)
    stats = compute_stats(iter_embeddings(tok, enc, PROMPTS, batch_size=4), targets)
    assert stats.count == len(PROMPTS)
    for t in targets:
        per_prompt = []
        for p in PROMPTS:  # one prompt at a time, through the module itself
            ids = tok([p], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            assert ids.shape == (1, 77)
            with torch.no_grad():
                per_prompt.append(t.to_v(enc(ids)[0]).abs().mean(dim=1)[0])
        direct = torch.stack(per_prompt)
        assert torch.allclose(stats.mean[t.name], direct.mean(0), atol=1e-5, rtol=1e-5)
        assert torch.allclose(stats.std[t.name], direct.std(0), atol=1e-5, rtol=1e-4)


def test_padding_positions_count():
    tok = byte_tokenizer()
    enc = tiny_text_encoder(tok)
    targets = resolve_targets(tiny_unet(sample_size=32))
    embeds = encode_prompts(tok, enc, ["short"])
    a = value_activations(embeds, targets)[targets[0].name]
    full = (embeds @ targets[0].to_v.weight.T).abs().sum(1) / 77
    assert torch.allclose(a, full, atol=1e-6)


def test_batched_encoding_equals_single():
    tok = byte_tokenizer()
    enc = tiny_text_encoder(tok)
    together = encode_prompts(tok, enc, PROMPTS)
    one_by_one = torch.cat([encode_prompts(tok, enc, [p]) for p in PROMPTS])
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_stats_round_trip():
    stats = NeuronStats({"a.b": torch.rand(4)}, {"a.b": torch.rand(4)}, 7)
    back = NeuronStats.from_tensors(stats.to_tensors())
    assert back.count == 7 and torch.equal(back.mean["a.b"], stats.mean["a.b"])
    assert torch.equal(back.std["a.b"], stats.std["a.b"])

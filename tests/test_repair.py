"""Adversarial repair on tiny models (harden.repair): the pruned structure holds, training selects its modules, a
resumed repair equals an uninterrupted one, retain keeps ordinary outputs, the adversarial loss defeats the attack
on a planted memorized image, and bad settings are refused."""

import copy

import pytest
import yaml
import torch
from diffusers import DDIMScheduler

from harden.audit.attack import diffusion_targets, embedding_attack, random_starts
from harden.errors import BadInputError
from harden.neurons import NeuronSet
from harden.prune import prune_compact, prune_dense
from harden.recipe import RepairSection, parse_recipe
from harden.repair.checkpointing import load_checkpoint
from harden.repair.data import AdvPrompt, Prepared, distillation_pool
from harden.repair.inputs import check_base
from harden.repair.structure import Structure, check_repairable
from harden.repair.trainer import Repairer
from harden.tiny import tiny_unet

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
LAYER2 = "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
NEURONS = NeuronSet({LAYER: (1, 3, 5), LAYER2: (0, 7)})
TOKENS, DIM = 8, 32  # short "prompts" keep the tiny UNet's cross-attention cheap


def scheduler():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def small_unet(seed: int = 0, bias: bool = False):
    return tiny_unet(cross_attention_dim=DIM, sample_size=8, layers_per_block=1, seed=seed, bias=bias)


def data(teacher, n_prompts: int = 2, seed: int = 0) -> Prepared:
    """Random stand-ins for what the stage prepares: captions (0 = empty), ordinary latents, memorized/surrogate
    latents per prompt, and the distillation pool from `teacher`."""
    g = torch.Generator().manual_seed(seed)
    captions = torch.randn(6, TOKENS, DIM, generator=g)
    ordinary = 0.5 * torch.randn(10, 4, 8, 8, generator=g)
    owner = torch.randint(1, 6, (10,), generator=g)
    pool = distillation_pool(teacher, scheduler(), ordinary, owner, captions, empty_fraction=0.2, pool=64,
                             generator=g)
    prompts = [AdvPrompt(k, "training", torch.randn(4, 8, 8, generator=g), ordinary[k],
                         torch.randn(2, TOKENS, DIM, generator=g), 0, 0.0, "prompt") for k in range(n_prompts)]
    return Prepared(prompts, pool, captions[1:], captions[:1])


def settings(**kw) -> RepairSection:
    base = dict(enabled=True, steps=6, lr=1e-3, batch=8, adv_batch=8, attack_steps=2, refresh_every=2,
                refresh_steps=2, restart_every=2, attack_batch=2, restarts=1, replay=2, probe_every=0,
                checkpoint_every=2)
    return RepairSection(**{**base, **kw})


def run_repair(unet, prepared, s, folder, seed=0, neurons=NEURONS, train="all"):
    trainer = Repairer(unet, scheduler(), Structure.of(unet, neurons, train), prepared, s, seed)
    return trainer, trainer.run(folder)


def test_dense_zero_rows_stay_zero_and_compact_shapes_hold(tmp_path):
    """Weight decay and large steps cannot move a pruned row: gradients are masked, rows re-zeroed each step."""
    base = small_unet(bias=True)
    dense = prune_dense(base, NEURONS)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    _, result = run_repair(dense, data(base), settings(optimizer="adamw", weight_decay=0.5, lr=5e-3), tmp_path / "d")
    assert result.steps == 6
    for name, idx in NEURONS.layers.items():
        to_v = dense.get_submodule(name).to_v
        assert torch.count_nonzero(to_v.weight[list(idx)]) == 0 and torch.count_nonzero(to_v.bias[list(idx)]) == 0
        kept = [i for i in range(to_v.out_features) if i not in idx]
        assert not torch.equal(to_v.weight[kept], before[f"{name}.to_v.weight"][kept])  # the rest did train
    assert Structure.of(dense, NEURONS).violations(dense) == []


def test_compact_shapes_hold_and_the_compact_export_of_a_repaired_dense_unet_is_the_same_function(tmp_path):
    base = small_unet()
    compact = prune_compact(base, NEURONS)
    shapes = {k: v.shape for k, v in compact.state_dict().items()}
    run_repair(compact, data(base), settings(lr=5e-3), tmp_path / "c")
    assert {k: v.shape for k, v in compact.state_dict().items()} == shapes
    dense = prune_dense(base, NEURONS)
    run_repair(dense, data(base), settings(lr=5e-3), tmp_path / "d")
    derived = prune_compact(dense, NEURONS)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, TOKENS, DIM)
    with torch.no_grad():
        assert torch.allclose(derived(x, 500, encoder_hidden_states=ctx).sample,
                              dense(x, 500, encoder_hidden_states=ctx).sample, atol=1e-5)


def test_only_the_chosen_modules_train(tmp_path):
    base = small_unet()
    unet = prune_dense(base, NEURONS)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    trainer, _ = run_repair(unet, data(base), settings(), tmp_path, train=r"attn2\.to_(k|v)")
    after = unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("attn2.to_k" in k or "attn2.to_v" in k for k in changed)
    assert len(trainer.params) == sum("attn2.to_k" in k or "attn2.to_v" in k for k, _ in unet.named_parameters())


def test_resumed_repair_equals_an_uninterrupted_one(tmp_path):
    """Stop after the step-4 checkpoint, build everything anew from it, finish: bit-identical weights and losses."""
    base = small_unet()
    whole = prune_dense(base, NEURONS)
    _, full = run_repair(whole, data(base), settings(steps=7), tmp_path / "whole")
    part = prune_dense(base, NEURONS)
    run_repair(part, data(base), settings(steps=7, checkpoint_every=2), tmp_path / "part")  # runs to the end ...
    found = load_checkpoint(tmp_path / "part")
    assert found[3]["step"] == 6  # ... the last checkpoint before the end is the one a kill would leave
    resumed = prune_dense(base, NEURONS)
    _, result = run_repair(resumed, data(base), settings(steps=7), tmp_path / "part")
    assert result.resumed_from == 6 and result.steps == 7
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert [h["loss"] for h in result.history] == [h["loss"] for h in full.history]


def test_checkpoints_hold_no_pickle_and_every_optimizer_tensor(tmp_path):
    base = small_unet()
    unet = prune_dense(base, NEURONS)
    run_repair(unet, data(base), settings(steps=5), tmp_path)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.iterdir()) == ["optimizer.safetensors", "state.json", "state.safetensors",
                                                        "unet.safetensors"]
    _, opt, state, meta = load_checkpoint(tmp_path)
    n_params = sum(1 for _ in unet.parameters())
    assert len([k for k in opt if k.endswith(".exp_avg_sq")]) == n_params
    assert "gen" in state and "attack_gen" in state and meta["step"] == 4


def test_retain_keeps_ordinary_outputs_close_to_the_base(tmp_path):
    """The same adversarial pressure with and without the retain loss: with it, the UNet's predictions on the
    ordinary (pool) inputs move far less from the base's."""
    base = small_unet()
    prepared = data(base)
    moved = {}
    for weight in (1e-6, 10.0):
        unet = copy.deepcopy(base)
        run_repair(unet, prepared, settings(steps=12, lr=3e-3, retain_weight=weight, adv_weight=1.0),
                   tmp_path / str(weight), neurons=NeuronSet({}))
        with torch.no_grad():
            pool = prepared.retain
            pred = unet(pool.latents, pool.timesteps, encoder_hidden_states=pool.captions[pool.caption_index]).sample
        moved[weight] = float((pred - pool.targets).pow(2).mean())
    assert moved[10.0] < 0.5 * moved[1e-6]


@torch.no_grad()
def _sample(unet, emb, n=4, steps=10):
    sched = scheduler()
    sched.set_timesteps(steps)
    x = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in sched.timesteps:
        x = sched.step(unet(x, t, encoder_hidden_states=emb.expand(n, -1, -1)).sample, t, x).prev_sample
    return x


def _attack_success(unet, z_mem, references) -> float:
    """Best cosine similarity to the planted latent of what the UNet samples from 2 fresh attack embeddings."""
    g = torch.Generator().manual_seed(5)
    emb, _ = embedding_attack(unet, scheduler(), z_mem.expand(2, -1, -1, -1), random_starts(references, 2, g),
                              steps=40, lr=0.1, batch=8, generator=g)
    sims = [torch.nn.functional.cosine_similarity(_sample(unet, e[None]).flatten(1), z_mem.flatten()[None]).max()
            for e in emb]
    return float(max(sims))


@pytest.mark.slow
def test_adversarial_loss_defeats_the_attack_on_a_planted_memorized_image(tmp_path):
    """A tiny UNet trained to draw one latent for one caption: the attack recovers it from random starts; after 40
    repair steps it does not, while repair without the adversarial term (retain only) leaves it recoverable."""
    g = torch.Generator().manual_seed(0)
    unet = small_unet()
    z_mem = torch.randn(4, 8, 8, generator=g)
    captions = torch.randn(9, TOKENS, DIM, generator=g)  # 0: empty, 1: the memorized caption, 2-8: ordinary
    ordinary = 0.5 * torch.randn(28, 4, 8, 8, generator=g)
    owner = torch.arange(2, 9).repeat_interleave(4)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    sched = scheduler()
    for _ in range(200):  # plant: the memorized pair in every batch, beside ordinary pairs
        idx = torch.randint(0, len(ordinary), (8,), generator=g)
        z0 = torch.cat([z_mem.expand(8, -1, -1, -1), ordinary[idx]])
        cond = torch.cat([captions[1:2].expand(8, -1, -1), captions[owner[idx]]])
        t = torch.randint(0, 1000, (16,), generator=g)
        x, target = diffusion_targets(sched, z0, torch.randn(z0.shape, generator=g), t)
        loss = (unet(x, t, encoder_hidden_states=cond).sample - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    references = captions[2:]
    before = _attack_success(unet, z_mem, references)
    assert before > 0.45  # planted: the attack brings it back
    pool = distillation_pool(unet, sched, ordinary, owner, captions, empty_fraction=0.2, pool=128,
                             generator=torch.Generator().manual_seed(3))
    after = {}
    for name, adv in (("adversarial", 1.0), ("retain only", 0.0)):
        repaired = copy.deepcopy(unet)
        prepared = Prepared([AdvPrompt(0, "training", z_mem, ordinary[0], captions[1:2], 0, 0.0, "prompt")], pool,
                            references, captions[:1])
        s = settings(steps=40, adv_weight=adv, batch=16, adv_batch=16, refresh_every=5, refresh_steps=5,
                     attack_steps=10, attack_batch=4, restarts=2, checkpoint_every=1000)
        run_repair(repaired, prepared, s, tmp_path / name, neurons=NeuronSet({}))
        after[name] = _attack_success(repaired, z_mem, references)
    assert after["adversarial"] < before - 0.2
    assert after["retain only"] > after["adversarial"] + 0.2


def test_repair_refuses_a_unet_of_another_class():
    class OtherToolsUNet(type(small_unet())):
        pass

    unet = small_unet()
    unet.__class__ = OtherToolsUNet
    with pytest.raises(BadInputError, match="repair cannot fine-tune a OtherToolsUNet"):
        check_repairable(unet)
    with pytest.raises(BadInputError, match="repair needs a stock diffusers UNet2DConditionModel"):
        check_base(parse_recipe({**RECIPE, "repair": {"enabled": True}}), unet)
    check_base(parse_recipe(RECIPE), unet)  # repair off: not repair's business


RECIPE = {"model": {"id": "model"}, "memorized": {"prompts": ["a"]}, "reference": {"prompts": ["b", "c"]}}


@pytest.mark.parametrize("repair, message", [
    ({"lr": 0.5}, "repair.lr"), ({"lr": 0}, "repair.lr"), ({"adv_weight": -1}, "repair.adv_weight"),
    ({"adv_weight": 1000}, "repair.adv_weight"), ({"steps": 0}, "repair.steps"),
    ({"train": "attn2("}, "repair.train"), ({"retain": {"file": "pairs.jsonl"}}, "image_field"),
    ({"optimizer": "lion"}, "repair.optimizer"), ({"lamda": 1}, "unknown key"),
])
def test_out_of_range_settings_are_refused(repair, message):
    with pytest.raises(BadInputError, match=message):
        parse_recipe({**RECIPE, "repair": {"enabled": True, **repair}})


def test_defaults_keep_todays_pipeline():
    recipe = parse_recipe(RECIPE)
    assert recipe.repair.enabled is False


class _Probe:
    """Stands in for the generation probe: reports `reproduced` images at every call."""

    def __init__(self, reproduced: int):
        self.reproduced, self.calls = reproduced, []

    def __call__(self, unet, embeds):
        self.calls.append(len(embeds))
        return {"best": [0.0] * len(embeds), "reproduced": self.reproduced}


def test_early_stop_once_the_probe_meets_the_target(tmp_path):
    base = small_unet()
    stops = Repairer(prune_dense(base, NEURONS), scheduler(), Structure.of(base, NEURONS), data(base),
                     settings(steps=8, probe_every=4, stop_at=0), 0, _Probe(0))
    result = stops.run(tmp_path / "a")
    assert result.stopped_early and result.steps == 4 and [p["step"] for p in result.probes] == [4]
    goes_on = Repairer(prune_dense(base, NEURONS), scheduler(), Structure.of(base, NEURONS), data(base),
                       settings(steps=8, probe_every=4, stop_at=0), 0, _Probe(1))
    result = goes_on.run(tmp_path / "b")
    assert not result.stopped_early and result.steps == 8 and len(result.probes) == 1  # probes at 4 (not at 8)


def _validate(tmp_path, repair: dict):
    from typer.testing import CliRunner

    from harden.cli import app

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "repair": {"enabled": True, **repair}}))
    return CliRunner().invoke(app, ["validate", str(path)])


def test_retain_pairs_missing_empty_or_without_images_are_refused(tmp_path):
    result = _validate(tmp_path, {"retain": {"file": "pairs.jsonl", "image_field": "image"}})
    assert result.exit_code == 2 and "repair.retain: prompt file" in result.stderr and "does not exist" in result.stderr
    (tmp_path / "pairs.jsonl").write_text("")
    result = _validate(tmp_path, {"retain": {"file": "pairs.jsonl", "image_field": "image"}})
    assert result.exit_code == 2 and "repair.retain: no prompts left" in result.stderr
    (tmp_path / "pairs.jsonl").write_text('{"caption": "a red circle"}\n')
    result = _validate(tmp_path, {"retain": {"file": "pairs.jsonl", "image_field": "image"}})
    assert result.exit_code == 2 and "1 of 1 pairs have no image" in result.stderr
    result = _validate(tmp_path, {"lr": 1.0})
    assert result.exit_code == 2 and "repair.lr" in result.stderr

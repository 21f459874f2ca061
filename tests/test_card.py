"""The model card: Hub metadata, what it must and must not say, inheritance from the base model's card."""

from __future__ import annotations

from huggingface_hub import ModelCard
from hub_server import synthetic_report

from harden.card import write_card

BASE_CARD = """---
license: creativeml-openrail-m
license_link: https://example.org/license
language:
- en
datasets:
- laion/laion2B-en
base_model: some/grandparent
tags:
- stable-diffusion
- text-to-image
widget:
- text: an example prompt
---
# The base model
Its own claims, which no longer hold after pruning.
"""


def card_of(tmp_path, report, base_dir=None):
    folder = tmp_path / "export"
    folder.mkdir()
    write_card(folder, report, base_dir)
    assert [p.name for p in folder.iterdir()] == ["README.md"]  # the card and nothing else
    text = (folder / "README.md").read_text()
    return ModelCard.load(folder / "README.md").data.to_dict(), text


def test_metadata_from_the_report(tmp_path):
    report = synthetic_report("dense")
    report["base_model"]["revision"] = "0123456789abcdef0123456789abcdef01234567"
    meta, text = card_of(tmp_path, report)
    assert meta["base_model"] == "acme/tiny-base"
    assert meta["base_model_revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["tags"] == ["harden", "memorization-mitigation", "pruned"]
    assert meta["license"] == "apache-2.0"  # from the recipe's hub section
    assert f"recipe sha256: `{report['recipe_sha256']}`" in text
    assert "harden version: 0.2.0" in text


def test_base_card_metadata_that_still_holds_is_kept(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text(BASE_CARD)
    report = synthetic_report("dense")
    del report["recipe"]["hub"]["license"]
    meta, text = card_of(tmp_path, report, base)
    assert meta["license"] == "creativeml-openrail-m" and meta["license_link"] == "https://example.org/license"
    assert meta["language"] == ["en"] and meta["datasets"] == ["laion/laion2B-en"]
    assert meta["tags"] == ["stable-diffusion", "text-to-image", "harden", "memorization-mitigation", "pruned"]
    assert meta["base_model"] == "acme/tiny-base"  # ours, not the base's own parent
    assert "widget" not in meta and "no longer hold" not in text


def test_prompts_are_never_published_unless_the_recipe_opts_in(tmp_path):
    report = synthetic_report("compact")
    (tmp_path / "a").mkdir()
    _, text = card_of(tmp_path / "a", report)
    assert "memorized astronaut" not in text and "second memorized caption" not in text
    assert "prompts given to harden as memorized: **2**" in text
    assert f"`{report['memorized_prompts']['sha256']}`" in text
    assert not any(p["sha256"] in text for p in report["prompts"])  # no per-prompt hashes either
    assert "are not published" in text

    (tmp_path / "b").mkdir()
    _, text = card_of(tmp_path / "b", synthetic_report("compact", publish_prompts=True))
    assert "| 0 | the memorized astronaut portrait |" in text and "second memorized caption" in text


def test_tables_gates_and_loading_instructions(tmp_path):
    (tmp_path / "c").mkdir()
    _, text = card_of(tmp_path / "c", synthetic_report("compact"))
    assert "| `down_blocks.0.attentions.0.transformer_blocks.0.attn2` | 6 | 32 | 18.75 % |" in text
    assert "9 value neurons removed in 2 cross-attention layer(s)" in text
    assert "| memorization score (memorized prompts, mean) | 3.5 | 0.2 | 3.4 | lower |" in text
    assert "| memorization removed | memorization score (memorized prompts, mean) | <= 0.428 | 0.2 | passed |" in text
    assert "Outcome: all 2 gates passed." in text
    assert 'DiffusionPipeline.from_pretrained("acme/tiny-hardened", trust_remote_code=True)' in text
    assert 'load_hardened("acme/tiny-hardened")' in text

    (tmp_path / "d").mkdir()
    _, text = card_of(tmp_path / "d", synthetic_report("dense", passed=False))
    assert 'DiffusionPipeline.from_pretrained("acme/tiny-hardened")\n' in text and "trust_remote_code" not in text
    assert "1 of 2 gates FAILED" in text and "| 0.9 | FAILED |" in text


def test_local_base_model_and_missing_keys(tmp_path):
    report = {"passed": True, "base_model": {"id": str(tmp_path / "private" / "my-base"), "revision": None},
              "layout": "dense"}  # a minimal report: every optional key missing
    meta, text = card_of(tmp_path, report)
    assert "base_model" not in meta and "license" not in meta
    assert str(tmp_path) not in text and "a local model (my-base)" in text
    assert "ORG/NAME" in text and "license: not stated" in text

"""harden scan: scores against hand computations on a planted model, metrics, caption handling, the CLI's outputs and
its refusals (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from harden.cli import app
from harden.files import file_hashes
from harden.nemo.stats import encode_prompts
from harden.prompts import load_prompts
from harden.recipe import PromptSource
from harden.scan.captions import build_caption_set
from harden.scan.metrics import auroc, threshold_fpr, threshold_k, tpr_at_fpr
from harden.scan.scores import CaptionScorer, ScanSettings, nemo_ms_ssim
from harden.tiny import MEMORIZED, REFERENCES

sys.path.insert(0, str(Path(__file__).parent))
from planted_model import PLANTS, SECOND  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
ATTN3 = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"  # MemAttn's layer 3 in SD v1's call order


def planted16():
    """tests/planted_model.py's two planted prompts in a tiny pipeline with 16x16 latents (4x cheaper than 32x32;
    NeMo's MS-SSIM then takes 2 scales, as on the shipped memorizer)."""
    from harden.tiny import plant_memorization, tiny_pipeline

    pipe = tiny_pipeline(seed=0, sample_size=16)
    for i, (prompt, layer, neuron) in enumerate(PLANTS):
        plant_memorization(pipe, prompt, REFERENCES, layer=layer, neuron=neuron,
                           conv_out_gain=100.0 if i == 0 else 1.0)
    return pipe


@pytest.fixture(scope="module")
def pipe16():
    return planted16()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, pipe16) -> Path:
    folder = tmp_path_factory.mktemp("scan") / "model"
    pipe16.save_pretrained(folder, safe_serialization=True)
    return folder


def _unet_eps(unet, x, t, ctx):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample.float()


def _hand_entropy(unet, x, t, ctx) -> float:
    """MemAttn's LE by hand: the inputs of layer 3's attn2 captured, softmax(QK^T / sqrt(d)) per head, mean over heads
    and queries, -sum p ln p."""
    attn = unet.get_submodule(ATTN3)
    seen = {}

    def grab(module, args, kwargs):
        seen["h"], seen["e"] = args[0], kwargs["encoder_hidden_states"]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _unet_eps(unet, x, t, ctx)
    finally:
        handle.remove()
    h, e = seen["h"][0], seen["e"][0]
    heads = attn.heads
    q = (h @ attn.to_q.weight.T).view(h.shape[0], heads, -1).transpose(0, 1)  # [heads, queries, d]
    k = (e @ attn.to_k.weight.T).view(e.shape[0], heads, -1).transpose(0, 1)
    with torch.no_grad():
        p = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1).mean(dim=(0, 1))
    return float(-(p * p.log()).sum())


def _hand_nemo(unet, embed, size, kernel, betas) -> float:
    """NeMo by hand: 10 latents from seed 1, eps(x, 961, y) - x, min-max per sample and channel, max pairwise
    torchmetrics MS-SSIM."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    x = torch.randn((10, 4, size, size), generator=torch.Generator().manual_seed(1))
    d = _unet_eps(unet, x, 961, embed.expand(10, -1, -1)) - x
    lo, hi = d.amin(dim=(2, 3), keepdim=True), d.amax(dim=(2, 3), keepdim=True)
    d = (d - lo) / (hi - lo)
    i, j = zip(*[(i, j) for i in range(10) for j in range(i + 1, 10)])  # all 45 pairs in one batch: one data range
    return float(ms_ssim(d[list(i)], d[list(j)], kernel_size=kernel, betas=betas, reduction="none").max())


def test_scores_equal_hand_computations_on_the_planted_model(pipe16):
    pipe = pipe16
    tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    captions = [MEMORIZED, *REFERENCES[:2], SECOND]
    embeds = encode_prompts(tok, te, captions)
    uncond = encode_prompts(tok, te, [""])
    settings = ScanSettings(scores=("wen", "nemo", "attn"), seeds=2, batch_size=3)  # forwards split captions
    scorer = CaptionScorer(unet, pipe.scheduler.config, uncond, settings)
    got = scorer.score(embeds)
    assert list(got) == ["wen", "nemo", "attn"] and scorer.attn_layer_name == ATTN3
    assert scorer.nemo_ms_ssim == {"kernel_size": 7, "betas": [0.5, 0.5], "timestep": 961}

    latents = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))  # the --seed 0 draw
    for i, embed in enumerate(embeds):
        norms, ents = [], []
        for s in range(2):
            x = latents[s:s + 1]
            diff = _unet_eps(unet, x, 981, embed[None]) - _unet_eps(unet, x, 981, uncond)  # first DDIM step
            norms.append(float(diff.flatten().norm()))
            ents.append(_hand_entropy(unet, x, 981, embed[None]))
        assert got["wen"][i].item() == pytest.approx(np.mean(norms), rel=1e-4)
        assert got["attn"][i].item() == pytest.approx(np.mean(ents), rel=1e-4)
        assert got["nemo"][i].item() == pytest.approx(_hand_nemo(unet, embed[None], 16, 7, (0.5, 0.5)), abs=2e-4)
    # the planted prompts stand out on Wen's and NeMo's score
    for name in ("wen", "nemo"):
        assert min(got[name][0], got[name][3]) > max(got[name][1], got[name][2]), name


def test_attention_recording_leaves_the_unet_output_alone(pipe16):
    pipe = pipe16
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, [MEMORIZED, REFERENCES[0]])
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    scores = {}
    for chosen in (("wen",), ("wen", "attn")):
        scores[chosen] = CaptionScorer(pipe.unet, pipe.scheduler.config, uncond, ScanSettings(scores=chosen,
                                       primary="wen")).score(embeds)["wen"]
    assert torch.equal(scores[("wen",)], scores[("wen", "attn")])
    assert pipe.unet.get_submodule(ATTN3).processor.__class__.__name__ != "AttentionEntropy"


def test_wen_later_steps_follow_the_guided_ddim_trajectory(pipe16):
    pipe = pipe16
    from diffusers import DDIMScheduler

    embed = encode_prompts(pipe.tokenizer, pipe.text_encoder, [REFERENCES[1]])
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    got = CaptionScorer(pipe.unet, pipe.scheduler.config, uncond,
                        ScanSettings(scores=("wen",), steps=3, guidance_scale=2.0)).score(embed)["wen"]
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    norms = []
    for t in sched.timesteps[:3]:
        eu, ec = _unet_eps(pipe.unet, x, t, uncond), _unet_eps(pipe.unet, x, t, embed)
        norms.append(float((ec - eu).flatten().norm()))
        x = sched.step(eu + 2.0 * (ec - eu), t, x).prev_sample
    assert [int(t) for t in sched.timesteps[:3]] == [981, 961, 941]
    assert got.item() == pytest.approx(np.mean(norms), rel=1e-4)


def test_nemo_ms_ssim_settings_follow_the_latent_size():
    assert nemo_ms_ssim((64, 64)) == (11, (0.33, 0.33, 0.33))  # the official settings at SD's 64x64
    assert nemo_ms_ssim((16, 16)) == (7, (0.5, 0.5))  # what the shipped memorizer's recipe uses
    assert nemo_ms_ssim((32, 32)) == (7, (0.33, 0.33, 0.33))


def test_metrics_by_hand():
    scores = [0.9, 0.8, 0.8, 0.3, 0.2, 0.1]
    labels = [True, False, True, False, True, False]
    # pairs (pos, neg): 0.9 beats 3; 0.8 beats 0.3, 0.1 and ties 0.8 (1/2); 0.2 beats 0.1 -> (3 + 2.5 + 1) / 9
    assert auroc(scores, labels) == pytest.approx(6.5 / 9)
    # ROC points (FPR, TPR): (0, 1/3) at 0.9, (1/3, 2/3) at 0.8, (2/3, 2/3), (2/3, 1), (1, 1)
    assert tpr_at_fpr(scores, labels, 0.3) == pytest.approx(1 / 3)
    assert tpr_at_fpr(scores, labels, 1 / 3) == pytest.approx(1 / 3)  # strictly below the target FPR
    assert tpr_at_fpr(scores, labels, 0.34) == pytest.approx(2 / 3)
    ref = [float(v) for v in range(1, 101)]  # 1..100
    assert threshold_fpr(ref, 0.01)["value"] == 99.0  # only 100 is above: 1 %
    assert threshold_fpr(ref, 0.05)["value"] == 95.0
    t = threshold_k([1.0, 2.0, 3.0], 2.0)
    assert t["value"] == pytest.approx(2.0 + 2 * 1.0)


def test_caption_set_dedupes_and_merges_references():
    found = build_caption_set(["a", "b", "a", "c", "a"], references=["c", "d"], positives={"b"})
    rows = {r["caption"]: r for r in found.rows}
    assert [r["caption"] for r in found.rows] == ["a", "b", "c", "d"]
    assert (rows["a"]["count"], rows["c"]["reference"], rows["d"]["scan"], rows["d"]["count"]) == (3, True, False, 0)
    assert [rows[c]["label"] for c in "abcd"] == [False, True, False, None]
    assert (found.scanned, found.unique, found.references) == (5, 3, 2)
    assert found.sha256() != build_caption_set(["a", "b", "a", "c"], ["c", "d"], {"b"}).sha256()


def _write_captions(path: Path, long: bool = True) -> list[dict]:
    rows = [{"caption": MEMORIZED, "memorized": True}, {"caption": SECOND, "memorized": True}]
    rows += [{"caption": r, "memorized": False} for r in REFERENCES[:6]]
    rows += [{"caption": REFERENCES[0], "memorized": False}, {"caption": MEMORIZED, "memorized": True}]  # repeats
    if long:
        rows.append({"caption": "a very long caption " * 6, "memorized": False})  # 120 byte tokens > 77
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _scan(model_dir, prompts, out, *extra):
    return runner.invoke(app, ["scan", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                               "--device", "cpu", *extra])


def test_scan_cli_ranks_thresholds_and_evaluates(model_dir, tmp_path):
    prompts = tmp_path / "captions.jsonl"
    _write_captions(prompts)
    out = tmp_path / "scan"
    r = _scan(model_dir, prompts, out, "--label-field", "memorized", "--scores", "wen,nemo,attn", "--shard-size",
              "3", "--k", "0.5")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and [r["rank"] for r in rows] == list(range(1, 10))
    assert all(set(r) == {"rank", "caption", "score", "wen", "nemo", "attn", "flagged", "count", "truncated",
                          "label"} for r in rows)
    assert [r["score"] for r in rows] == sorted((r["wen"] for r in rows), reverse=True)
    assert rows[0]["caption"] == MEMORIZED and rows[0]["count"] == 2 and rows[0]["label"]
    assert sum(r["truncated"] for r in rows) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["captions"] == {"scanned": 11, "unique": 9, "repeated": 2, "duplicate_occurrences": 2,
                                   "truncated": 1, "references": 0, "scored": 9}
    wen = [r["wen"] for r in rows]
    assert summary["threshold"]["value"] == pytest.approx(np.mean(wen) + 0.5 * np.std(wen, ddof=1))
    flagged = [r["caption"] for r in rows if r["score"] > summary["threshold"]["value"]]
    assert [r["caption"] for r in rows if r["flagged"]] == flagged and flagged
    # memorized.jsonl is what a recipe's memorized: section reads
    recipe_view = load_prompts(PromptSource(file=str(out / "memorized.jsonl")), tmp_path, "memorized")
    assert [p.text for p in recipe_view] == flagged
    labels = [r["label"] for r in rows]
    for name in ("wen", "nemo", "attn"):
        assert summary["evaluation"][name]["auroc"] == pytest.approx(auroc([r[name] for r in rows], labels), abs=1e-6)
    assert summary["evaluation"]["wen"]["auroc"] == 1.0  # both planted prompts above every ordinary one
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "shards").glob("*.json"))) == 3  # 9 unique captions in shards of 3
    assert "wen   AUROC 1.000" in r.output


def test_scan_fpr_threshold_on_references(model_dir, tmp_path):
    prompts = tmp_path / "captions.txt"
    prompts.write_text(f"{MEMORIZED}\n{SECOND}\n{REFERENCES[0]}\n")
    reference = tmp_path / "reference.txt"
    reference.write_text("\n".join(REFERENCES) + "\n")
    out = tmp_path / "scan"
    r = _scan(model_dir, prompts, out, "--reference", str(reference), "--fpr", "0.1", "--scores", "wen")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    shards = [row for f in sorted((out / "shards").glob("*.json")) for row in json.loads(f.read_text())["rows"]]
    ref = sorted((row["wen"] for row in shards if row["reference"]), reverse=True)
    assert len(ref) == len(REFERENCES) and summary["captions"]["references"] == len(REFERENCES)
    allowed = int(0.1 * len(ref))
    assert summary["threshold"]["value"] == ref[allowed] and summary["threshold"]["references_above"] <= allowed
    assert len((out / "scores.jsonl").read_text().splitlines()) == 3  # references are not ranked
    assert not (out / "roc.png").exists() and summary["evaluation"] is None


def _refused(r, *words):
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_caption_files_are_refused_and_nothing_is_written(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    for path, words in ((empty, ("no prompts",)), (latin, ("not UTF-8",)), (tmp_path / "missing.txt",
                                                                            ("does not exist",))):
        out = tmp_path / f"out-{path.stem}"
        _refused(_scan(model_dir, path, out), *words)
        assert not out.exists()
    ok = tmp_path / "ok.txt"
    ok.write_text(f"{MEMORIZED}\n")
    _refused(_scan(model_dir, ok, tmp_path / "o1", "--scores", "wen,bogus"), "--scores")
    _refused(_scan(model_dir, ok, tmp_path / "o2", "--fpr", "0.01"), "--fpr needs --reference")
    _refused(_scan(model_dir, ok, tmp_path / "o3", "--label-field", "memorized"), "field")  # a .txt has no fields
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_a_model_without_cross_attention_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from harden.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=0, sample_size=16)
    pipe.unet = UNet2DConditionModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                                     down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                     mid_block_type="UNetMidBlock2D", cross_attention_dim=32, norm_num_groups=8)
    pipe.register_modules(unet=pipe.unet)
    folder = tmp_path / "nocross"
    pipe.save_pretrained(folder, safe_serialization=True)
    prompts = tmp_path / "c.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    _refused(_scan(folder, prompts, out), "cross-attention")
    assert not out.exists()


def test_resume_refuses_another_model_or_caption_file(model_dir, tmp_path):
    prompts = tmp_path / "c.txt"
    prompts.write_text("\n".join(REFERENCES[:4]) + "\n")
    out = tmp_path / "scan"
    assert _scan(model_dir, prompts, out, "--scores", "wen", "--shard-size", "2").exit_code == 0
    before = file_hashes(out)
    _refused(_scan(model_dir, prompts, out, "--scores", "wen", "--shard-size", "2"), "already holds a scan",
             "--resume")
    other = tmp_path / "other.txt"
    other.write_text("\n".join(REFERENCES[:5]) + "\n")
    _refused(_scan(model_dir, other, out, "--scores", "wen", "--shard-size", "2", "--resume"), "other captions")
    _refused(_scan(model_dir, prompts, out, "--scores", "wen", "--shard-size", "2", "--seeds", "2", "--resume"),
             "other settings", "seeds")
    from harden.tiny import tiny_pipeline

    other_model = tmp_path / "other-model"
    tiny_pipeline(seed=1, sample_size=16).save_pretrained(other_model, safe_serialization=True)
    _refused(_scan(other_model, prompts, out, "--scores", "wen", "--shard-size", "2", "--resume"), "another model")
    assert file_hashes(out) == before  # refusals write nothing
    # a finished scan resumed: nothing to score, same bytes; --merge alone gives the same bytes too
    assert _scan(model_dir, prompts, out, "--scores", "wen", "--shard-size", "2", "--resume").exit_code == 0
    assert file_hashes(out) == before
    (out / "scores.jsonl").unlink()
    r = runner.invoke(app, ["scan", "--merge", str(out)])
    assert r.exit_code == 0, r.output
    assert file_hashes(out) == before
    (out / "shards" / "000001.json").unlink()
    _refused(runner.invoke(app, ["scan", "--merge", str(out)]), "1 of 2 shards are missing")


def test_bench_scan_workload_reports_captions_per_second(tmp_path):
    """harden bench --workload scan on the shipped memorizer: forward counts are deterministic, timings are not
    asserted (speed is measured by the bench, never by a test)."""
    r = runner.invoke(app, ["bench", "--workload", "scan", "--prompts", "4", "--batch-size", "20", "--json",
                            str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["workload"] == "scan" and report["captions"] == 4
    forwards = {k: v["unet_forwards"] for k, v in report["scores"].items()}
    # wen: 4 CFG pairs, up to 10 per forward of 20 samples; nemo: 2 captions x 10 seeds per forward
    assert forwards == {"wen": 1, "wen+attn": 1, "nemo": 2}
    assert all(v["captions_per_s"] > 0 for v in report["scores"].values())
    assert "captions/s" in r.output

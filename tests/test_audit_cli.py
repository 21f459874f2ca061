"""`harden audit` end to end on tiny saved pipelines: audit.json and its summary, gates (exit 3), every bad input
refused with exit 2 and nothing written; the audit stage inside `harden run`; `harden bench --workload audit`."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from harden.cli import app
from harden.recipe import AUDIT_GATES

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
SUMMARY_KEYS = {"n", "prompt_reproduced", "paraphrase_reproduced", "attack_reproduced", "control_reproduced",
                "control_n", "metric", "threshold", "inconclusive"}


def _png(path: Path, seed: int, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny pipeline (16x16 images) saved as a folder, with a training image (20x20: resized) and a control."""
    from harden.tiny import tiny_pipeline

    root = tmp_path_factory.mktemp("audit")
    tiny_pipeline(seed=0, sample_size=8).save_pretrained(root / "model", safe_serialization=True)
    _png(root / "cat.png", 1, size=20)
    _png(root / "unseen.png", 2)
    rows = [{"caption": "the memorized cat", "image": "../cat.png", "memorized": True},
            {"caption": "the memorized cup", "image": "../unseen.png", "memorized": True}]
    (root / "model" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # for the bench
    return root


def _recipe(root: Path, name: str = "recipe.yaml", **audit) -> Path:
    data = {"model": {"id": "model", "device": "cpu"},
            "memorized": {"prompts": [{"prompt": "the memorized cat", "image": "cat.png",
                                       "variants": ["a memorized cat"]}, "a prompt without an image"]},
            "reference": {"prompts": ["a red circle", "a blue square", "a green star"]},
            "verify": {"seeds": [0, 1], "steps": 2, "guidance_scale": 2.0},
            "audit": {"enabled": True, "attack_steps": 2, "attack_batch": 2, "restarts": 1, "paraphrases": 1,
                      "control_images": ["unseen.png"], **audit}}
    path = root / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_audit_writes_audit_json_with_the_summary_rows_targets_and_figures(workspace):
    out = workspace / "out"
    result = runner.invoke(app, ["audit", str(_recipe(workspace)), "--model", str(workspace / "model"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "audit.json").read_text())
    summary = data["summary"]
    assert SUMMARY_KEYS <= set(summary) and all(f"{g}" in summary for g in AUDIT_GATES)
    assert (summary["metric"], summary["threshold"], summary["control_n"]) == ("ssim", 0.7, 1)
    # the random tiny model draws nothing consistent for the imageless prompt: reported, not audited against noise
    assert data["targets"][1]["source"] == "none" and "no consistent base image" in data["targets"][1]["note"]
    assert summary["n"] == 1 and summary["not_audited"] == 1
    assert data["targets"][0]["source"] == "training" and data["targets"][0]["note"] == "resized from 20x20 to 16x16"
    conditions = [(r["index"], r["condition"]) for r in data["rows"]]
    assert conditions == [(0, "prompt"), (0, "paraphrase"), (0, "attack"), (0, "control")]
    para = data["rows"][1]
    assert para["tried"][0] == {**para["tried"][0], "kind": "variant", "text": "a memorized cat"}
    assert len(para["tried"]) == 2  # the file's variant plus 1 automatic perturbation
    attack = data["rows"][2]
    assert [s["start"] for s in attack["starts"]] == ["prompt", "noise 1"]
    for row in data["rows"]:
        assert row["reproduced"] == (row["similarity"] >= 0.7)
    assert data["settings"]["attack"] == {"steps": 2, "lr": 0.1, "batch": 2, "restarts": 1, "prompt_start": True,
                                          "optimizer": "adam"}
    assert (out / "figures" / "prompt_000000.png").is_file() and not (out / "figures" / "prompt_000001.png").exists()
    assert "(c) embedding attack" in result.output and "wrote" in result.output


def test_a_failed_gate_exits_3_and_keeps_the_audit(workspace):
    out = workspace / "gated"
    result = runner.invoke(app, ["audit", str(_recipe(workspace)), "--model", str(workspace / "model"),
                                 "--out", str(out), "--gate", "prompt_reproduced_fraction>=1"])
    assert result.exit_code == 3, result.output
    data = json.loads((out / "audit.json").read_text())
    assert data["gates"][0]["name"] == "prompt_reproduced_fraction" and not data["passed"]


def _bad_inputs(root: Path) -> dict:
    (root / "notapipeline").mkdir(exist_ok=True)
    (root / "broken.png").write_bytes(b"not an image")
    existing = root / "existing"
    existing.mkdir(exist_ok=True)
    (existing / "keep.txt").write_text("x")
    model = ["--model", str(root / "model")]
    good = str(_recipe(root, "good.yaml"))
    return {
        "not a pipeline": [good, "--model", str(root / "notapipeline")],
        "missing model folder": [good, "--model", str(root / "nowhere")],
        "threshold out of range in the recipe": [str(_recipe(root, "t.yaml", thresholds={"ssim": 1.5})), *model],
        "threshold out of range on the command line": [good, *model, "--threshold", "0"],
        "unreadable control image": [str(_recipe(root, "c.yaml", control_images=["broken.png"])), *model],
        "missing control listing": [str(_recipe(root, "l.yaml", control_images="nolisting.jsonl")), *model],
        "bad gate": [good, *model, "--gate", "attack_reproduced_fraction<<1"],
        "unknown gate": [good, *model, "--gate", "neurons_total<=1"],
        "output folder exists": [good, *model],
    }


@pytest.mark.parametrize("case", ["not a pipeline", "missing model folder", "threshold out of range in the recipe",
                                  "threshold out of range on the command line", "unreadable control image",
                                  "missing control listing", "bad gate", "unknown gate", "output folder exists"])
def test_bad_input_is_refused_with_exit_2_and_nothing_written(workspace, case):
    args = _bad_inputs(workspace)[case]
    out = workspace / ("existing" if case == "output folder exists" else f"bad-{case.replace(' ', '-')}")
    result = runner.invoke(app, ["audit", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: ")
    if case == "output folder exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()


def test_prompts_without_images_and_no_base_or_a_broken_image_are_refused(workspace):
    data = yaml.safe_load(_recipe(workspace).read_text())
    data["model"]["id"] = "some-org/some-model"  # a Hub id: no local base to make surrogates from
    (workspace / "hub.yaml").write_text(yaml.safe_dump(data))
    out = workspace / "bad-nobase"
    result = runner.invoke(app, ["audit", str(workspace / "hub.yaml"), "--model", str(workspace / "model"),
                                 "--out", str(out)])
    assert result.exit_code == 2 and "surrogate" in result.output and not out.exists()
    (workspace / "garbage.png").write_bytes(b"\x89PNG broken")
    data["model"]["id"] = "model"
    data["memorized"]["prompts"] = [{"prompt": "x", "image": "garbage.png"}]
    (workspace / "garbage.yaml").write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["audit", str(workspace / "garbage.yaml"), "--model", str(workspace / "model"),
                                 "--out", str(out)])
    assert result.exit_code == 2 and "garbage.png" in result.output and not out.exists()
    data["memorized"]["prompts"] = [{"prompt": "x", "image": "absent.png"}]
    (workspace / "absent.yaml").write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["audit", str(workspace / "absent.yaml"), "--model", str(workspace / "model"),
                                 "--out", str(out)])
    assert result.exit_code == 2 and "does not exist" in result.output and not out.exists()


def test_an_audit_gate_without_an_audit_section_is_refused(workspace):
    data = yaml.safe_load(_recipe(workspace).read_text())
    data["audit"]["enabled"] = False
    data["verify"]["gates"] = {"attack_reproduced_fraction": {"max": 0.0}}
    (workspace / "noaudit.yaml").write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["validate", str(workspace / "noaudit.yaml")])
    assert result.exit_code == 2 and "attack_reproduced_fraction" in result.output


def test_bench_audit_workload_times_batched_and_one_at_a_time(workspace, tmp_path):
    result = runner.invoke(app, ["bench", "--workload", "audit", "--model-dir", str(workspace / "model"),
                                 "--attack-steps", "2", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["prompts"] == 2 and report["batched"]["samples_per_forward"] == 16
    assert report["one_at_a_time"]["samples_per_forward"] == 8 and report["speedup"] > 0
    assert report["max_abs_diff"] < 1e-3  # same draws per prompt: the same attack, batched or not
    assert "audit speed-up" in result.output


@pytest.mark.slow
def test_the_audit_stage_runs_inside_harden_run_and_feeds_verify_report_and_card(tmp_path):
    from planted_model import build_planted, write_recipe

    build_planted(tmp_path / "model")
    _png(tmp_path / "unseen.png", 5, size=64)
    recipe = write_recipe(tmp_path, detection={"n_seeds": 4},
                          verify={"gates": {"attack_reproduced_fraction": {"max": 1.0},
                                            "control_reproduced_fraction": {"max": 1.0}}},
                          export={"layout": "compact"},
                          audit={"enabled": True, "attack_steps": 2, "attack_batch": 2, "restarts": 0,
                                 "paraphrases": 0, "control_images": ["unseen.png"]})
    result = runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    audit = json.loads((run / "audit/audit.json").read_text())
    assert set(audit["models"]) == {"base", "hardened", "control"} and audit["primary"] == "hardened"
    assert audit["summary"] == audit["models"]["hardened"]["summary"]
    assert audit["summary"]["n"] + audit["summary"]["not_audited"] == 3
    verification = json.loads((run / "verify/verification.json").read_text())
    for gate in AUDIT_GATES:
        assert verification["metrics"][gate] == audit["summary"][f"{gate}"]
    rows = {r["metric"]: r for r in verification["rows"]}
    shown = rows["memorized images recovered by the embedding attack (audit, share)"]
    assert shown["after"] == audit["models"]["hardened"]["summary"]["attack_reproduced_fraction"]
    assert shown["before"] == audit["models"]["base"]["summary"]["attack_reproduced_fraction"]
    names = [g["name"] for g in verification["gates"]]
    assert "attack_reproduced_fraction" in names and verification["passed"]
    export = run / "export/compact"
    report = json.loads((export / "harden/report.json").read_text())
    assert report["audit"]["models"]["hardened"]["summary"] == audit["summary"]
    assert "the memorized" not in json.dumps(report["audit"])  # no prompt text in the published report
    card = (export / "README.md").read_text()
    assert "## Audit" in card and "model-index" in card and "attack_reproduced_fraction" in card
    s = audit["summary"]
    if s["attack_reproduced"] == s["prompt_reproduced"] == 0 and not s["inconclusive"]:
        assert "images were **removed**" in card  # the attack gate passed and nothing came back
    else:  # the lax gate (max 1.0) passed, but the card must not call the images removed
        assert f"recoverable by an embedding attack for {s['attack_reproduced']} of {s['n']}" in card
        assert "removed**" not in card
    assert not (export / "harden/figures/audit").exists()  # memorized images only with publish_prompts

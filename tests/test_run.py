"""`harden run` end to end on a tiny planted model (offline, CPU): stages, artifacts, export, reload, resume, gates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from planted_model import MEMORIZED, ORDINARY, SECOND, build_planted, write_recipe
from typer.testing import CliRunner

from harden.cli import app
from harden.files import sha256_file
from harden.neurons import NeuronSet
from harden.runner import STAGES
from harden.stages.localize import FAULT_ENV

pytestmark = pytest.mark.slow  # end to end

runner = CliRunner()
FAST = {"n_seeds": 6}  # fewer seeds than NeMo's 10 keep the suite fast; the planted prompts still separate


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    planted = build_planted(root / "model")
    # every test scored on all kept seeds (no early rejection), so forwards and samples can be accounted exactly
    recipe = write_recipe(root, detection={"n_seeds": 6}, localization={"early_reject": False})
    result = runner.invoke(app, ["run", str(recipe), "--out", str(root / "run")])
    assert result.exit_code == 0, result.output
    return root, recipe, planted, result


def _json(path: Path):
    return json.loads(path.read_text())


def test_every_stage_leaves_its_artifact(workspace):
    root, _, planted, result = workspace
    run = root / "run"
    state = _json(run / "run.json")
    assert list(state["stages"]) == list(STAGES) and all(s["done"] for s in state["stages"].values())
    for rel in ("calibrate/stats.safetensors", "calibrate/calibration.json", "detect/detection.json",
                "detect/unblocked.safetensors", "localize/neurons.json", "prune/prune.json",
                "verify/verification.json", "recipe.yaml"):
        assert (run / rel).is_file(), rel
    from safetensors.torch import load_file

    deltas = load_file(str(run / "detect/unblocked.safetensors"))  # reused by localization: no unblocked pass there
    assert sorted(deltas) == ["0", "1", "2"] and deltas["0"].shape[0] == 6
    first = _json(run / "localize/prompts/000000.json")
    assert first["early_reject"] is False  # the recipe's choice, recorded with each result
    assert first["sample_forwards"] == first["unet_forwards"] * len(first["kept_seeds"])  # blocked passes only
    detection = _json(run / "detect/detection.json")
    flags = [p["memorized"] for p in detection["prompts"]]
    assert flags == [True, True, False]  # the ordinary prompt is reported as not reproducing, not dropped
    assert "do not reproduce memorization" in result.output
    assert sorted(p.name for p in (run / "localize/prompts").iterdir()) == ["000000.json", "000001.json"]
    neurons = NeuronSet.from_json(_json(run / "localize/neurons.json")["layers"])
    first = next(iter(planted))
    assert neurons.layers[first] == planted[first]  # the planted neuron of the first prompt is found


def test_verification_shows_memorization_removed_and_the_control_does_not(workspace):
    root, *_ = workspace
    v = _json(root / "run/verify/verification.json")
    detect = _json(root / "run/detect/detection.json")
    assert v["passed"] and all(g["passed"] for g in v["gates"])
    before = [p["score_before"] for p in v["memorized"][:2]]
    after = [p["score_after"] for p in v["memorized"][:2]]
    control = [p["score_control"] for p in v["memorized"][:2]]
    assert min(before) > 0.428 > max(after)
    assert min(control) > 0.428  # random neurons with the same per-layer counts leave memorization in place
    assert before == [p["score"] for p in detect["prompts"][:2]]  # same seeds before and after
    ctrl = NeuronSet.from_json(v["control_neurons"])
    ours = NeuronSet.from_json(_json(root / "run/localize/neurons.json")["layers"])
    assert ctrl.counts() == ours.counts()
    assert all(not set(ctrl.layers[n]) & set(ours.layers[n]) for n in ours.layers)
    assert "ssim_to_reference_before" in v["memorized"][0] and len(v["held_out"]) == 2
    assert all(0.0 <= x <= 1.0 for row in v["held_out"] for x in row["ssim_base_vs_after"])
    assert (root / "run/verify/images/heldout_000000_seed0_after.png").is_file()


def test_export_folders_hold_everything_the_issue_lists(workspace):
    root, *_ = workspace
    for layout in ("compact", "dense"):
        folder = root / "run/export" / layout
        report = _json(folder / "harden/report.json")
        assert report["layout"] == layout and report["passed"] is True and report["schema"] == 1
        assert report["memorized_prompts"]["count"] == 3 and report["memorized_prompts"]["detected"] == 2
        assert report["export_check"]["max_abs_diff"] <= 1e-5
        assert set(report["timings_s"]) == set(STAGES) - {"export"}
        assert report["packages"]["torch"] == torch.__version__.split("+")[0] or report["packages"]["torch"]
        assert report["seeds"]["generation"] == [0, 1]
        for rel, digest in report["files"].items():  # every file hashed, and hashes are right
            assert sha256_file(folder / rel) == digest
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert on_disk - set(report["files"]) == {"harden/report.json", "README.md"}
        assert not any(p.suffix in (".bin", ".ckpt", ".pt", ".pkl") for p in folder.rglob("*"))
        for name in ("neurons_per_layer.png", "heldout_grid.png"):
            assert (folder / "harden/figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        text = "".join(p.read_text(errors="ignore") for p in folder.rglob("*") if p.suffix in (".json", ".yaml", ".md"))
        for prompt in (MEMORIZED, SECOND, ORDINARY):  # the memorized prompts are never published by default
            assert prompt not in text
    assert (root / "run/export/compact/unet/compact_unet.py").is_file()


def test_exported_models_load_and_reproduce_the_pruned_unet(workspace):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from harden.prune import prune_dense

    root, *_ = workspace
    neurons = NeuronSet.from_json(_json(root / "run/localize/neurons.json")["layers"])
    base = UNet2DConditionModel.from_pretrained(root / "model", subfolder="unet")
    expected_model = prune_dense(base, neurons)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    expected = expected_model(x, 500, encoder_hidden_states=ctx).sample
    dense = DiffusionPipeline.from_pretrained(root / "run/export/dense").unet
    compact = DiffusionPipeline.from_pretrained(root / "run/export/compact", trust_remote_code=True).unet
    assert type(compact).__name__ == "CompactUNet2DConditionModel"
    from harden.compact_unet import CompactUNet2DConditionModel  # with harden installed: no remote code needed

    folder = root / "run/export/compact"
    local = DiffusionPipeline.from_pretrained(folder, unet=CompactUNet2DConditionModel.from_pretrained(
        folder, subfolder="unet")).unet
    assert type(local) is CompactUNet2DConditionModel
    for unet in (dense, compact, local):
        assert (unet(x, 500, encoder_hidden_states=ctx).sample - expected).abs().max() <= 1e-5
    assert (base(x, 500, encoder_hidden_states=ctx).sample - expected).abs().max() > 1e-3  # pruning did change it


def test_resume_of_a_finished_run_skips_every_stage(workspace):
    root, recipe, *_ = workspace
    before = _json(root / "run/run.json")
    stamp = (root / "run/localize/neurons.json").stat().st_mtime_ns
    result = runner.invoke(app, ["run", str(recipe), "--out", str(root / "run"), "--resume"])
    assert result.exit_code == 0, result.output
    assert result.output.count("done in an earlier run, skipped") == len(STAGES)
    assert _json(root / "run/run.json") == before
    assert (root / "run/localize/neurons.json").stat().st_mtime_ns == stamp


def test_a_killed_run_resumes_to_the_same_neurons(workspace, tmp_path):
    """SIGKILL right after the first prompt's result is saved (fault injection), then --resume."""
    root, recipe, *_ = workspace
    out = tmp_path / "killed"
    env = {**os.environ, FAULT_ENV: "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "harden", "localize", str(recipe), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    # prompts are searched side by side: whichever finished first was saved, and only it
    assert [p.name for p in (out / "localize/prompts").iterdir()] in (["000000.json"], ["000001.json"])
    assert not (out / "localize/neurons.json").exists()
    state = _json(out / "run.json")["stages"]
    assert state["calibrate"]["done"] and state["detect"]["done"] and "localize" not in state
    result = runner.invoke(app, ["localize", str(recipe), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert "calibrate: done in an earlier run" in result.output
    assert _json(out / "localize/neurons.json") == _json(root / "run/localize/neurons.json")
    for name in ("000000.json", "000001.json"):  # equal but for the wall time
        resumed, whole = _json(out / "localize/prompts" / name), _json(root / "run/localize/prompts" / name)
        assert resumed.pop("seconds") > 0 and whole.pop("seconds") > 0
        assert resumed == whole


def test_resume_refuses_a_changed_recipe(workspace, tmp_path):
    root, recipe, *_ = workspace
    changed = write_recipe(root, "changed.yaml", detection={"n_seeds": 7})
    result = runner.invoke(app, ["run", str(changed), "--out", str(root / "run"), "--resume"])
    assert result.exit_code == 2 and "recipe changed" in result.stderr


def test_a_failed_gate_exits_3_keeps_the_export_and_pushes_nothing(workspace, tmp_path, monkeypatch):
    root, *_ = workspace
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a push attempt would exit 4
    recipe = write_recipe(root, "gate.yaml", detection={"n_seeds": 6},
                          verify={"generate": False, "control": False, "gates": {"neurons_total": {"max": 0}}},
                          export={"layout": "dense"}, hub={"repo_id": "org/never-pushed"})
    out = tmp_path / "gate"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "neurons_total" in result.stderr and "nothing was pushed" in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # progress goes to stderr too; the error is one last line
    assert last.startswith("error: ") and "nothing was pushed" in last
    report = _json(out / "export/dense/harden/report.json")
    assert report["passed"] is False and report["gates"][0]["passed"] is False


def test_prune_and_verify_commands_take_explicit_inputs(workspace, tmp_path):
    root, recipe, *_ = workspace
    neurons = root / "run/localize/neurons.json"
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(root / "model"), "--neurons", str(neurons), "--out", str(out),
                                 "--layout", "both"])
    assert result.exit_code == 0, result.output
    for layout in ("compact", "dense"):
        assert _json(out / layout / "harden/neurons.json") == _json(neurons)
        assert sha256_file(out / layout / "unet/diffusion_pytorch_model.safetensors") == sha256_file(
            root / "run/export" / layout / "unet/diffusion_pytorch_model.safetensors")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"down_blocks.9.attn2": [1]}}))
    result = runner.invoke(app, ["prune", str(root / "model"), "--neurons", str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a target layer" in result.stderr and not (tmp_path / "x").exists()


def test_fast_mode_run_compares_itself_with_exact_mode(workspace, tmp_path):
    """Fast mode ends below the same threshold; the report compares it with exact mode, whose results and
    verification metrics must be the exact-mode run's (same prompts, seeds and neurons)."""
    root, *_ = workspace
    recipe = write_recipe(root, "fast.yaml", detection={"n_seeds": 6}, localization={"mode": "fast"},
                          export={"layout": "dense"})
    out = tmp_path / "fast"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    exact_run = NeuronSet.from_json(_json(root / "run/localize/neurons.json")["layers"])
    fast = NeuronSet.from_json(_json(out / "localize/neurons.json")["layers"])
    for path in (out / "localize/prompts").iterdir():
        assert _json(path)["score"] < _json(path)["tau_refine"]
    assert len(fast) <= 1.25 * len(exact_run) + 1
    assert NeuronSet.from_json(_json(out / "localize/exact_neurons.json")["layers"]) == exact_run
    for name in ("000000.json", "000001.json"):  # exact mode here == the exact-mode run, prompt by prompt
        here, there = _json(out / "localize/exact" / name), _json(root / "run/localize/prompts" / name)
        assert here["neurons"] == there["neurons"] and here["score"] == pytest.approx(there["score"], abs=1e-6)
    compare = _json(out / "localize/compare.json")
    assert compare["prompts"] == 2 and compare["exact"]["union"] == len(exact_run)
    assert compare["fast"]["union"] == len(fast) and compare["fast"]["below_threshold"] == 2
    assert compare["fast"]["seconds"] > 0 and compare["exact"]["seconds"] > 0
    v = _json(out / "verify/verification.json")
    exact_metrics = _json(root / "run/verify/verification.json")["metrics"]
    for key in ("memorized_score_after_max", "memorized_ssim_after_max", "neurons_total"):
        assert v["exact_mode_metrics"][key] == pytest.approx(exact_metrics[key], abs=1e-4), key
    assert all("exact_mode" in row for row in v["rows"])
    report = _json(out / "export/dense/harden/report.json")
    assert report["localization"]["compare"] == compare
    assert report["verification"]["exact_mode_metrics"] == v["exact_mode_metrics"]
    card = (out / "export/dense/README.md").read_text()
    assert "| exact mode |" in card and "| neurons per prompt (median) |" in card


def test_verify_command_with_a_clip_model(workspace, tmp_path):
    """`harden verify --neurons` measures the CLIP score through transformers when the recipe names a CLIP model."""
    import numpy as np
    from PIL import Image

    from harden.tiny import save_tiny_clip
    from harden.metrics import ClipScorer

    root, *_ = workspace
    save_tiny_clip(tmp_path / "clip")
    recipe = write_recipe(root, "clip.yaml", detection={"n_seeds": 6},
                          verify={"clip_model": str(tmp_path / "clip"), "control": False,
                                  "gates": {"heldout_clip_drop": {"max": 100.0}}})
    out = tmp_path / "verify"
    result = runner.invoke(app, ["verify", str(recipe), "--neurons", str(root / "run/localize/neurons.json"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    state = _json(out / "run.json")["stages"]
    assert state["localize"]["given"] and "export" not in state
    v = _json(out / "verify/verification.json")
    scorer = ClipScorer(str(tmp_path / "clip"), torch.device("cpu"))
    for row in v["held_out"]:
        for name in ("before", "after"):
            images = [np.asarray(Image.open(out / "verify/images" / f"heldout_{row['index']:06d}_seed{s}_{name}.png"))
                      for s in (0, 1)]
            assert row[f"clip_{name}"] == pytest.approx(float(np.mean(scorer(images, row["prompt"]))), abs=1e-4)
    assert v["metrics"]["heldout_clip_drop"] == pytest.approx(
        np.mean([r["clip_before"] for r in v["held_out"]]) - np.mean([r["clip_after"] for r in v["held_out"]]))
    assert any(r["metric"] == "held-out CLIP score (mean)" for r in v["rows"])

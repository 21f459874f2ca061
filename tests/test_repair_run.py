"""`harden run` with repair on the tiny planted model: SIGKILL mid-repair and --resume give the uninterrupted result;
the export holds the repaired weights in both layouts; bad inputs leave nothing written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from planted_model import ORDINARY, build_planted, write_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from harden.cli import app
from harden.stages.repair import FAULT_ENV

pytestmark = pytest.mark.slow  # end to end

runner = CliRunner()
REPAIR = {"enabled": True, "steps": 5, "checkpoint_every": 2, "refresh_every": 2, "refresh_steps": 1,
          "attack_steps": 2, "attack_batch": 2, "batch": 8, "adv_batch": 8, "pool": 32, "retain_seeds": 1,
          "retain_prompts": 4, "surrogate_seeds": 2, "probe_every": 0, "paraphrases": 1, "lr": 1e-3}
VERIFY = {"seeds": [0, 1], "steps": 2, "gates": {}}


def _json(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def localized(tmp_path_factory):
    """A planted model and a run folder whose stages up to localize are done (the recipe has repair on)."""
    root = tmp_path_factory.mktemp("repair")
    build_planted(root / "model")
    recipe = write_recipe(root, detection={"n_seeds": 6}, verify=VERIFY, repair=REPAIR)
    result = runner.invoke(app, ["localize", str(recipe), "--out", str(root / "localized")])
    assert result.exit_code == 0, result.output
    return root, recipe


def test_a_killed_repair_resumes_to_the_uninterrupted_result(localized, tmp_path):
    root, recipe = localized
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    shutil.copytree(root / "localized", killed)
    shutil.copytree(root / "localized", whole)
    env = {**os.environ, FAULT_ENV: "3", "HF_HUB_OFFLINE": "1"}  # SIGKILL after step 3: between checkpoints 2 and 4
    done = subprocess.run([sys.executable, "-m", "harden", "run", str(recipe), "--out", str(killed), "--resume"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == -9, done.stderr[-2000:]
    assert _json(killed / "repair/checkpoints/latest.json")["step"] == 2
    assert not (killed / "repair/repair.json").exists() and "repair" not in _json(killed / "run.json")["stages"]
    result = runner.invoke(app, ["run", str(recipe), "--out", str(killed), "--resume"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["run", str(recipe), "--out", str(whole), "--resume"])
    assert result.exit_code == 0, result.output

    resumed, uninterrupted = _json(killed / "repair/repair.json"), _json(whole / "repair/repair.json")
    assert resumed["resumed_from"] == 2 and uninterrupted["resumed_from"] is None
    assert resumed["steps"] == uninterrupted["steps"] == 5
    assert resumed["history"] == uninterrupted["history"]
    for layout in ("compact", "dense"):
        a = load_file(str(killed / f"repair/unet_{layout}.safetensors"))
        b = load_file(str(whole / f"repair/unet_{layout}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (killed / "repair/checkpoints").exists()  # removed once the repaired weights are written

    # the export holds the repaired weights, in both layouts, with the pruned structure
    neurons = _json(whole / "localize/neurons.json")["layers"]
    assert neurons
    dense = load_file(str(whole / "export/dense/unet/diffusion_pytorch_model.safetensors"))
    base = load_file(str(root / "model/unet/diffusion_pytorch_model.safetensors"))
    compact = load_file(str(whole / "export/compact/unet/diffusion_pytorch_model.safetensors"))
    for name, idx in neurons.items():
        w = dense[f"{name}.to_v.weight"]
        assert torch.count_nonzero(w[idx]) == 0
        assert compact[f"{name}.to_v.weight"].shape[0] == w.shape[0] - len(idx)
    changed = [k for k in base if k in dense and not torch.equal(base[k], dense[k])
               and not any(k.startswith(n) and ".to_v." in k for n in neurons)]
    assert len(changed) > 10  # trained beyond the pruned rows
    for layout in ("compact", "dense"):
        report = _json(whole / f"export/{layout}/harden/report.json")
        assert report["export_check"]["max_abs_diff"] <= report["export_check"]["tolerance"]
        assert report["repair"]["steps"] == 5 and len(report["repair"]["losses"]["retain"]) == 5
        assert report["repair"]["settings"]["lr"] == 1e-3
        card = (whole / f"export/{layout}/README.md").read_text()
        assert "pruned and adversarially fine-tuned" in card and "pruned only" in card
        assert "- adversarial-fine-tuning" in card.split("---")[1]  # the Hub tag, in the card's metadata
    rows = _json(whole / "verify/verification.json")["rows"]
    assert all(r["pruned"] is not None for r in rows if r["after"] is not None and r["control"] is not None)


def test_no_detected_prompt_skips_repair_and_says_so(tmp_path):
    root = tmp_path
    build_planted(root / "model")
    recipe = write_recipe(root, memorized={"prompts": [ORDINARY]}, detection={"n_seeds": 6},
                          verify={**VERIFY, "control": False}, repair=REPAIR, export={"layout": "dense"})
    result = runner.invoke(app, ["run", str(recipe), "--out", str(root / "run")])
    assert result.exit_code == 0, result.output
    assert "repair: skipped: no memorized prompt was detected" in result.output
    assert _json(root / "run/repair/repair.json")["skipped"] == "no memorized prompt was detected"
    assert "repair" not in _json(root / "run/export/dense/harden/report.json") or \
        _json(root / "run/export/dense/harden/report.json")["repair"]["skipped"]


def test_a_compact_model_from_another_tool_is_refused_before_anything_is_written(localized, tmp_path):
    root, _ = localized
    out = tmp_path / "compact"
    neurons = root / "localized/localize/neurons.json"
    result = runner.invoke(app, ["prune", str(root / "model"), "--neurons", str(neurons), "--out", str(out),
                                 "--layout", "compact"])
    assert result.exit_code == 0, result.output
    recipe = write_recipe(tmp_path, model={"id": str(out), "targets": "up_blocks"}, repair=REPAIR)
    result = runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "never")])
    assert result.exit_code == 2 and "compact" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()

"""`harden run` on the shipped memorizing model (harden/zoo/memorizer) with recipes/demo.yaml, scaled down.

The full demo (10 seeds, 50 steps) is measured in the README; here fewer seeds and steps keep the suite fast while
every stage still runs on the real organism: its memorized captions must be detected, localized and mitigated.
"""

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from harden.cli import app

REPO = Path(__file__).resolve().parents[1]


def test_demo_recipe_hardens_the_shipped_model(tmp_path):
    recipe = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    recipe["reference"]["tau_prompts"] = 12
    recipe["verify"].update(seeds=[0, 1], steps=8, gates={"mitigated_fraction": {"min": 1.0}})
    recipe["verify"]["held_out"]["prompts"] = recipe["verify"]["held_out"]["prompts"][:3]
    recipe["export"]["layout"] = "compact"
    path = tmp_path / "demo-small.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    detection = json.loads((run / "detect/detection.json").read_text())
    assert len(detection["prompts"]) == 8
    detected = [p for p in detection["prompts"] if p["memorized"]]
    assert detected, "the shipped model must reproduce at least one memorized caption"
    verification = json.loads((run / "verify/verification.json").read_text())
    for p in verification["memorized"]:
        if p["detected"]:
            assert p["score_after"] <= verification["threshold"] < p["score_before"]
        assert "ssim_to_reference_before" in p  # every memorized caption comes with its training image
    assert all(row.get("alignment_before") is not None for row in verification["held_out"])
    report = json.loads((run / "export/compact/harden/report.json").read_text())
    assert report["export_check"]["max_abs_diff"] == 0.0 and report["passed"]

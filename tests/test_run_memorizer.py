"""`harden run` on the shipped memorizing model (harden/zoo/memorizer) with recipes/demo.yaml, scaled down.

The full demo is measured in the README; here fewer seeds, steps and prompts keep the suite fast while
every stage still runs on the real organism: its memorized captions must be detected, localized and mitigated.
"""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from harden.cli import app

pytestmark = pytest.mark.slow  # end to end

REPO = Path(__file__).resolve().parents[1]


def test_demo_recipe_runs_on_the_shipped_model(tmp_path):
    """Every stage runs on the organism; pruning lowers each memorized caption's NeMo score.

    The full demo's outcome is measured in the README (its gates fail on this 16x16 model); here the test asserts what
    must hold at any scale and that the report's gate metric agrees with the per-prompt rows.
    """
    recipe = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    recipe["reference"]["tau_prompts"] = 12
    recipe["verify"].update(seeds=[0, 1], steps=8, control=False, gates={})
    recipe["audit"]["enabled"] = False  # 3 models x 24 attacks; measured in docs/audit.md, tested in test_audit_cli
    recipe["repair"]["enabled"] = False  # 450 training steps; measured in docs/repair.md, tested in test_repair*
    recipe["verify"]["held_out"]["prompts"] = recipe["verify"]["held_out"]["prompts"][:3]
    recipe["export"]["layout"] = "compact"
    path = tmp_path / "demo-small.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    detection = json.loads((run / "detect/detection.json").read_text())
    assert len(detection["prompts"]) == 8 and all(p["memorized"] for p in detection["prompts"])
    assert len(list((run / "localize/prompts").iterdir())) == 8
    verification = json.loads((run / "verify/verification.json").read_text())
    threshold = verification["threshold"]
    for p in verification["memorized"]:
        assert p["score_after"] < p["score_before"]
        assert "ssim_to_reference_before" in p  # every memorized caption comes with its training image
    fraction = sum(p["score_after"] <= threshold for p in verification["memorized"]) / 8
    assert verification["metrics"]["mitigated_fraction"] == fraction
    assert all(row.get("alignment_before") is not None for row in verification["held_out"])
    report = json.loads((run / "export/compact/harden/report.json").read_text())
    assert report["export_check"]["max_abs_diff"] == 0.0 and report["passed"]
    assert report["neurons"]["total"] == json.loads((run / "localize/neurons.json").read_text())["count"] > 0

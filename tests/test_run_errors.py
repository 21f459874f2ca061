"""Bad input to `harden run`: each a one-line error, exit code 2, and nothing written."""

import json
from pathlib import Path

import pytest
import torch
from planted_model import write_recipe
from typer.testing import CliRunner

from harden.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A good tiny pipeline (safetensors), the same as pickles only, and one whose UNet has no cross-attention."""
    from diffusers import UNet2DConditionModel

    from harden.tiny import tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    pipe = tiny_pipeline(seed=0, sample_size=32)
    pipe.save_pretrained(root / "good", safe_serialization=True)
    pipe.save_pretrained(root / "pickled", safe_serialization=False)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, mid_block_type="UNetMidBlock2D",
        cross_attention_dim=32, norm_num_groups=8)
    pipe.save_pretrained(root / "no_cross_attention", safe_serialization=True)
    return root


def _run(recipe: Path, out: Path, *extra):
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out), *extra])
    return result


def _assert_bad(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def _nothing_written(tmp_path: Path, out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_recipe(tmp_path):
    _assert_bad(_run(tmp_path / "missing.yaml", tmp_path / "out"), "does not exist")
    _nothing_written(tmp_path, tmp_path / "out")


def test_unknown_key(tmp_path, models):
    recipe = write_recipe(tmp_path, model={"id": str(models / "good"), "devise": "cpu"})
    _assert_bad(_run(recipe, tmp_path / "out"), "unknown key 'model.devise'", "did you mean 'device'?")
    _nothing_written(tmp_path, tmp_path / "out")


def test_duplicate_key(tmp_path, models):
    recipe = write_recipe(tmp_path, model={"id": str(models / "good")})
    recipe.write_text(recipe.read_text() + "seed: 1\nseed: 2\n")
    _assert_bad(_run(recipe, tmp_path / "out"), "duplicate key 'seed'")
    _nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_prompt_file(tmp_path, models, content):
    (tmp_path / "prompts.txt").write_text(content)
    recipe = write_recipe(tmp_path, model={"id": str(models / "good")}, memorized={"file": "prompts.txt"})
    recipe.write_text(recipe.read_text())
    data = recipe.read_text().split("memorized:")[0]
    assert data
    _fix_memorized(recipe, {"file": "prompts.txt"})
    _assert_bad(_run(recipe, tmp_path / "out"), "memorized", "no prompts")
    _nothing_written(tmp_path, tmp_path / "out")


def _fix_memorized(recipe: Path, value):
    import yaml

    data = yaml.safe_load(recipe.read_text())
    data["memorized"] = value
    recipe.write_text(yaml.safe_dump(data))


def test_missing_prompt_file(tmp_path, models):
    recipe = write_recipe(tmp_path, model={"id": str(models / "good")})
    _fix_memorized(recipe, {"file": "nowhere.jsonl"})
    _assert_bad(_run(recipe, tmp_path / "out"), "nowhere.jsonl does not exist")
    _nothing_written(tmp_path, tmp_path / "out")


def test_model_path_that_does_not_exist(tmp_path):
    recipe = write_recipe(tmp_path, model={"id": "./no/such/model"})
    _assert_bad(_run(recipe, tmp_path / "out"), "model folder", "does not exist")
    _nothing_written(tmp_path, tmp_path / "out")


def test_model_without_cross_attention(tmp_path, models):
    recipe = write_recipe(tmp_path, model={"id": str(models / "no_cross_attention")})
    _assert_bad(_run(recipe, tmp_path / "out"), "cross-attention")
    _nothing_written(tmp_path, tmp_path / "out")


def test_pickle_only_checkpoint_is_refused_by_default(tmp_path, models):
    assert list((models / "pickled" / "unet").glob("*.bin"))
    recipe = write_recipe(tmp_path, model={"id": str(models / "pickled")})
    _assert_bad(_run(recipe, tmp_path / "out"), "pickle", "allow_pickle")
    _nothing_written(tmp_path, tmp_path / "out")


def test_existing_output_folder_is_refused_unless_overwrite(tmp_path, models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = write_recipe(tmp_path, model={"id": str(models / "good")})
    _assert_bad(_run(recipe, out), "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite only ever deletes a harden run folder
    _assert_bad(_run(recipe, out, "--overwrite"), "not a harden run folder")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("section,value,needle", [
    ("detection", {"threshold": 1.2}, "detection.threshold"),
    ("localization", {"tau_initial": 0.0}, "localization.tau_initial"),
    ("verify", {"gates": {"heldout_ssim_median": {"min": 0.8, "max": 0.9}}}, "exactly one bound"),
])
def test_thresholds_out_of_range(tmp_path, models, section, value, needle):
    recipe = write_recipe(tmp_path, model={"id": str(models / "good")}, **{section: value})
    _assert_bad(_run(recipe, tmp_path / "out"), needle)
    _nothing_written(tmp_path, tmp_path / "out")


def test_resume_without_a_run_folder(tmp_path, models):
    recipe = write_recipe(tmp_path, model={"id": str(models / "good")})
    _assert_bad(_run(recipe, tmp_path / "out", "--resume"), "not a harden run folder")


def test_validate_reports_counts_without_loading_a_model(tmp_path):
    recipe = write_recipe(tmp_path, model={"id": "org/some-model"})  # a Hub id: validate must not fetch it
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "valid; model Hub id org/some-model; 3 memorized, 28 reference, 2 held-out prompts; 3 gates" in result.stdout
    bad = write_recipe(tmp_path, "bad.yaml", detection={"thresold": 0.4})
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "did you mean 'threshold'?" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "run", str(tmp_path / "missing.yaml")])
    assert result.exit_code != 0 and result.exception is not None
    assert json.dumps(str(result.exception))

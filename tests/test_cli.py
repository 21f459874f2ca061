import json

import torch
from typer.testing import CliRunner

from harden import __version__
from harden.cli import app

runner = CliRunner()


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"harden {__version__}"


def test_demo_finds_the_planted_neuron_and_writes_loadable_layouts(tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from harden.compact_unet import CompactUNet2DConditionModel

    out = tmp_path / "demo"
    r = runner.invoke(app, ["selfcheck", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["found_planted"] and summary["score_after_pruning"] < summary["threshold"] < summary["score_before"]
    assert summary["max_abs_diff_dense_vs_compact"] <= 1e-5
    neurons = json.loads((out / "neurons.json").read_text())
    assert list(neurons.values())[0]["neurons"] == {summary["planted"]["layer"]: [5]}
    assert not list(out.rglob("*.bin")) and not list(out.parent.glob(".demo.*"))

    x = torch.randn(1, 4, 32, 32)
    ctx = torch.randn(1, 77, 32)
    dense = StableDiffusionPipeline.from_pretrained(out / "dense", local_files_only=True)
    compact = DiffusionPipeline.from_pretrained(out / "compact", trust_remote_code=True, local_files_only=True)
    own = CompactUNet2DConditionModel.from_pretrained(out / "compact", subfolder="unet")
    with torch.no_grad():
        y_dense = dense.unet(x, 961, encoder_hidden_states=ctx).sample
        y_compact = compact.unet(x, 961, encoder_hidden_states=ctx).sample
        y_own = own(x, 961, encoder_hidden_states=ctx).sample
    assert type(compact.unet).__name__ == "CompactUNet2DConditionModel"
    assert (y_dense - y_compact).abs().max() <= 1e-5 and torch.equal(y_compact, y_own)
    assert dense.unet.get_submodule(summary["planted"]["layer"]).to_v.weight[5].abs().sum() == 0

    again = runner.invoke(app, ["selfcheck", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1

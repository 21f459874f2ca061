"""A base model given as a Hub id (`model.id: org/name`), through the test Hub (tests/hub_server.py): the revision is
pinned and recorded, `variant` files are used where the repo has them, only safetensors are fetched, HF_HUB_OFFLINE
is honoured, and every Hub failure is one line with exit 2 (bad input) or 4 (Hub), with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_server import serve
from planted_model import build_planted, write_recipe
from typer.testing import CliRunner

from harden.cli import app
from harden.loading import hub_commit, load_pipeline
from harden.recipe import ModelSection

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
NOT_A_PICKLE = b"never downloaded: harden fetches safetensors only"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """planted: the tiny model with two memorized prompts; plain: the same pipeline without them; variant: plain with
    an fp16 copy of its UNet; sd3: an SD3-style index and transformer config (and junk weights never to be read)."""
    from harden.tiny import tiny_pipeline

    root = tmp_path_factory.mktemp("hub-models")
    build_planted(root / "planted")
    pipe = tiny_pipeline(seed=0, sample_size=32)
    pipe.save_pretrained(root / "plain", safe_serialization=True)
    pipe.save_pretrained(root / "variant", safe_serialization=True)
    half = pipe.unet.to(torch.float16)
    half.save_pretrained(root / "variant" / "unet", variant="fp16", safe_serialization=True)
    pipe.unet.to(torch.float32)
    sd3 = root / "sd3"
    (sd3 / "transformer").mkdir(parents=True)
    (sd3 / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "SD3Transformer2DModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"]}))
    (sd3 / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    (sd3 / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk weights")
    pickled = root / "pickled"
    pipe.save_pretrained(pickled, safe_serialization=False)
    return root


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # a cache of this test's own
    yield from serve(monkeypatch, tmp_path)


def _downloads(hub) -> list[str]:
    return [path for method, path, _ in hub.state.requests if method == "GET" and "/resolve/" in path]


def _run(tmp_path: Path, model: dict, **sections):
    recipe = write_recipe(tmp_path, model={"device": "cpu", **model}, **sections)
    out = tmp_path / "out"
    return runner.invoke(app, ["run", str(recipe), "--out", str(out)]), out


def _one_line(result, code: int, *needles):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "hf_" not in lines[0]  # no token in any message


def _nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.slow
def test_run_by_hub_id_with_a_pinned_revision(hub, folders, tmp_path):
    """The revision pins the first commit (the planted model); main has moved on to a model without memorization.
    The run hardens the pinned commit, fetches only safetensors, and report.json records revision and commit."""
    pinned = hub.state.add_folder("acme/tiny-sd", folders / "planted", "planted weights",
                                  files={"text_encoder/pytorch_model.bin": NOT_A_PICKLE})
    main = hub.state.add_folder("acme/tiny-sd", folders / "plain", "retrained",
                                files={"text_encoder/pytorch_model.bin": NOT_A_PICKLE})
    assert pinned != main
    quick = {"generate": False, "gates": {"mitigated_fraction": {"min": 1.0}}}  # no images: loading is the point
    result, out = _run(tmp_path, {"id": "acme/tiny-sd", "revision": pinned}, detection={"n_seeds": 6},
                       verify=quick, export={"layout": "both"})
    assert result.exit_code == 0, result.output
    detection = json.loads((out / "detect" / "detection.json").read_text())
    assert [p["memorized"] for p in detection["prompts"]] == [True, True, False]  # the planted (pinned) weights
    for layout in ("compact", "dense"):
        report = json.loads((out / "export" / layout / "harden" / "report.json").read_text())
        assert report["base_model"]["hub_id"] == "acme/tiny-sd"
        assert report["base_model"]["revision"] == pinned and report["base_model"]["commit"] == pinned
    downloads = _downloads(hub)
    assert downloads and all(f"/resolve/{pinned}/" in path for path in downloads)
    assert not [p for p in downloads if p.endswith(".bin")]


def test_revision_resolves_to_a_commit_and_main_is_recorded_as_its_commit(hub, folders, tmp_path):
    first = hub.state.add_folder("acme/tiny-sd", folders / "planted", "one")
    second = hub.state.add_folder("acme/tiny-sd", folders / "plain", "two")
    pipe, local = load_pipeline(ModelSection(id="acme/tiny-sd", device="cpu"), tmp_path)
    assert local is None and hub_commit("acme/tiny-sd", None) == second
    plain = load_pipeline(ModelSection(id=str(folders / "plain"), device="cpu"), tmp_path)[0]
    for a, b in zip(pipe.unet.state_dict().values(), plain.unet.state_dict().values()):
        assert torch.equal(a, b)  # main = the second commit's weights
    load_pipeline(ModelSection(id="acme/tiny-sd", revision=first, device="cpu"), tmp_path)
    assert hub_commit("acme/tiny-sd", first) == first


def test_variant_files_are_used_where_the_repo_has_them(hub, folders, tmp_path):
    hub.state.add_folder("acme/variant", folders / "variant")
    pipe, _ = load_pipeline(ModelSection(id="acme/variant", variant="fp16", dtype="float32", device="cpu"), tmp_path)
    plain = load_pipeline(ModelSection(id=str(folders / "plain"), device="cpu"), tmp_path)[0]
    unet, base = pipe.unet.state_dict(), plain.unet.state_dict()
    assert all(torch.equal(unet[k], base[k].half().float()) for k in base)  # the fp16 file, read as float32
    assert any(not torch.equal(unet[k], base[k]) for k in base)  # (which differs from the fp32 file)
    for a, b in zip(pipe.text_encoder.state_dict().values(), plain.text_encoder.state_dict().values()):
        assert torch.equal(a, b)  # no fp16 text encoder in the repo: the regular file
    downloads = _downloads(hub)
    assert any(p.endswith("unet/diffusion_pytorch_model.fp16.safetensors") for p in downloads)
    assert not any(p.endswith("unet/diffusion_pytorch_model.safetensors") for p in downloads)


def test_hf_hub_offline_is_honoured(hub, folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub.state.add_folder("acme/tiny-sd", folders / "plain")
    online = load_pipeline(ModelSection(id="acme/tiny-sd", device="cpu"), tmp_path)[0]
    calls = len(hub.state.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = load_pipeline(ModelSection(id="acme/tiny-sd", device="cpu"), tmp_path)[0]
    assert len(hub.state.requests) == calls  # served from the cache, no request
    for a, b in zip(online.unet.state_dict().values(), offline.unet.state_dict().values()):
        assert torch.equal(a, b)
    result, out = _run(tmp_path, {"id": "acme/never-downloaded"})
    _one_line(result, 4, "HF_HUB_OFFLINE is set", "not in the local Hugging Face cache")
    _nothing_written(out)
    assert len(hub.state.requests) == calls


def test_missing_repository_is_bad_input(hub, tmp_path):
    result, out = _run(tmp_path, {"id": "acme/no-such-model"})
    _one_line(result, 2, "'acme/no-such-model' was not found on the Hub")
    _nothing_written(out)


def test_missing_revision_is_bad_input(hub, folders, tmp_path):
    hub.state.add_folder("acme/tiny-sd", folders / "plain")
    result, out = _run(tmp_path, {"id": "acme/tiny-sd", "revision": "v9-does-not-exist"})
    _one_line(result, 2, "revision 'v9-does-not-exist' does not exist in 'acme/tiny-sd'")
    _nothing_written(out)


def test_gated_repository_is_a_hub_error(hub, folders, tmp_path):
    hub.state.add_folder("acme/gated", folders / "plain", gated=True)
    result, out = _run(tmp_path, {"id": "acme/gated"})
    _one_line(result, 4, "'acme/gated' is gated", "accept its conditions")
    _nothing_written(out)
    assert not [p for p in _downloads(hub) if p.endswith(".safetensors")]


def test_refused_credentials_are_a_hub_error(hub, folders, tmp_path, monkeypatch):
    hub.state.add_folder("acme/tiny-sd", folders / "plain")
    hub.state.token = "hf_the_right_one"
    monkeypatch.setenv("HF_TOKEN", "hf_a_wrong_one")
    result, out = _run(tmp_path, {"id": "acme/tiny-sd"})
    _one_line(result, 4, "refused the credentials", "(401)")
    _nothing_written(out)


def test_no_network_is_a_hub_error(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}")
    result, out = _run(tmp_path, {"id": "acme/tiny-sd"})
    _one_line(result, 4, "cannot reach the Hub at http://127.0.0.1:9")
    _nothing_written(out)


def test_repository_without_a_pipeline_is_bad_input(hub, folders, tmp_path):
    hub.state.add_folder("acme/just-a-unet", folders / "plain" / "unet")
    result, out = _run(tmp_path, {"id": "acme/just-a-unet"})
    _one_line(result, 2, "no model_index.json", "not a diffusers pipeline")
    _nothing_written(out)


def test_pickle_only_repository_is_refused_before_download(hub, folders, tmp_path):
    hub.state.add_folder("acme/pickled", folders / "pickled")
    result, out = _run(tmp_path, {"id": "acme/pickled"})
    _one_line(result, 2, "pickle", "allow_pickle")
    _nothing_written(out)
    assert not [p for p in _downloads(hub) if p.endswith(".bin")]


def test_sd3_style_repository_is_refused_before_any_weight_is_fetched(hub, folders, tmp_path):
    hub.state.add_folder("acme/sd3-like", folders / "sd3")
    result, out = _run(tmp_path, {"id": "acme/sd3-like"})
    _one_line(result, 2, "transformer (SD3Transformer2DModel), not a UNet", "joint attention")
    _nothing_written(out)
    assert not [p for p in _downloads(hub) if p.endswith(".safetensors")]

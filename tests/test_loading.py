"""A hardened export loads the ways its card says, from a folder, from a Hub repo id, and after `hf download`.

Loading from the Hub runs in child processes (a loading script, the `hf` CLI) whose huggingface_hub reads
HF_ENDPOINT at import, as a user's would; their HF_HOME is private to the test and a sitecustomize refuses every
host but the loopback. Every loaded UNet must compute what the in-memory pruned UNet computes (max|diff| <= 1e-6).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import serve, shared_exports, subprocess_env, unet_output

from harden.checkpoint import load_hardened
from harden.hub import push_export

TOL = 1e-6
HF_CLI = Path(sys.executable).parent / "hf"  # the CLI shipped with huggingface_hub (`huggingface-cli` before)

LOADER = """
import json, sys
import torch
from safetensors.torch import save_file
torch.set_num_threads(int(sys.argv[3]))
from diffusers import DiffusionPipeline
from diffusers.utils import logging
logging.disable_progress_bar()
from harden.checkpoint import load_hardened
sys.path.insert(0, sys.argv[4])
from hub_server import unet_output

cases = json.loads(sys.argv[1])
out, classes = {}, {}
for name, (how, source) in cases.items():
    if how == "stock":
        pipe = DiffusionPipeline.from_pretrained(source)
    elif how == "remote_code":
        pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
    else:
        pipe = load_hardened(source)
    out[name] = unet_output(pipe.unet).contiguous()
    classes[name] = type(pipe.unet).__module__ + "." + type(pipe.unet).__name__
save_file(out, sys.argv[2] + "/outputs.safetensors")
open(sys.argv[2] + "/classes.json", "w").write(json.dumps(classes))
"""


@pytest.fixture
def hub(monkeypatch, tmp_path):
    yield from serve(monkeypatch, tmp_path)


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def test_from_export_folders_in_process():
    exports = shared_exports()
    from diffusers import DiffusionPipeline

    dense = DiffusionPipeline.from_pretrained(exports["folders"]["dense"])
    assert type(dense.unet).__name__ == "UNet2DConditionModel"
    assert max_diff(unet_output(dense.unet), exports["outputs"]["dense"]) <= TOL

    compact = load_hardened(exports["folders"]["compact"])  # harden's class passed as unet=, no remote code
    assert type(compact.unet).__module__ == "harden.compact_unet"
    assert max_diff(unet_output(compact.unet), exports["outputs"]["compact"]) <= TOL
    assert max_diff(exports["outputs"]["compact"], exports["outputs"]["dense"]) <= 1e-5  # the two layouts agree

    with pytest.raises(ValueError, match="trust_remote_code"):  # stock loading refuses loudly, never silently
        DiffusionPipeline.from_pretrained(exports["folders"]["compact"])


def test_from_hub_repo_id_and_hf_download(hub, tmp_path):
    """Repo ids load in a child process: there huggingface_hub and diffusers read HF_ENDPOINT at import, as for a
    user, and diffusers' dynamic-module cache (trust_remote_code) lives in the test's HF_HOME."""
    exports = shared_exports()
    folders = exports["folders"]
    push_export(folders["compact"], "acme/tiny-compact")
    push_export(folders["dense"], "acme/tiny-dense")
    env = subprocess_env(hub, tmp_path)

    downloaded = {}
    for layout in ("compact", "dense"):
        target = tmp_path / f"download-{layout}"
        hf = subprocess.run([str(HF_CLI), "download", f"acme/tiny-{layout}", "--local-dir", str(target)],
                            env=env, capture_output=True, text=True, timeout=120)
        assert hf.returncode == 0, hf.stderr
        got = {p.relative_to(target).as_posix() for p in target.rglob("*")
               if p.is_file() and ".cache" not in p.relative_to(target).parts}
        assert got == {p.relative_to(folders[layout]).as_posix() for p in folders[layout].rglob("*")
                       if p.is_file()} | {".gitattributes"}
        downloaded[layout] = target

    from diffusers import DiffusionPipeline

    dense = DiffusionPipeline.from_pretrained(downloaded["dense"])
    assert max_diff(unet_output(dense.unet), exports["outputs"]["dense"]) <= TOL
    compact = load_hardened(downloaded["compact"])
    assert max_diff(unet_output(compact.unet), exports["outputs"]["compact"]) <= TOL

    cases = {
        "dense_repo": ("stock", "acme/tiny-dense"),
        "compact_repo_remote_code": ("remote_code", "acme/tiny-compact"),
        "compact_repo_harden": ("harden", "acme/tiny-compact"),
        "compact_download_remote_code": ("remote_code", str(downloaded["compact"])),
        "compact_export_remote_code": ("remote_code", str(folders["compact"])),
    }
    run = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases), str(tmp_path),
                          str(torch.get_num_threads()), str(Path(__file__).parent)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    outputs = load_file(str(tmp_path / "outputs.safetensors"))
    classes = json.loads((tmp_path / "classes.json").read_text())
    for name, (how, _) in cases.items():
        assert max_diff(outputs[name], exports["outputs"][name.split("_")[0]]) <= TOL, name
        if how == "remote_code":  # the module shipped in unet/, run by diffusers
            assert classes[name].startswith("diffusers_modules.") and classes[name].endswith(
                "compact_unet.CompactUNet2DConditionModel"), classes[name]
    assert classes["dense_repo"] == "diffusers.models.unets.unet_2d_condition.UNet2DConditionModel"
    assert classes["compact_repo_harden"] == "harden.compact_unet.CompactUNet2DConditionModel"
    assert hub.state.unhandled == []
    assert any("/resolve/" in path and path.endswith("/unet/compact_unet.py") for _, path, _ in hub.state.requests)

"""A finished run is never lost and a stopped run resumes (issue 29, families 1, 4, 6, 7), on the tiny planted model.

Real subprocesses and real signals: `--overwrite` is SIGKILLed at every stage boundary and the previous run stays
file for file; SIGINT and SIGTERM stop localization's workers cooperatively (exit 130 / 143, finished prompts kept,
a line that says how to resume); `--resume` refuses a changed prompt file or model weight; exports carry no
per-caption hash, no local path, no URL credential, and follow the user's umask.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from planted_model import MEMORIZED, ORDINARY, SECOND, build_planted, recipe_dict, write_recipe
from typer.testing import CliRunner

from harden.cli import app
from harden.files import file_hashes
from harden.runner import STAGE_FAULT_ENV, STAGES
from harden.stages.folder import prepare_folder, staging
from harden.stages.localize import FAULT_ENV
from harden.tiny import REFERENCES

pytestmark = pytest.mark.slow  # end to end, several subprocesses

runner = CliRunner()
SECRET = "hunter2-secret"
REF_URL = f"https://harden-user:{SECRET}@prompts.example.org/refs.txt"  # served from the cache: no network


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The planted model, a recipe reading a local .jsonl and a credentialed URL (cached), and one finished run."""
    root = tmp_path_factory.mktemp("robust")
    build_planted(root / "model")
    refs = ("\n".join(REFERENCES) + "\n").encode()
    sha = hashlib.sha256(refs).hexdigest()
    cached = root / "cache" / "prompts" / sha / "refs.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(refs)
    (root / "memorized.jsonl").write_text("".join(json.dumps(row) + "\n" for row in (
        {"caption": MEMORIZED, "image": "astronaut.png"}, {"caption": SECOND}, {"caption": ORDINARY})))
    write_recipe(root)  # the reference image astronaut.png
    gates = {"memorized_score_after_max": {"max": 0.428}, "mitigated_fraction": {"min": 1.0}}
    data = recipe_dict(detection={"n_seeds": 6}, localization={"parallel_prompts": 2},
                       verify={"generate": False, "control": False, "gates": gates}, export={"layout": "compact"})
    data["memorized"] = {"file": "memorized.jsonl", "image_field": "image"}
    data["reference"] = {"file": REF_URL, "sha256": sha, "tau_prompts": 6}
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HARDEN_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARDEN_CACHE", str(root / "cache"))
        result = runner.invoke(app, ["run", str(recipe), "--out", str(root / "a")])
    assert result.exit_code == 0, result.output
    return root, recipe, env


def _harden(args: list, env: dict, faults: dict | None = None, umask: int = 0o027) -> subprocess.CompletedProcess:
    def child():
        os.umask(umask)
        # a suite started in the background (`pytest &`) inherits SIGINT ignored, and Python keeps it so; the child
        # gets the disposition of a command typed at a terminal, where Ctrl-C reaches it
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.run([sys.executable, "-m", "harden", *map(str, args)], env={**env, **(faults or {})},
                          capture_output=True, text=True, timeout=900, preexec_fn=child)


def _json(path: Path):
    return json.loads(path.read_text())


def _done(folder: Path) -> list[str]:
    return [name for name, s in _json(folder / "run.json")["stages"].items() if s.get("done")]


def _refused(workspace, out: Path, *needles: str) -> None:
    """--resume --overwrite in process: exit 2 with one line, and neither run folder changes."""
    root, recipe, _ = workspace
    before = (file_hashes(out), file_hashes(staging(out)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARDEN_CACHE", str(root / "cache"))
        result = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--overwrite", "--resume"])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --resume:"), line
    for needle in needles:
        assert needle in line, line
    assert (file_hashes(out), file_hashes(staging(out))) == before


def test_overwrite_keeps_the_previous_run_at_every_stage_boundary(workspace, tmp_path):
    """SIGKILL after each stage of an --overwrite run (continued with --resume --overwrite): the previous run is
    intact every time; the finished replacement takes its place only at the end, with the user's umask."""
    root, recipe, env = workspace
    out = tmp_path / "run"
    shutil.copytree(root / "a", out)
    before = file_hashes(out)
    for n, stage in enumerate(STAGES):
        flags = ["--overwrite"] + (["--resume"] if n else [])
        done = _harden(["run", recipe, "--out", out, *flags], env, {STAGE_FAULT_ENV: stage})
        assert done.returncode == -9, done.stderr[-3000:]
        assert file_hashes(out) == before, f"the previous run changed when killed after {stage}"
        assert _done(staging(out)) == list(STAGES)[:n + 1]
        if stage == "calibrate":  # --resume refuses inputs that changed under the half-finished run
            jsonl = root / "memorized.jsonl"
            original = jsonl.read_bytes()
            try:
                jsonl.write_text(original.decode().replace(ORDINARY, "another plain prompt"))
                _refused(workspace, out, "prompt file of memorized changed")
            finally:
                jsonl.write_bytes(original)
            weights = root / "model" / "unet" / "diffusion_pytorch_model.safetensors"
            original = weights.read_bytes()
            try:
                weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit of the last weight
                _refused(workspace, out, "the model (unet/diffusion_pytorch_model.safetensors) changed")
            finally:
                weights.write_bytes(original)
    done = _harden(["run", recipe, "--out", out, "--overwrite", "--resume"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("done in an earlier run, skipped") == len(STAGES)
    assert not staging(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    after = file_hashes(out)
    assert after != before and _json(out / "run.json")["created_utc"] >= _json(root / "a" / "run.json")["created_utc"]
    assert after["localize/neurons.json"] == before["localize/neurons.json"]  # same recipe, same inputs
    # family 6: exports follow the umask (027 here): group may read, others nothing; no 0600/0700 temp modes
    export = out / "export" / "compact"
    for path in [export, *export.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))
    assert (out / "report.key").stat().st_mode & 0o077 == 0  # the one secret stays private


def test_a_swap_killed_between_its_renames_is_repaired(tmp_path, workspace):
    """The two renames of the final swap are not one atomic step: the next start puts the previous run back."""
    from harden.recipe import load_recipe

    root, recipe, _ = workspace
    out = tmp_path / "run"
    shutil.copytree(root / "a", tmp_path / ".run.replaced")  # killed after `out -> .run.replaced`
    shutil.copytree(root / "a", staging(out))
    before = file_hashes(tmp_path / ".run.replaced")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARDEN_CACHE", str(root / "cache"))
        prepare_folder(out, load_recipe(recipe), resume=True, overwrite=True)
    assert file_hashes(out) == before and not (tmp_path / ".run.replaced").exists()


def _interrupted(workspace, tmp_path, signal_name: str, code: int):
    root, recipe, env = workspace
    out = tmp_path / signal_name.lower()
    done = _harden(["localize", recipe, "--out", out], env, {FAULT_ENV: f"1:{signal_name}"}, umask=0o022)
    assert done.returncode == code, (done.returncode, done.stderr[-3000:])  # not SIGABRT (-6), not a traceback
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: SIG{signal_name} stopped the run during localize;"), last
    assert f"saved in {out}" in last and f"continue with: harden localize {recipe} --out {out} --resume" in last
    kept = {p.name: p.read_bytes() for p in (out / "localize" / "prompts").glob("*.json")}
    assert kept and all("neurons" in json.loads(b) for b in kept.values())  # whole results only
    assert _done(out) == ["calibrate", "detect"] and not (out / "localize" / "neurons.json").exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARDEN_CACHE", str(root / "cache"))
        result = runner.invoke(app, ["localize", str(recipe), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert {name: (out / "localize" / "prompts" / name).read_bytes() for name in kept} == kept  # not redone
    assert _json(out / "localize/neurons.json") == _json(root / "a" / "localize/neurons.json")


def test_ctrl_c_stops_localization_workers_and_resumes(workspace, tmp_path):
    _interrupted(workspace, tmp_path, "INT", 130)


def test_sigterm_stops_localization_workers_and_resumes(workspace, tmp_path):
    _interrupted(workspace, tmp_path, "TERM", 143)


def test_exports_are_private_by_default(workspace):
    """No per-caption unsalted hash, no local path, no URL credential in the export; the HMAC key stays behind."""
    root, _, _ = workspace
    run = root / "a"
    export = run / "export" / "compact"
    report = _json(export / "harden" / "report.json")
    key = bytes.fromhex((run / "report.key").read_text().strip())
    assert (run / "report.key").stat().st_mode & 0o077 == 0 and not list(export.rglob("report.key"))
    captions = [MEMORIZED, SECOND, ORDINARY]
    for entry in report["prompts"]:
        assert "sha256" not in entry and "prompt" not in entry
        text = captions[entry["index"]]
        assert entry["caption_hmac"] == hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
        assert hashlib.sha256(text.encode()).hexdigest() not in json.dumps(report)
    assert report["base_model"]["id"] == "model"
    assert report["recipe"]["model"]["id"] == "model"
    assert report["recipe"]["reference"]["file"] == "https://***@prompts.example.org/refs.txt"
    for path in export.rglob("*"):
        if path.suffix in (".json", ".yaml", ".md", ".txt"):
            text = path.read_text()
            assert str(root) not in text and "/tmp/" not in text and SECRET not in text, path
            if path.suffix == ".json" and isinstance(data := json.loads(text), dict):
                assert not os.path.isabs(str(data.get("_name_or_path", ""))), path
    assert _json(export / "vae" / "config.json")["_name_or_path"] == "model/vae"  # diffusers wrote the full path
    assert _json(export / "model_index.json")["_name_or_path"] == "model"
    assert "a local model (model)" in (export / "README.md").read_text()

"""`harden push` through the real huggingface_hub client against the test Hub of tests/hub_server.py."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from hub_server import serve, shared_exports
from typer.testing import CliRunner

from harden.cli import app
from harden.files import file_hashes

pytestmark = pytest.mark.slow  # end to end

REPO = "acme/tiny-hardened"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    yield from serve(monkeypatch, tmp_path)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A private copy of a run folder with both layouts (tests may edit it)."""
    out = tmp_path / "run"
    shutil.copytree(shared_exports()["root"] / "export", out / "export")
    return out


def push(*args: str):
    return CliRunner().invoke(app, ["push", *args])


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def published(server, revision: str = "main") -> dict[str, bytes]:
    files = dict(server.state.head(REPO, revision).files)
    assert files.pop(".gitattributes")  # written by the Hub when the repo is created
    return files


def test_first_push_publishes_the_export_in_one_commit(hub, run_dir):
    r = push(str(run_dir), "--repo-id", REPO)
    assert r.exit_code == 0, r.output
    compact = run_dir / "export" / "compact"  # both layouts exist: compact is the default
    assert published(hub) == local_files(compact)
    history = hub.state.commits_on(REPO)
    assert len(history) == 2 and history[1].message == "initial commit"
    report = json.loads((compact / "harden" / "report.json").read_text())
    assert history[0].message == f"harden 0.2.0: compact export, recipe sha256 {report['recipe_sha256'][:12]}"
    assert report["recipe_sha256"] in history[0].description
    commits = [p for m, p, _ in hub.state.requests if m == "POST" and "/commit/" in p]
    assert commits == [f"/api/models/{REPO}/commit/main"]
    assert hub.state.unhandled == []
    assert history[0].oid in r.stdout


def test_second_push_makes_a_new_commit_and_mirrors_the_export(hub, run_dir):
    compact, dense = run_dir / "export" / "compact", run_dir / "export" / "dense"
    assert push(str(compact), "--repo-id", REPO).exit_code == 0
    first = hub.state.head(REPO).oid

    card = compact / "README.md"  # a re-rendered card: README.md is outside report.json's file hashes
    card.write_text(card.read_text() + "\nUpdated card.\n")
    r = push(str(run_dir), "--repo-id", REPO, "--layout", "compact")
    assert r.exit_code == 0, r.output
    assert hub.state.head(REPO).parent == first
    assert published(hub) == local_files(compact)

    r = push(str(dense), "--repo-id", REPO)  # the dense layout replaces it; the compact module goes
    assert r.exit_code == 0, r.output
    assert published(hub) == local_files(dense)
    assert "unet/compact_unet.py" not in published(hub) and "1 removed" in r.stdout
    assert len(hub.state.commits_on(REPO)) == 4

    r = push(str(dense), "--repo-id", REPO)  # nothing changed: no empty commit
    assert r.exit_code == 0 and "nothing to push" in r.stdout
    assert len(hub.state.commits_on(REPO)) == 4


def test_create_pr_leaves_main_unchanged(hub, run_dir):
    compact = run_dir / "export" / "compact"
    assert push(str(run_dir), "--repo-id", REPO).exit_code == 0
    main_before = hub.state.head(REPO).oid
    card = compact / "README.md"
    card.write_text(card.read_text() + "\nProposed card.\n")

    r = push(str(run_dir), "--repo-id", REPO, "--create-pr")
    assert r.exit_code == 0, r.output
    assert f"{hub.endpoint}/{REPO}/discussions/1" in r.stdout
    assert hub.state.head(REPO).oid == main_before
    assert published(hub, "refs/pr/1")["README.md"].endswith(b"Proposed card.\n")
    assert not published(hub)["README.md"].endswith(b"Proposed card.\n")


def test_push_to_a_new_branch(hub, run_dir):
    r = push(str(run_dir), "--repo-id", REPO, "--revision", "hardened-v1")
    assert r.exit_code == 0, r.output
    assert published(hub, "hardened-v1") == local_files(run_dir / "export" / "compact")
    assert published(hub) == {}  # main keeps only the Hub's initial commit


def test_server_error_mid_commit_publishes_nothing_and_retry_pushes_the_same(hub, run_dir):
    compact = run_dir / "export" / "compact"
    before = file_hashes(compact)
    hub.state.fail_commits = 1
    r = push(str(run_dir), "--repo-id", REPO)
    assert r.exit_code == 4
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "HTTP 500" in lines[0] and "nothing was published" in lines[0], r.stderr
    assert published(hub) == {}  # the repo exists, the export did not land, not even in part
    assert len(hub.state.commits_on(REPO)) == 1
    assert file_hashes(compact) == before

    r = push(str(run_dir), "--repo-id", REPO)
    assert r.exit_code == 0, r.output
    assert published(hub) == local_files(compact)


def test_missing_token_is_refused_and_a_token_is_never_shown(hub, run_dir, monkeypatch, tmp_path, caplog):
    secret = "hf_testSecretToken0123456789"
    hub.state.token = secret
    r = push(str(run_dir), "--repo-id", REPO)
    assert r.exit_code == 4
    assert "HTTP 401" in r.stderr and "no token was found" in r.stderr and "hf auth login" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert REPO not in hub.state.repos

    monkeypatch.setenv("HF_TOKEN", "hf_wrongToken")
    r = push(str(run_dir), "--repo-id", REPO)
    assert r.exit_code == 4 and "the token was refused" in r.stderr and "hf_wrongToken" not in r.output

    monkeypatch.setenv("HF_TOKEN", secret)
    caplog.set_level(logging.DEBUG)
    r = push(str(run_dir), "--repo-id", REPO)
    assert r.exit_code == 0, r.output
    assert published(hub) == local_files(run_dir / "export" / "compact")
    assert all(ok for _, _, ok in hub.state.requests[-5:])
    assert secret not in r.output and secret not in caplog.text
    for path in tmp_path.rglob("*"):  # the run folder, the export, any huggingface_hub state of this test
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path


def test_gates_failed_run_is_refused_before_any_request(hub, run_dir):
    compact = run_dir / "export" / "compact"
    report_path = compact / "harden" / "report.json"
    report = json.loads(report_path.read_text())
    report["passed"], report["gates"][0]["passed"] = False, False
    report_path.write_text(json.dumps(report))
    r = push(str(compact), "--repo-id", REPO)
    assert r.exit_code == 3
    assert "did not pass its gates (memorization removed)" in r.stderr
    assert hub.state.requests == []


def test_modified_or_wrong_exports_are_refused(hub, run_dir):
    compact = run_dir / "export" / "compact"
    r = push(str(compact), "--repo-id", REPO, "--layout", "dense")
    assert r.exit_code == 2 and "is the compact export" in r.stderr
    r = push(str(run_dir / "export"), "--repo-id", REPO)
    assert r.exit_code == 2 and "neither a harden run folder" in r.stderr
    r = push(str(run_dir), "--repo-id", "not-a-namespaced-id")
    assert r.exit_code == 2 and "ORG/NAME" in r.stderr
    (compact / "unet" / "config.json").write_text("{}")
    r = push(str(compact), "--repo-id", REPO)
    assert r.exit_code == 2 and "unet/config.json differs from report.json" in r.stderr
    shutil.rmtree(run_dir / "export" / "compact")
    r = push(str(run_dir), "--repo-id", REPO, "--layout", "compact")
    assert r.exit_code == 2 and "no compact export (found: dense)" in r.stderr
    assert hub.state.requests == []


def test_unreachable_endpoint_and_offline_mode(hub, run_dir, monkeypatch):
    from huggingface_hub import constants

    from hub_server import start, stop

    gone = start()
    stop(gone)  # a port nothing listens on any more
    monkeypatch.setenv("HF_ENDPOINT", gone.endpoint)
    r = push(str(run_dir), "--repo-id", REPO)
    assert r.exit_code == 4 and f"cannot reach the Hub at {gone.endpoint}" in r.stderr

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = push(str(run_dir), "--repo-id", REPO)
    assert r.exit_code == 4 and "HF_HUB_OFFLINE is set" in r.stderr


def test_private_flag(hub, run_dir):
    assert push(str(run_dir), "--repo-id", REPO, "--private").exit_code == 0
    assert hub.state.repos[REPO].private
    hub.state.repos[REPO].private = False
    r = push(str(run_dir), "--repo-id", REPO, "--private")
    assert r.exit_code == 4 and "already exists and is public" in r.stderr

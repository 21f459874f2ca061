"""harden scan in real subprocesses: 2 processes under torchrun or accelerate launch (gloo on the CPU) write the bytes
of 1 process, and a scan killed with SIGKILL mid-way then resumed writes the bytes of an uninterrupted one.

Both runs use the same thread count (OMP_NUM_THREADS=1, what torchrun gives each worker): float results of a CPU
forward depend on it, so byte-identity holds between runs on the same hardware and thread count.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harden.scan.run import FAULT_ENV

sys.path.insert(0, str(Path(__file__).parent))
from test_scan import _write_captions, planted16  # noqa: E402

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
OUTPUTS = ("scores.jsonl", "memorized.jsonl", "roc.png", "scan.json")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The planted model, 10 captions (9 unique, 5 shards of 2: an odd split over 2 ranks) and one clean run."""
    root = tmp_path_factory.mktemp("scan-dist")
    planted16().save_pretrained(root / "model", safe_serialization=True)
    _write_captions(root / "captions.jsonl")
    one = _scan(root, root / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    return root


def _args(root: Path, out: Path) -> list[str]:
    return ["-m", "harden", "scan", str(root / "model"), "--prompts", str(root / "captions.jsonl"), "--out", str(out),
            "--device", "cpu", "--scores", "wen,nemo,attn", "--shard-size", "2", "--label-field", "memorized"]


def _scan(root: Path, out: Path, *extra: str, env: dict | None = None, launcher: tuple = ()):
    return subprocess.run([sys.executable, *launcher, *_args(root, out), *extra], env=env or ENV,
                          capture_output=True, text=True, timeout=900)


def _shard_rows(out: Path) -> list[dict]:
    return [json.loads(p.read_text())["rows"] for p in sorted((out / "shards").glob("*.json"))]


def test_two_torchrun_processes_write_the_bytes_of_one(setup):
    out = setup / "two"
    two = _scan(setup, out, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert two.returncode == 0, two.stderr[-3000:]
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (setup / "one" / name).read_bytes(), name
    assert _shard_rows(out) == _shard_rows(setup / "one")
    ranks = [json.loads(p.read_text())["rank"] for p in sorted((out / "shards").glob("*.json"))]
    assert ranks == [0, 1, 0, 1, 0]  # every other shard per rank
    assert "2 process(es)" in " ".join((two.stderr + two.stdout).split())  # the console wraps long lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_writes_the_bytes_of_one_process(setup):
    """accelerate's multi-GPU launcher is torchrun underneath; with --device cpu it runs on gloo here."""
    out = setup / "accelerate"
    launched = _scan(setup, out, launcher=("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                                           "no", "--main_process_port", str(_free_port())))
    assert launched.returncode == 0, launched.stderr[-3000:]
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (setup / "one" / name).read_bytes(), name
    assert sorted({json.loads(p.read_text())["rank"] for p in (out / "shards").glob("*.json")}) == [0, 1]


def test_sigkill_mid_scan_then_resume_writes_the_same_bytes(setup):
    out = setup / "killed"
    killed = _scan(setup, out, env={**ENV, FAULT_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list((out / "shards").glob("*.json"))) == 2 and not (out / "scores.jsonl").exists()
    assert not list(out.rglob(".*"))  # whole files only: no temporary file left behind
    resumed = _scan(setup, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in " ".join((resumed.stderr + resumed.stdout).split())
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (setup / "one" / name).read_bytes(), name

"""No token or URL password reaches a terminal, a log or a report (issue 29, family 5).

A small stdlib server stands in for a Hub or proxy that echoes the request (its Authorization header included) in
its error text, the worst case a client meets. The real `harden` CLI pushes to it and loads a Hub id from it in
subprocesses, with the token in HF_TOKEN and credentials in HF_ENDPOINT's userinfo; prompt URLs with credentials
are fetched in process. Every line harden prints passes through harden.scrub.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from hub_server import subprocess_env
from planted_model import recipe_dict, write_recipe
from typer.testing import CliRunner

from harden.cli import app
from harden.cli.ui import RichUI
from harden.errors import BadInputError, HubError
from harden.files import file_hashes
from harden.scrub import register_secret, scrub, scrub_data

runner = CliRunner()
TOKEN = "hf_" + "Q7xZ" * 9  # the shape of a user access token; never a real one
USER, PASSWORD = "harden-user", "pw-Sekr3t-4711"


class EchoServer(ThreadingHTTPServer):
    """Answers every request with 500 and an error text that repeats the request line and all its headers."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Echo)
        self.seen: list[dict] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def _echo(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.seen.append(headers)
        text = (f"upstream refused {self.command} {self.path} with Authorization: {headers.get('authorization')}; "
                "other headers: " + "; ".join(f"{k}: {v}" for k, v in headers.items() if k != "authorization"))
        body = json.dumps({"error": text}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Error-Message", text)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _echo


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.shutdown()


def _with_userinfo(endpoint: str) -> str:
    return endpoint.replace("http://", f"http://{USER}:{PASSWORD}@")


SECRETS = (TOKEN, PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())


def _clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked: {text[-2000:]}"


def _export(root: Path) -> Path:
    """The smallest folder `harden push` accepts: a card, a passed report and the sha256 of every file."""
    folder = root / "export"
    (folder / "harden").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}\n')
    (folder / "README.md").write_text("# hardened\n")
    report = {"passed": True, "gates": [], "layout": "compact", "recipe_sha256": "0" * 64,
              "files": file_hashes(folder, exclude={"README.md"})}
    (folder / "harden" / "report.json").write_text(json.dumps(report))
    return folder


def _harden(args: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harden", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("userinfo", [True, False], ids=["endpoint-userinfo", "token-only"])
def test_push_to_a_server_that_echoes_the_authorization_header(echo, tmp_path, userinfo):
    env = subprocess_env(echo, tmp_path, token=TOKEN)
    if userinfo:
        env["HF_ENDPOINT"] = _with_userinfo(echo.endpoint)
    done = _harden(["push", _export(tmp_path), "--repo-id", "org/hardened"], env)
    assert done.returncode == 4, done.stdout + done.stderr
    sent = " ".join(h.get("authorization", "") for h in echo.seen)
    assert (base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() if userinfo else TOKEN) in sent  # it was sent
    _clean(done.stdout + done.stderr)
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the Hub at ") and "upstream refused POST /api/repos/create" in line
    assert "Authorization: " + ("Basic ***" if userinfo else "Bearer ***") in line
    if userinfo:
        assert "http://***@127.0.0.1:" in line


@pytest.mark.slow
def test_loading_a_hub_id_from_a_server_that_echoes_the_credentials(echo, tmp_path):
    recipe = write_recipe(tmp_path, model={"id": "org/base-model"})
    env = subprocess_env(echo, tmp_path, token=TOKEN)
    env["HF_ENDPOINT"] = _with_userinfo(echo.endpoint)
    done = _harden(["run", recipe, "--out", tmp_path / "out"], env)
    assert done.returncode == 4, done.stdout + done.stderr
    assert any(PASSWORD in base64.b64decode(h.get("authorization", "Basic ").split()[-1]).decode()
               for h in echo.seen)  # the credentials were sent, and echoed
    _clean(done.stdout + done.stderr)
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "'org/base-model'" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("url", [f"http://{USER}:{PASSWORD}@127.0.0.1:{{port}}/refs.txt",
                                 f"http://{TOKEN}@127.0.0.1:{{port}}/refs.txt",
                                 "http://127.0.0.1:{port}/refs.txt"])
def test_prompt_urls_with_credentials(echo, tmp_path, monkeypatch, url):
    monkeypatch.setenv("HARDEN_CACHE", str(tmp_path / "cache"))
    url = url.format(port=echo.server_address[1])
    data = recipe_dict(model={"id": "zoo:memorizer"})
    data["reference"] = {"file": url, "sha256": "0" * 64}
    write_recipe(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["validate", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 2, result.output
    _clean(result.output)
    assert result.stderr.startswith("error: could not fetch http://")


def test_the_scrubber(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", f"https://{USER}:{PASSWORD}@hub.example.org")
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    text = (f"GET https://{USER}:{PASSWORD}@hub.example.org/api failed; Authorization: Bearer {TOKEN}; "
            f"{{'authorization': 'Basic {basic}'}}; raw {basic}; token {TOKEN}; password {PASSWORD}; "
            "other hf_abcdefghijklmnopqrstuvwxyz123456")
    out = scrub(text)
    _clean(out)
    assert "hf_abcdefghijklmnopqrstuvwxyz" not in out
    assert out.startswith("GET https://***@hub.example.org/api failed; Authorization: Bearer ***;")
    assert scrub("a plain message about 3 prompts") == "a plain message about 3 prompts"
    register_secret("s3cret-given-as-argument")
    assert scrub("token s3cret-given-as-argument") == "token ***"
    assert scrub_data({"url": f"https://x:{PASSWORD}@h/p", "n": [1, TOKEN]}) == {"url": "https://***@h/p",
                                                                               "n": [1, "***"]}


def test_library_logs_and_warnings_are_scrubbed(monkeypatch, capsys):
    import logging
    import warnings

    from harden.cli.ui import scrubbed_library_output

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())  # restored afterwards
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    scrubbed_library_output()
    logger = logging.getLogger("huggingface_hub.test")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        logger.warning("retrying %s with %s", f"https://{USER}:{PASSWORD}@hub.example.org/api", TOKEN)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "retrying https://***@hub.example.org/api with ***" in err
    shown = warnings.formatwarning(f"token {TOKEN} expired", UserWarning, "x.py", 1)  # what showwarning prints
    assert "token *** expired" in shown
    _clean(err + shown)


def test_every_error_and_log_line_is_scrubbed(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for err in (BadInputError(f"bad {TOKEN}", f"hint {TOKEN}"), HubError(f"http://u:{PASSWORD}@h failed")):
        _clean(err.one_line() + str(err) + err.hint)
    RichUI().log(f"pushed to https://{USER}:{PASSWORD}@hub.example.org with {TOKEN}")
    captured = capsys.readouterr()
    assert "pushed to https://***@hub.example.org with ***" in captured.err
    _clean(captured.out + captured.err)

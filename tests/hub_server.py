"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only, in memory).

Why: harden's push and the loading paths must be exercised through the real `huggingface_hub` client and real HTTP,
and no Hub server can be installed here. This implements exactly what huggingface_hub 2.4.0 calls for
`create_repo`, `create_branch`, `upload_folder`/`create_commit` (validate-yaml, preupload, NDJSON commit, PRs),
`model_info`/`repo_info`, `list_repo_tree` (snapshot_download, `hf download`) and file resolve (HEAD/GET).

Not implemented: LFS and Xet uploads. The server answers `uploadMode: "regular"` for every file, and the client
obeys the server, so every file (safetensors included) travels base64-encoded inside the commit. The real Hub
stores large and binary files through Xet instead; that path stays untested here.

Options for tests: `token` (every request must carry `Authorization: Bearer <token>`, else 401),
`fail_commits` (the next N commit requests fail with 500 after the payload was read and the new tree built, and
publish nothing). `requests` logs (method, path, authorized) of every call, `unhandled` the calls with no route.
`HubState.add_folder` publishes a local folder as a commit (base models for loading tests); a `gated` repository
answers file downloads with 403 `GatedRepo` unless the request carries one of its `granted` tokens, as the Hub does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit


GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
DATE = "2026-01-01T00:00:00.000Z"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1", other branches -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0
    gated: bool = False
    granted: set = field(default_factory=set)  # tokens that accepted a gated repo's conditions


class HubState:
    """All repositories, guarded by one lock: a commit either lands whole or not at all."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.fail_commits = 0
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, bool]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._counter = 0

    def new_commit(self, repo: Repo, parent: str | None, message: str, description: str,
                   files: dict[str, bytes]) -> Commit:
        self._counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha1(files[path])}\n".encode())
        return Commit(digest.hexdigest(), parent, message, description, dict(files))

    def add_folder(self, repo_id: str, folder, message: str = "upload", gated: bool = False,
                   files: dict[str, bytes] | None = None) -> str:
        """Publish every file under `folder` (plus `files`) as a new commit on main, creating the repository;
        returns the commit oid. The commit holds exactly these files (and .gitattributes)."""
        content = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
                   if p.is_file()}
        content.update(files or {})
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private=False))
            repo.gated = repo.gated or gated
            parent = repo.refs.get("main")
            commit = self.new_commit(repo, parent, message, "", {".gitattributes": GITATTRIBUTES, **content})
            repo.commits[commit.oid], repo.refs["main"] = commit, commit.oid
        return commit.oid

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        """The commit a revision (branch, refs/pr/N or commit oid) points to; KeyError if unknown."""
        repo = self.repos[repo_id]
        oid = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if oid is None:
            raise KeyError(revision)
        return repo.commits[oid]

    def commits_on(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """The history of a revision, newest first (for assertions)."""
        out, commit = [], self.head(repo_id, revision)
        while commit is not None:
            out.append(commit)
            commit = self.repos[repo_id].commits.get(commit.parent) if commit.parent else None
        return out


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Reply(Exception):
    def __init__(self, status: int, body, headers: dict | None = None):
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, message: str, code: str | None = None) -> _Reply:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _Reply(status, {"error": message}, headers)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every reply carries Content-Length

    def log_message(self, format, *args):  # quiet: tests assert on `state.requests` instead
        pass

    # --- plumbing -----------------------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body, headers: dict | None = None, head_only: bool = False):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        content_type = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(data)

    def _dispatch(self, method: str):
        body = self._body() if method in ("POST", "PUT") else b""
        url = urlsplit(self.path)
        authorized = self.state.token is None or self.headers.get("Authorization") == f"Bearer {self.state.token}"
        with self.state.lock:
            self.state.requests.append((method, url.path, authorized))
        try:
            if not authorized:
                raise _error(401, "Invalid credentials in Authorization header")
            parts = [unquote(p) for p in url.path.split("/")[1:]]  # split before unquoting: refs%2Fpr%2F1 stays one
            status, reply, headers = self._route(method, parts, parse_qs(url.query), body)
        except _Reply as r:
            status, reply, headers = r.status, r.body, r.headers
        self._send(status, reply, headers, head_only=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # --- routes -------------------------------------------------------------------------------------------------
    def _route(self, method: str, parts: list[str], query: dict, body: bytes):
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return 200, {"errors": [], "warnings": []}, {}
        if method == "GET" and parts == ["api", "agent-harnesses"]:  # client telemetry registry: the client
            raise _error(404, "not served by the test Hub")              # ignores a failure (and caches nothing)
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if method == "GET" and not rest:
                return self._model_info(repo_id, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._model_info(repo_id, rest[1])
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), recursive)
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_id, rest[1], json.loads(body or b"{}"), "create_pr" in query)
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_id, rest[1], body, "create_pr" in query)
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self._create_branch(repo_id, rest[1], json.loads(body or b"{}"))
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), method)
        with self.state.lock:
            self.state.unhandled.append((method, self.path))
        raise _error(404, f"no route for {method} {self.path}")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            raise _error(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo_id: str, revision: str) -> Commit:
        self._repo(repo_id)
        try:
            return self.state.head(repo_id, revision)
        except KeyError:
            raise _error(404, f"Invalid rev id: {revision}", "RevisionNotFound") from None

    def _create_repo(self, payload: dict):
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        url = f"{self.server.endpoint}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return 409, {"error": "You already created this model repo", "url": url}, {}
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = Repo(repo_id, private)
            first = self.state.new_commit(repo, None, "initial commit", "", {".gitattributes": GITATTRIBUTES})
            repo.commits[first.oid], repo.refs["main"] = first, first.oid
            self.state.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _create_branch(self, repo_id: str, branch: str, payload: dict):
        with self.state.lock:
            repo = self._repo(repo_id)
            if branch in repo.refs:
                return 409, {"error": f"Reference already exists: refs/heads/{branch}"}, {}
            start = self._commit_at(repo_id, payload.get("startingPoint") or "main")
            repo.refs[branch] = start.oid
        return 200, {}, {}

    def _model_info(self, repo_id: str, revision: str):
        with self.state.lock:
            repo, commit = self._repo(repo_id), self._commit_at(repo_id, revision)
            siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return 200, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                     "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                     "lastModified": DATE, "createdAt": DATE, "siblings": siblings}, {}

    def _tree(self, repo_id: str, revision: str, prefix: str, recursive: bool):
        with self.state.lock:
            files = dict(self._commit_at(repo_id, revision).files)
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, content in sorted(files.items()):
            if not path.startswith(base):
                continue
            rel = path[len(base):].split("/")
            dirs = [base + "/".join(rel[:i]) for i in range(1, len(rel))]
            for d in dirs if recursive else dirs[:1]:
                entries.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                       "size": 0, "path": d})
            if recursive or len(rel) == 1:
                entries[path] = {"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": path}
        if base and not entries:
            raise _error(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        return 200, [entries[k] for k in sorted(entries)], {}

    def _preupload(self, repo_id: str, revision: str, payload: dict, create_pr: bool):
        with self.state.lock:
            self._repo(repo_id)
            try:
                existing = self.state.head(repo_id, revision).files
            except KeyError:
                if not create_pr:
                    raise _error(404, f"Invalid rev id: {revision}", "RevisionNotFound") from None
                existing = {}
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_sha1(existing[f["path"]]) if f["path"] in existing else None}
                 for f in payload.get("files", [])]
        return 200, {"files": files}, {}

    def _commit(self, repo_id: str, revision: str, body: bytes, create_pr: bool):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x.get("key") == "header"), None)
        if header is None:
            raise _error(400, "commit payload has no header line")
        with self.state.lock:
            repo = self._repo(repo_id)
            base = self._commit_at(repo_id, revision)
            if not create_pr and revision not in repo.refs:
                raise _error(400, f"cannot commit onto {revision}: not a branch")
            if header.get("parentCommit") and header["parentCommit"] != base.oid:
                raise _error(412, "A commit has happened since. Please refresh and try again.")
            files = dict(base.files)
            for item in lines:
                key, value = item.get("key"), item.get("value") or {}
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _error(400, f"unsupported encoding {value.get('encoding')!r}")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                elif key != "header":
                    raise _error(400, f"this test Hub does not support {key!r} operations (LFS/Xet/copies)")
            commit = self.state.new_commit(repo, base.oid, header.get("summary", ""), header.get("description", ""),
                                           files)
            if self.state.fail_commits > 0:  # the tree was built, nothing is published: like a failed Hub commit
                self.state.fail_commits -= 1
                raise _error(500, "Internal Error - We're working hard to fix this as soon as possible!")
            repo.commits[commit.oid] = commit
            pr_url = None
            if create_pr:
                repo.prs += 1
                repo.refs[f"refs/pr/{repo.prs}"] = commit.oid
                pr_url = f"{self.server.endpoint}/{repo_id}/discussions/{repo.prs}"
            else:
                repo.refs[revision] = commit.oid
        return 200, {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.server.endpoint}/{repo_id}/commit/"
                     f"{commit.oid}", "pullRequestUrl": pr_url}, {}

    def _resolve(self, repo_id: str, revision: str, path: str, method: str):
        with self.state.lock:
            repo = self._repo(repo_id)
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if repo.gated and token not in repo.granted:
                raise _error(403, f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                             f"Visit {self.server.endpoint}/{repo_id} to ask for access.", "GatedRepo")
            commit = self._commit_at(repo_id, revision)
            content = commit.files.get(path)
        if content is None:
            raise _error(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha1(content)}"', "Accept-Ranges": "bytes"}
        status, data = 200, content
        start = self._range_start()
        if start is not None and method == "GET":
            status, data = 206, content[start:]
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        return status, data, headers

    def _range_start(self) -> int | None:
        value = self.headers.get("Range", "")
        if value.startswith("bytes=") and value.endswith("-"):
            return int(value[len("bytes="):-1])
        return None


def start(token: str | None = None) -> HubServer:
    """Start a server on 127.0.0.1 on a free port, in a daemon thread; stop it with `stop(server)`."""
    server = HubServer(HubState(token))
    threading.Thread(target=server.serve_forever, name="test-hub", daemon=True).start()
    return server


def stop(server: HubServer) -> None:
    server.shutdown()
    server.server_close()


def resolve_url(endpoint: str, repo_id: str, revision: str, path: str) -> str:
    return f"{endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


# --- the hardened exports the tests push and load -------------------------------------------------------------------

REPO_ID = "acme/tiny-hardened"
NEURONS = {  # uneven per head, a whole head gone in the first layer: the compact processor's hard case
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2": [0, 1, 2, 3, 5, 9],
    "mid_block.attentions.0.transformer_blocks.0.attn2": [4, 17, 30],
}


def synthetic_report(layout: str, *, passed: bool = True, publish_prompts: bool = False) -> dict:
    """A report.json following schema 1 of /work/notes/interfaces.md, with made-up measurements."""
    prompts = ["the memorized astronaut portrait", "a second memorized caption"]
    joined = "\n".join(prompts).encode()
    per_layer = {k: len(v) for k, v in NEURONS.items()}
    return {
        "schema": 1, "harden_version": "0.2.0", "created_utc": "2026-11-23T12:00:00Z", "git_commit": None,
        "packages": {"torch": "test", "diffusers": "test"},
        "recipe_sha256": hashlib.sha256(b"recipe: test\n").hexdigest(),
        "recipe": {"hub": {"license": "apache-2.0", "repo_id": REPO_ID}},
        "base_model": {"id": "acme/tiny-base", "revision": None, "license": None},
        "layout": layout,
        "memorized_prompts": {"count": len(prompts), "sha256": hashlib.sha256(joined).hexdigest(),
                              "detected": 2, "not_reproducing": 0},
        "publish_prompts": publish_prompts,
        "thresholds": {"tau_mem": 1.2, "seed_threshold": 0.428, "tau_initial": 0.428, "tau_refine": 0.428},
        "neurons": {"total": sum(per_layer.values()), "per_layer": per_layer,
                    "layers_total": {k: 32 for k in NEURONS}},
        "prompts": [{"index": i, "sha256": hashlib.sha256(p.encode()).hexdigest(), "detect_score": 3.5,
                     "memorized": True, "neurons": 4, "score_after": 0.2, **({"prompt": p} if publish_prompts else {})}
                    for i, p in enumerate(prompts)],
        "verification": {"rows": [
            {"metric": "memorization score (memorized prompts, mean)", "before": 3.5, "after": 0.2, "control": 3.4,
             "better": "lower"},
            {"metric": "CLIP score (held-out prompts, mean)", "before": 0.31, "after": 0.30, "control": 0.31,
             "better": "higher"}]},
        "gates": [{"name": "memorization removed", "metric": "memorization score (memorized prompts, mean)",
                   "op": "<=", "threshold": 0.428, "value": 0.2 if passed else 0.9, "passed": passed},
                  {"name": "quality kept", "metric": "CLIP score (held-out prompts, mean)", "op": ">=",
                   "threshold": 0.25, "value": 0.30, "passed": True}],
        "passed": passed,
        "timings_s": {"detect": 1.0}, "seeds": {"detect": 0},
    }


def build_exports(root, layouts=("compact", "dense")) -> dict:
    """Tiny pipeline -> prune -> export folders with card and report, like `harden run` does. Returns
    {"pipe": pipe, "unets": {layout: pruned UNet}, "folders": {layout: Path}}."""
    import torch

    from harden.card import write_card
    from harden.checkpoint import save_pipeline
    from harden.files import file_hashes
    from harden.neurons import NeuronSet
    from harden.prune import prune_compact, prune_dense
    from harden.tiny import tiny_pipeline

    torch.manual_seed(0)
    pipe = tiny_pipeline(seed=0, sample_size=32)
    neurons = NeuronSet({k: tuple(v) for k, v in NEURONS.items()})
    unets = {"compact": prune_compact(pipe.unet, neurons), "dense": prune_dense(pipe.unet, neurons)}
    folders = {}
    for layout in layouts:
        folder = Path(root) / "export" / layout
        save_pipeline(pipe, unets[layout], folder, layout)
        (folder / "harden").mkdir()
        (folder / "harden" / "neurons.json").write_text(json.dumps({"layers": NEURONS, "count": 9}))
        (folder / "harden" / "recipe.yaml").write_text("recipe: test\n")
        report = synthetic_report(layout)
        write_card(folder, report, None)
        report["files"] = file_hashes(folder, exclude={"README.md", "harden/report.json"})
        (folder / "harden" / "report.json").write_text(json.dumps(report, indent=2))
        folders[layout] = folder
    return {"pipe": pipe, "unets": unets, "folders": folders}


def unet_output(unet, seed: int = 0):
    """A fixed UNet forward on CPU, to compare loaded models with the in-memory pruned ones."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 32, 32, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=ctx).sample


# --- test plumbing: `serve` backs the `hub` fixture of test_hub.py / test_loading.py ---------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
_EXPORTS: dict = {}
_GUARD = '''
import socket
_real = socket.getaddrinfo
def _local_only(host, *args, **kwargs):
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise OSError(f"test network guard: {host} is not the test Hub")
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _local_only
'''


def shared_exports() -> dict:
    """`build_exports` once per test process (about 5 s); tests copy the folders before changing anything."""
    if not _EXPORTS:
        root = Path(tempfile.mkdtemp(prefix="harden-hub-tests-"))
        import atexit

        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _EXPORTS.update(build_exports(root), root=root)
        _EXPORTS["outputs"] = {layout: unet_output(unet) for layout, unet in _EXPORTS["unets"].items()}
    return _EXPORTS


def local_network_only(monkeypatch):
    """Any name lookup other than the loopback fails: no test can reach huggingface.co, even by mistake."""
    import socket

    real = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"test network guard: {host} is not the test Hub")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)


def serve(monkeypatch, tmp_path):
    """Generator for a `hub` fixture (`yield from serve(monkeypatch, tmp_path)`): a fresh test Hub, with this
    process's huggingface_hub pointed at it and every other host unreachable.

    In process, huggingface_hub has already read HF_ENDPOINT, HF_HUB_OFFLINE (set by conftest) and the token paths at
    import, so besides the environment (which harden reads when pushing) the copies in `huggingface_hub.constants`
    that the client consults at call time are patched: ENDPOINT, HUGGINGFACE_CO_URL_TEMPLATE, HF_HUB_OFFLINE,
    HF_TOKEN_PATH, HF_STORED_TOKENS_PATH (so a token saved by `hf auth login` on this machine is never used).
    """
    from huggingface_hub import constants, hf_api

    local_network_only(monkeypatch)
    server = start()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.api, "endpoint", server.endpoint)  # behind huggingface_hub.model_info & co
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    yield server
    stop(server)


def subprocess_env(server: HubServer, home: Path, token: str | None = None) -> dict:
    """Environment for a child process (the `hf` CLI, a loading script): huggingface_hub reads HF_ENDPOINT at
    import there, HF_HOME is private to the test, and a sitecustomize refuses every host but the loopback."""
    guard = home / "guard"
    guard.mkdir(parents=True, exist_ok=True)
    (guard / "sitecustomize.py").write_text(_GUARD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_")) and
           k not in ("TRANSFORMERS_OFFLINE", "PYTHONPATH")}
    env.update(HF_ENDPOINT=server.endpoint, HF_HOME=str(home / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=os.pathsep.join([str(guard), str(REPO_ROOT)]),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if token:
        env["HF_TOKEN"] = token
    return env


def python() -> str:
    return sys.executable

"""A loopback Hugging Face hub for the tests: a small HTTP server on 127.0.0.1 that answers the
requests ``huggingface_hub`` (and through it open_clip and transformers) makes to download files.

Point ``HF_ENDPOINT`` at `LoopbackHub.url` (and ``HF_HOME`` at a private folder) and the real
download code runs against it, without internet. What it implements, as the hub does:

* ``HEAD|GET /<repo>/resolve/<revision>/<path>`` (models) and ``/datasets/<repo>/resolve/...``:
  a regular file answers 200 with ``ETag`` (its git blob id), ``Content-Length`` and
  ``X-Repo-Commit``; a large file (LFS: archives and weights) answers 302 to a CDN address with
  ``X-Linked-Etag`` (its SHA-256), ``X-Linked-Size`` and ``X-Repo-Commit``. A missing repository,
  revision or file is a 404 with the hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``), which huggingface_hub turns into its typed errors.
* ``GET|HEAD /cdn/<sha256>?...`` on a second port (another origin, as the real CDN, so that
  huggingface_hub does not follow the redirect of a HEAD): the LFS content, with ``Range``
  requests (206, ``Content-Range``), which is what a resumed download sends.
* ``GET /api/<models|datasets>/<repo>[/revision/<revision>]``: the repository's info (``sha``,
  ``siblings``), which ``snapshot_download`` asks first.
* ``GET /api/<models|datasets>/<repo>/tree/<revision>[/<path>]``: the file listing
  (``list_repo_files``, ``snapshot_download``; transformers lists a tokenizer's repository), with
  ``lfs.oid`` for the large files.
* ``GET /api/agent-harnesses``: a registry huggingface_hub fetches (at most daily) for its
  user-agent header unless ``HF_HUB_DISABLE_TELEMETRY`` is set; served empty.

Anything else is a 404 and is recorded in `LoopbackHub.unknown`, so a test can assert that the
libraries asked for nothing the server does not implement. `LoopbackHub.fail` injects faults
(404, 500, a truncated body, wrong bytes, an impossible size) for one file.

The server runs in a daemon thread, each connection times out after `SOCKET_TIMEOUT` seconds and
the whole server shuts itself down after ``lifetime`` seconds, so a test can never hang on it.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

SOCKET_TIMEOUT = 20
#: Files served through the LFS path (redirect to the CDN, SHA-256 ETag), as the hub stores them.
LFS_SUFFIXES = (".zip", ".bin", ".safetensors", ".pth", ".pt", ".msgpack")
FAULTS = ("404", "500", "500-cdn", "truncate", "corrupt", "huge")
AGENT_REGISTRY = "/api/agent-harnesses"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_type: str  # "model" or "dataset"
    repo_id: str
    files: dict[str, bytes]
    sha: str = ""

    def __post_init__(self):
        if not self.sha:
            digest = hashlib.sha1()
            for path in sorted(self.files):
                digest.update(path.encode() + git_blob_id(self.files[path]).encode())
            self.sha = digest.hexdigest()

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)


@dataclass
class Fault:
    kind: str
    times: int | None = None  # None: every time

    def use(self) -> bool:
        if self.times is None:
            return True
        if self.times <= 0:
            return False
        self.times -= 1
        return True


@dataclass
class LoopbackHub:
    """The server. ``with LoopbackHub() as hub: hub.add(...); ... hub.url``."""

    lifetime: float = 600.0
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, range)
    unknown: list[str] = field(default_factory=list)

    # ----------------------------------------------------------------------------- content
    def add(self, repo_type: str, repo_id: str, files: dict[str, bytes]) -> Repo:
        repo = Repo(repo_type, repo_id, dict(files))
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def add_folder(self, repo_type: str, repo_id: str, folder: Path, names: list[str]) -> Repo:
        return self.add(repo_type, repo_id, {name: (Path(folder) / name).read_bytes() for name in names})

    def fail(self, path: str, kind: str, times: int | None = None) -> None:
        """Make the requests for the file ``path`` (its name in the repository, or ``<repo id>/<name>``
        for one repository's) fail as ``kind`` (one of `FAULTS`), ``times`` times (default: always).
        Faults of one file are used in the order they were added: ``fail(p, "truncate", 1);
        fail(p, "500-cdn")`` cuts the first transfer and refuses the rest."""
        assert kind in FAULTS, kind
        self.faults.setdefault(path, []).append(Fault(kind, times))

    def clear(self) -> None:
        self.faults.clear()
        self.requests.clear()
        self.unknown.clear()

    def _fault(self, repo: Repo, path: str, *kinds: str) -> str | None:
        for fault in self.faults.get(f"{repo.repo_id}/{path}", self.faults.get(path, [])):
            if fault.kind in kinds and fault.use():
                return fault.kind
        return None

    def _signed(self, digest: str, repo: Repo, name: str) -> str:
        """The CDN address of an LFS file (the real ones are signed URLs naming the object)."""
        return f"{self.cdn_url}/cdn/{digest}?{quote(repo.repo_type)}={quote(repo.repo_id)}&file={quote(name)}"

    def _object(self, digest: str, query: str) -> tuple[Repo, str] | None:
        fields = {key: values[0] for key, values in parse_qs(query).items()}
        for (repo_type, repo_id), repo in self.repos.items():
            name = fields.get("file", "")
            if fields.get(repo_type) == repo_id and name in repo.files \
                    and hashlib.sha256(repo.files[name]).hexdigest() == digest:
                return repo, name
        return None

    # ------------------------------------------------------------------------------ server
    def __enter__(self) -> "LoopbackHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        # Two origins, as on the real service: the hub (API, resolve) and the CDN that serves the
        # large files (huggingface_hub follows a redirect to another origin only for the download).
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        self.url, self.cdn_url = (f"http://127.0.0.1:{server.server_address[1]}" for server in self._servers)
        self._threads = []
        for server in self._servers:
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._timer = threading.Timer(self.lifetime, self._shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def _shutdown(self) -> None:
        for server in self._servers:
            server.shutdown()

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._shutdown()
        for server, thread in zip(self._servers, self._threads):
            server.server_close()
            thread.join(timeout=5)

    def env(self, hf_home: Path, **extra: str) -> dict[str, str]:
        """The environment variables of a process that downloads from this hub into ``hf_home``
        (what a user's shell would have, with HF_ENDPOINT pointing here)."""
        return {"HF_ENDPOINT": self.url, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **extra}


_RESOLVE = re.compile(r"^/(?:(?P<kind>datasets|models)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)"
                  r"(?:/revision/(?P<rev>[^/]+)|/tree/(?P<tree_rev>[^/]+)(?:/(?P<tree_path>.*))?)?$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT

    def log_message(self, format, *args):  # quiet
        pass

    # ------------------------------------------------------------------------------ replies
    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, value, headers: dict | None = None):
        self._reply(200, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str, repo: Repo | None = None):
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if repo is not None:
            headers["X-Repo-Commit"] = repo.sha
        self._reply(status, json.dumps({"error": message}).encode(), headers)

    def _repo(self, kind: str | None, repo_id: str, revision: str) -> Repo | None:
        repo_type = "dataset" if kind == "datasets" else "model"
        repo = self.hub.repos.get((repo_type, unquote(repo_id)))
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if unquote(revision) not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    # ----------------------------------------------------------------------------- routing
    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def _route(self):
        path = urlsplit(self.path).path
        self.hub.requests.append((self.command, path, self.headers.get("Range", "")))
        if match := _CDN.match(path):
            return self._cdn(match["sha"], urlsplit(self.path).query)
        if path == AGENT_REGISTRY:
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if match := _API.match(path):
            return self._api(match)
        if match := _RESOLVE.match(path):
            return self._resolve(match)
        self.hub.unknown.append(f"{self.command} {self.path}")
        self._error(404, None, "not served by the loopback hub")

    def _resolve(self, match: re.Match):
        repo = self._repo(match["kind"], match["repo"], match["rev"])
        if repo is None:
            return
        name = unquote(match["path"])
        fault = self.hub._fault(repo, name, "404", "500", "huge")
        if fault == "500":
            return self._error(500, None, "Internal Error", repo)
        if name not in repo.files or fault == "404":
            return self._error(404, "EntryNotFound", f"Entry not found: {name}", repo)
        data = repo.files[name]
        headers = {"X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
        if repo.is_lfs(name):
            digest = hashlib.sha256(data).hexdigest()
            size = 2 ** 50 if fault == "huge" else len(data)
            headers.update({"ETag": f'"{git_blob_id(data)}"', "X-Linked-Etag": f'"{digest}"',
                            "X-Linked-Size": size, "Location": self.hub._signed(digest, repo, name)})
            return self._reply(302, b"", headers)
        headers["ETag"] = f'"{git_blob_id(data)}"'
        self._reply(200, data, headers)

    def _cdn(self, digest: str, query: str):
        found = self.hub._object(digest, query)
        if found is None:
            self.hub.unknown.append(f"{self.command} {self.path}")
            return self._error(404, None, "no such object")
        repo, name = found
        data = repo.files[name]
        fault = self.hub._fault(repo, name, "500-cdn", "truncate", "corrupt") if self.command == "GET" else None
        if fault == "500-cdn":
            return self._error(500, None, "Internal Error")
        if fault == "corrupt":
            data = bytes(b ^ 0x5A for b in data[:64]) + data[64:]
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = int(match[1])
        body = data[start:]
        headers = {"ETag": f'"{digest}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if fault == "truncate":  # announce everything, send half, hang up
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:max(1, len(body) // 2)])
            self.wfile.flush()
            self.close_connection = True
            return
        self._reply(status, body, headers)

    def _api(self, match: re.Match):
        revision = match["rev"] or match["tree_rev"] or "main"
        repo = self._repo(match["kind"], match["repo"], revision)
        if repo is None:
            return
        if match["tree_rev"] is None:  # repository info
            return self._json({"id": repo.repo_id, "_id": repo.sha[:24], "sha": repo.sha, "private": False,
                               "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                               "author": repo.repo_id.split("/")[0], "lastModified": "2024-01-01T00:00:00.000Z",
                               "siblings": [{"rfilename": path} for path in sorted(repo.files)]})
        prefix = unquote(match["tree_path"] or "").strip("/")
        if prefix and not any(path.startswith(prefix + "/") for path in repo.files):
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on {revision}", repo)
        entries, folders = [], set()
        for path in sorted(repo.files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            data = repo.files[path]
            parts = path.split("/")
            for depth in range(1, len(parts)):
                folders.add("/".join(parts[:depth]))
            entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
            if repo.is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": folder} for folder in sorted(folders)
                    if not prefix or folder.startswith(prefix + "/")]
        self._json(entries)


# --------------------------------------------------------------------------------- content builders
#: The repositories the default backbone comes from: BiomedCLIP's own (open_clip config, weights,
#: tokenizer files, as README "Offline use" lists them) and its text tower's, which open_clip asks
#: for the BERT configuration and transformers for the tokenizer.
BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_REPO = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
BIOMEDCLIP_FILES = ["open_clip_config.json", "open_clip_pytorch_model.bin", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.txt"]
BIOMEDBERT_FILES = ["config.json", "vocab.txt"]
BENCHMARK_REPO = "TahaKoleilat/BiomedCoOp"


def tiny_biomedclip(folder: Path) -> Path:
    """A BiomedCLIP-shaped model in ``folder``: an ``open_clip_config.json`` with the real file's keys
    and the real text tower id (`BIOMEDBERT_REPO`), tiny values (timm's own ``test_vit``, a 2-layer
    BERT of width 32), seeded random weights, the tokenizer files. Generated by the demo's writer."""
    from dpt_lightning.demo.models import TINY_RECIPE, write_model_dir

    recipe = {**TINY_RECIPE, "vision": {**TINY_RECIPE["vision"], "timm_model_name": "test_vit"},
              "bert": {**TINY_RECIPE["bert"], "num_hidden_layers": 2}}
    write_model_dir(folder, recipe, BIOMEDBERT_REPO)
    specials = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
                "unk_token": "[UNK]"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return folder


def serve_biomedclip(hub: LoopbackHub, folder: Path) -> None:
    """Serve a `tiny_biomedclip` folder under the real repository ids."""
    hub.add_folder("model", BIOMEDCLIP_REPO, folder, BIOMEDCLIP_FILES)
    hub.add_folder("model", BIOMEDBERT_REPO, folder, BIOMEDBERT_FILES)


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    """The files under ``folder`` as a zip archive, each named ``prefix + <path relative to folder>``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return buffer.getvalue()


def benchmark_zip(name: str, workdir: Path, nested: bool = True) -> bytes:
    """A small archive of the benchmark dataset ``name`` (real class names, label order, folder and
    file naming, generated images: `fakedata`) in the layout the benchmark's zips unpack to:
    ``<DIR>/<DIR>/<class>/...`` and ``<DIR>/split_<DIR>.json``; ``nested=False`` leaves out the
    top folder (``<DIR>/<class>/...`` and ``split_<DIR>.json``)."""
    from fakedata import write_fake_dataset

    write_fake_dataset(workdir, name)
    return zip_folder(workdir if nested else workdir / name)

"""A fake of the Hugging Face Hub's HTTP API: the endpoints huggingface_hub (2.x) uses to create a repo, look
at it and commit files to it over the legacy LFS protocol (run the client with HF_HUB_DISABLE_XET=1).

    POST /api/repos/create                         create_repo
    GET  /api/{models,datasets,spaces}/<id>[/revision/<rev>]      repo_info, repo_exists
    GET  /api/<type>s/<id>/tree/<rev>[/<path>]     list_repo_tree (recursive or not, one page)
    POST /api/validate-yaml                        README.md metadata check made by create_commit
    POST /api/<type>s/<id>/preupload/<rev>         upload mode (regular or lfs) and the remote oid of each file
    POST /[<type>s/]<id>.git/info/lfs/objects/batch   LFS batch: where to PUT each object not stored yet
    PUT  /_lfs/<sha256>                            the LFS object itself (checked against its sha256)
    POST /api/<type>s/<id>/commit/<rev>            the ndjson commit (header, file, lfsFile, deletedFile)
    GET  /api/whoami-v2                            whoami: the token's user, orgs and role
    GET  /api/<type>s/<id>/auth-check              auth_check: readable (200), gated without access (403 GatedRepo)
    HEAD, GET /[<type>s/]<id>/resolve/<rev>/<path> file metadata and download (hf_hub_download, snapshot_download)

Tokens map to the namespaces they may write to (`roles` may make a token read-only); a missing or unknown
token gets 401, writing elsewhere 403,
a private repo of another namespace reads as 404 (as on the Hub). `fail(...)` makes chosen requests answer an
error status, drop the connection (before or after doing the work), or stall. Started on 127.0.0.1 with an ephemeral port, one thread a request.

LocalHub (at the end) is the same Hub one level up, for tests of infra.logs that monkeypatch huggingface_hub's
HfApi and snapshot_download instead of pointing HF_ENDPOINT at FakeHub: a folder per dataset repo.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg", ".gguf", ".parquet")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": len(self.content)}
        if self.lfs:
            sha = hashlib.sha256(self.content).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(self.content)}\n".encode()
            entry.update(oid=git_sha1(pointer), lfs={"oid": sha, "size": len(self.content), "pointerSize": len(pointer)})
        else:
            entry["oid"] = git_sha1(self.content)
        return entry

    @property
    def preupload_oid(self) -> str:
        # What huggingface_hub compares with its local oid: sha256 for LFS files, git blob sha1 otherwise.
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_sha1(self.content)


@dataclass
class Commit:
    oid: str
    message: str
    paths: list[str]  # what the commit changed (as git's diff shows it: a file sent again unchanged is not in it)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    files: dict[str, StoredFile] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1].oid

    def commit(self, message: str, changes: dict[str, StoredFile | None]) -> Commit:
        changed = sorted(path for path, stored in changes.items() if self.files.get(path) != stored)
        for path, stored in changes.items():
            if stored is None:
                self.files.pop(path, None)
            else:
                self.files[path] = stored
        parent = self.commits[-1].oid if self.commits else ""
        oid = hashlib.sha1(f"{parent}\n{message}\n{sorted(changes)}\n{len(self.commits)}".encode()).hexdigest()
        self.commits.append(Commit(oid, message, changed))
        return self.commits[-1]


@dataclass
class FailureRule:
    method: str
    path_pattern: re.Pattern
    # an HTTP status; "drop": close without answering; "lose_answer": do the work, then close without answering;
    # "stall": sleep stall_s, then answer
    action: int | str
    times: int
    stall_s: float = 0.0


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class FakeHub:
    def __init__(self, tokens: dict[str, list[str]], names_unique_across_types: bool = True,
                 roles: dict[str, str] | None = None):
        self.tokens = tokens  # token → namespaces it may write to (the first is its user)
        self.roles = roles or {}  # token → its role as whoami reports it (default "write"); "read" may not write
        # The Hub refuses a model repo whose name a dataset or Space of the same owner already has (409).
        self.names_unique_across_types = names_unique_across_types
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path): what the client asked, in order
        self.validated_readmes: list[str] = []
        self.rules: list[FailureRule] = []
        self.gated: dict[tuple[str, str], set[str]] = {}  # (type, id) of a gated repo -> tokens granted access
        self.lock = threading.RLock()
        self.server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- test helpers

    def add_repo(self, repo_id: str, repo_type: str = "model", private: bool = True,
                 files: dict[str, bytes] | None = None) -> Repo:
        with self.lock:
            repo = Repo(repo_type, repo_id, private)
            repo.commit("initial commit", {".gitattributes": StoredFile(GITATTRIBUTES, False)})
            if files:
                repo.commit("add files", {p: StoredFile(c, self._is_lfs(p, c)) for p, c in files.items()})
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def fail(self, method: str, path_regex: str, action: int | str, times: int = 1, stall_s: float = 0.0) -> None:
        self.rules.append(FailureRule(method, re.compile(path_regex), action, times, stall_s))

    def count(self, method: str, path_regex: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(path_regex, p))

    # ---- the API

    def _is_lfs(self, path: str, content_or_sample: bytes, size: int | None = None) -> bool:
        size = len(content_or_sample) if size is None else size
        return path.endswith(LFS_SUFFIXES) or size >= 10_000_000 or b"\0" in content_or_sample[:512]

    def _user(self, headers) -> tuple[str, list[str]]:
        auth = headers.get("authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token, self.tokens[token]

    def _readable(self, repo_type: str, repo_id: str, headers) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        namespaces: list[str] = []
        try:
            namespaces = self._user(headers)[1]
        except HubError:
            pass
        if repo is None or (repo.private and repo_id.split("/")[0] not in namespaces):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _writable(self, repo_type: str, repo_id: str, headers) -> Repo:
        token, namespaces = self._user(headers)
        if self.roles.get(token, "write") == "read":
            raise HubError(403, "This token is read-only")
        repo = self._readable(repo_type, repo_id, headers)
        if repo_id.split("/")[0] not in namespaces:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def handle(self, method: str, path: str, query: dict, headers, body: bytes):
        """(status, json or bytes, extra headers)."""
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(headers, json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self.validate_yaml(json.loads(body))
        if method == "GET" and path == "/api/whoami-v2":
            return self.whoami(headers)
        resolve = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if method in ("GET", "HEAD") and (m := resolve):
            repo_type = TYPES[m.group(1)] if m.group(1) else "model"
            return self.resolve(self._readable(repo_type, m.group(2), headers), m.group(4), method)
        if method == "PUT" and (m := re.fullmatch(r"/_lfs/([0-9a-f]{64})", path)):
            return self.store_lfs_object(m.group(1), body)
        if method == "POST" and (m := re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)):
            repo_type = TYPES[m.group(1)] if m.group(1) else "model"
            return self.lfs_batch(self._writable(repo_type, m.group(2), headers), json.loads(body))
        if method == "GET" and (m := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/auth-check", path)):
            return self.auth_check(TYPES[m.group(1)], m.group(2), headers)
        m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+?)(?:/(revision|tree|preupload|commit)/([^/]+)(/.*)?)?", path)
        if not m:
            raise HubError(404, f"no such endpoint: {method} {path}")
        repo_type, repo_id, kind, sub = TYPES[m.group(1)], m.group(2), m.group(3), m.group(5)  # one branch: main
        if method == "GET" and kind in (None, "revision"):
            return self.repo_info(self._readable(repo_type, repo_id, headers))
        if method == "GET" and kind == "tree":
            return self.tree(self._readable(repo_type, repo_id, headers), (sub or "").strip("/"),
                             query.get("recursive", ["False"])[0].lower() == "true")
        if method == "POST" and kind == "preupload":
            return self.preupload(self._writable(repo_type, repo_id, headers), json.loads(body))
        if method == "POST" and kind == "commit":
            return self.commit(self._writable(repo_type, repo_id, headers), body)
        raise HubError(404, f"no such endpoint: {method} {path}")

    def create_repo(self, headers, payload: dict):
        token, namespaces = self._user(headers)
        if self.roles.get(token, "write") == "read":
            raise HubError(403, "This token is read-only")
        namespace = payload.get("organization") or namespaces[0]
        repo_id = f"{namespace}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        if namespace not in namespaces:
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace \"{namespace}\"")
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo",
                           url=f"{self.url}/{PREFIX[repo_type]}{repo_id}")
        if self.names_unique_across_types and any(rid == repo_id for _, rid in self.repos):
            raise HubError(409, f"A repo named {repo_id} already exists")
        private = payload.get("private") is True or payload.get("visibility") == "private"
        self.add_repo(repo_id, repo_type, private=private)
        return 200, {"url": f"{self.url}/{PREFIX[repo_type]}{repo_id}", "name": repo_id}, {}

    def auth_check(self, repo_type: str, repo_id: str, headers):
        self._readable(repo_type, repo_id, headers)
        granted = self.gated.get((repo_type, repo_id))
        if granted is not None:
            auth = headers.get("authorization") or ""
            if auth.removeprefix("Bearer ") not in granted:
                raise HubError(403, f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized "
                               "list", code="GatedRepo")
        return 200, {}, {}

    def whoami(self, headers):
        token, namespaces = self._user(headers)
        orgs = [{"name": name, "roleInOrg": "write"} for name in namespaces[1:]]
        return 200, {"type": "user", "name": namespaces[0], "orgs": orgs,
                     "auth": {"type": "access_token",
                              "accessToken": {"displayName": "test", "role": self.roles.get(token, "write")}}}, {}

    def resolve(self, repo: Repo, path: str, method: str):
        stored = repo.files.get(path)
        if stored is None:
            raise HubError(404, f"{path} not found", code="EntryNotFound")
        etag = f'"{hashlib.sha256(stored.content).hexdigest() if stored.lfs else git_sha1(stored.content)}"'
        headers = {"ETag": etag, "X-Repo-Commit": repo.sha, "Content-Type": "application/octet-stream"}
        if stored.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(stored.content))})
        headers["X-Content-Length"] = str(len(stored.content))  # what Content-Length says, HEAD or GET
        return 200, (b"" if method == "HEAD" else stored.content), headers

    def repo_info(self, repo: Repo):
        return 200, {"id": repo.repo_id, "sha": repo.sha, "private": repo.private,
                     "siblings": [{"rfilename": p} for p in sorted(repo.files)]}, {}

    def tree(self, repo: Repo, under: str, recursive: bool):
        entries, folders = [], set()
        for path in sorted(repo.files):
            if under and not path.startswith(under + "/"):
                continue
            rest = path[len(under) + 1:] if under else path
            parts = rest.split("/")
            prefix = (under + "/") if under else ""
            if recursive:
                for i in range(1, len(parts)):
                    folders.add(prefix + "/".join(parts[:i]))
                entries.append(repo.files[path].tree_entry(path))
            elif len(parts) > 1:
                folders.add(prefix + parts[0])
            else:
                entries.append(repo.files[path].tree_entry(path))
        entries += [{"type": "directory", "path": f, "oid": git_sha1(f.encode())} for f in sorted(folders)]
        return 200, entries, {}

    def validate_yaml(self, payload: dict):
        content = payload.get("content", "")
        self.validated_readmes.append(content)
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}, {}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def preupload(self, repo: Repo, payload: dict):
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            stored = repo.files.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if self._is_lfs(f["path"], sample, f["size"]) else "regular",
                          "shouldIgnore": False, "oid": stored.preupload_oid if stored else None})
        return 200, {"files": files}, {}

    def lfs_batch(self, repo: Repo, payload: dict):
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def store_lfs_object(self, oid: str, body: bytes):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "content does not match its oid")
        self.lfs_objects[oid] = body
        return 200, {}, {}

    def commit(self, repo: Repo, body: bytes):
        summary, changes = "", {}
        for line in body.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                content = base64.b64decode(value["content"])
                changes[value["path"]] = StoredFile(content, False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = StoredFile(self.lfs_objects[value["oid"]], True)
            elif key in ("deletedFile", "deletedFolder"):
                changes[value["path"]] = None
            else:
                raise HubError(400, f"unknown commit operation {key}")
        if not summary:
            raise HubError(400, "commit summary is required")
        commit = repo.commit(summary, changes)
        return 200, {"commitUrl": f"{self.url}/{PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}",
                     "commitOid": commit.oid, "pullRequestUrl": None}, {}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that hung up is no news
            super().handle_error(request, client_address)


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: and a request log must never hold a header
            pass

        def _body(self) -> bytes:
            if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("content-length") or 0))

        def _send(self, status: int, payload, extra: dict) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            length = extra.pop("X-Content-Length", None) or str(len(data))  # a HEAD answer: the length of the GET's
            self.send_response(status)
            self.send_header("Content-Type", extra.pop("Content-Type", "application/json"))
            for key, value in extra.items():
                self.send_header(key, value)
            self.send_header("Content-Length", length)
            try:
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a stalled request timed out)
                self.close_connection = True

        def _serve(self, method: str) -> None:
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), parse_qs(parts.query)
            body = self._body()
            with hub.lock:
                hub.requests.append((method, path))
                rule = next((r for r in hub.rules if r.times > 0 and r.method == method and r.path_pattern.search(path)), None)
                if rule:
                    rule.times -= 1
            if rule and rule.action == "drop":
                self._hang_up()
                return
            if rule and rule.action == "stall":
                time.sleep(rule.stall_s)
            elif rule and rule.action != "lose_answer":
                self._send(int(rule.action), {"error": "injected failure"}, {"X-Error-Message": "injected failure"})
                return
            try:
                with hub.lock:
                    status, payload, extra = hub.handle(method, path, query, self.headers, body)
            except HubError as err:
                extra = {"X-Error-Message": err.message}
                if err.code:
                    extra["X-Error-Code"] = err.code
                status, payload = err.status, {"error": err.message, **err.body}
            if rule and rule.action == "lose_answer":
                self._hang_up()
                return
            self._send(status, payload, extra)

        def _hang_up(self) -> None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

        def do_HEAD(self):
            self._serve("HEAD")

    return Handler


# --- the Hub at the level of huggingface_hub's calls (monkeypatched in): infra.logs's uploads and reads ----------


class LocalHub:
    """A folder standing in for Hub datasets: the huggingface_hub calls infra makes (infra.logs, infra.hub_checks),
    nothing more.

        hub = LocalHub(tmp_path / "hub").install(monkeypatch)
    """

    def __init__(self, root: Path, user: str = "someone", role: str = "write"):
        self.root = root
        self.user, self.role = user, role  # whoami's answer for any token (role: write, read, fineGrained)
        self.private: dict[str, bool] = {}  # repo id -> created private
        self.tokens: list[str | None] = []  # every token a call was made with
        self.offline = False  # every call fails as without network
        self.rejects_token = False  # whoami answers 401
        self.unreadable: dict[str, str] = {}  # model/dataset id -> "missing" or "gated" (auth_check); others readable

    def install(self, monkeypatch) -> "LocalHub":
        """Every huggingface_hub call of infra's answered by this hub, for the test's duration."""
        from infra import hub_checks, logs

        monkeypatch.setattr(logs, "HfApi", self.client)
        monkeypatch.setattr(logs, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(hub_checks, "HfApi", self.client)
        return self

    def client(self, token: str | None = None) -> "LocalHub._Client":
        return LocalHub._Client(self, token)

    def _enter(self, token: str | None) -> None:
        if self.offline:
            raise ConnectionError("the Hub cannot be reached")
        self.tokens.append(token)

    def _missing(self, repo_id: str) -> RepositoryNotFoundError:
        return RepositoryNotFoundError(f"404: {repo_id}", response=_response(404, f"api/datasets/{repo_id}"))

    def snapshot_download(self, repo_id, *, repo_type=None, allow_patterns=None, local_dir=None, token=None, **_):
        self._enter(token)
        assert repo_type == "dataset"
        repo = self.root / repo_id
        if repo_id not in self.private:
            raise self._missing(repo_id)
        names = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(repo / name, target)
        return str(local_dir)

    class _Client:
        def __init__(self, hub: "LocalHub", token: str | None):
            self.hub, self.token = hub, token

        def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **_):
            self.hub._enter(self.token)
            assert repo_type == "dataset"
            self.hub.private.setdefault(repo_id, bool(private))

        def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, repo_type=None, allow_patterns=None,
                          **_):
            self.hub._enter(self.token)
            assert repo_type == "dataset" and repo_id in self.hub.private
            folder = Path(folder_path)
            names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
            for name in filter_repo_objects(names, allow_patterns=allow_patterns):
                target = self.hub.root / repo_id / (path_in_repo or "") / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, target)

        def whoami(self):
            self.hub._enter(self.token)
            if self.hub.rejects_token:
                raise HfHubHTTPError("401 Unauthorized", response=_response(401, "api/whoami-v2"))
            return {"type": "user", "name": self.hub.user, "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "t", "role": self.hub.role}}}

        def auth_check(self, repo_id, *, repo_type=None, **_):
            self.hub._enter(self.token)
            kind = self.hub.unreadable.get(repo_id)
            if kind == "gated":
                raise GatedRepoError(f"403: {repo_id} is gated", response=_response(403, f"api/models/{repo_id}"))
            if kind == "missing":
                raise self.hub._missing(repo_id)

        def list_repo_files(self, repo_id, *, repo_type=None, **_):
            self.hub._enter(self.token)
            if repo_id not in self.hub.private:
                raise self.hub._missing(repo_id)
            repo = self.hub.root / repo_id
            return sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())


def _response(status: int, path: str):
    try:
        import httpx2 as http  # huggingface_hub 2.x's HTTP client
    except ImportError:
        try:
            import httpx as http
        except ImportError:  # huggingface_hub 0.x: requests
            import requests

            response = requests.Response()
            response.status_code, response.url = status, f"https://huggingface.co/{path}"
            return response
    return http.Response(status, request=http.Request("GET", f"https://huggingface.co/{path}"))

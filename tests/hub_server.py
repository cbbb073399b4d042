"""A Hugging Face Hub compatible HTTP server on 127.0.0.1 for the push and download tests.

It implements the endpoints that `huggingface_hub` (2.x, without `hf_xet`) and transformers'
`from_pretrained` call: whoami, repo creation, branches, preupload, the Git LFS batch API with
basic transfers, ndjson commits (also as pull requests), repo info and refs, the file tree and
file resolution (HEAD and GET, with the `X-Repo-Commit`, `ETag`, `X-Linked-Etag` and
`X-Linked-Size` headers that `hf_hub_download` reads). State lives in memory.

A commit applies all of its operations or none, so an injected failure (`fail_next`) leaves
the repository as it was. Start it with `HubServer()`, read `.endpoint`, call `.stop()`.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER_NAME = "tester"
# Files stored through Git LFS, as the Hub's default .gitattributes does for weights.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
LFS_MIN_SIZE = 10 * 1024 * 1024


@dataclass
class StoredFile:
    content: bytes | None = None  # regular file
    lfs_oid: str | None = None  # sha256 of an LFS object


@dataclass
class Commit:
    oid: str
    message: str
    files: dict


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict = field(default_factory=dict)  # name -> list[Commit], newest last
    pull_requests: list = field(default_factory=list)  # branch names "refs/pr/N"
    lfs_oids: set = field(default_factory=set)  # LFS objects uploaded to this repository

    def head(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.branches[revision][-1]
        for commits in self.branches.values():
            for commit in commits:
                if commit.oid == revision:
                    return commit
        return None


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubState:
    def __init__(self):
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.tokens_seen: set[str] = set()
        self.requests: list[str] = []
        # Step name ("commit" or "lfs_upload") -> number of upcoming requests to fail.
        self.fail_next: dict[str, int] = {}
        self.commit_counter = 0

    def new_commit(self, message: str, files: dict) -> Commit:
        self.commit_counter += 1
        oid = hashlib.sha1(f"{self.commit_counter}:{message}".encode()).hexdigest()
        return Commit(oid=oid, message=message, files=files)

    def should_fail(self, step: str) -> bool:
        remaining = self.fail_next.get(step, 0)
        if remaining > 0:
            self.fail_next[step] = remaining - 1
            return True
        return False


REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", "commit"),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", "create_branch"),
    ("GET", rf"/api/models/{REPO}/refs", "refs"),
    ("GET", rf"/api/models/{REPO}/revision/(?P<revision>[^/]+)", "repo_info"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("GET", rf"/api/models/{REPO}", "repo_info"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", rf"/lfs-upload/{REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
    ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
]


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubHTTPServer"

    def log_message(self, format, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    # Plumbing

    def dispatch(self, method: str):
        url = urlsplit(self.path)
        self.query = {key: values[0] for key, values in parse_qs(url.query).items()}
        self.body = self.read_body()
        state = self.server.state
        authorization = self.headers.get("Authorization", "")
        with state.lock:
            state.requests.append(f"{method} {url.path}")
            if authorization.startswith("Bearer "):
                state.tokens_seen.add(authorization[len("Bearer ") :])
        for route_method, pattern, handler_name in ROUTES:
            match = re.fullmatch(pattern, url.path)
            if route_method == method and match:
                params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                with state.lock:
                    getattr(self, handler_name)(**params)
                return
        self.send_json({"error": f"no route for {method} {url.path}"}, status=404)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()  # CRLF after each chunk
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(self, payload, status: int = 200, headers: dict | None = None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error_code(self, status: int, code: str, message: str):
        self.send_json({"error": message}, status=status, headers={"X-Error-Code": code, "X-Error-Message": message})

    def find_repo(self, repo: str) -> Repo | None:
        found = self.server.state.repos.get(repo)
        if found is None:
            self.send_error_code(404, "RepoNotFound", f"Repository {repo} not found")
        return found

    def find_commit(self, repo: Repo, revision: str) -> Commit | None:
        commit = repo.head(revision)
        if commit is None:
            self.send_error_code(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def endpoint(self) -> str:
        return self.server.endpoint

    # Endpoints

    def whoami(self):
        self.send_json(
            {"type": "user", "name": USER_NAME, "orgs": [], "auth": {"type": "access_token", "accessToken": {}}}
        )

    def validate_yaml(self):
        self.send_json({"errors": [], "warnings": []})

    def create_repo(self):
        payload = json.loads(self.body)
        repo_id = f"{payload.get('organization') or USER_NAME}/{payload['name']}"
        state = self.server.state
        if repo_id in state.repos:
            self.send_json(
                {"error": "You already created this model repo", "url": f"{self.endpoint()}/{repo_id}"}, 409
            )
            return
        repo = Repo(repo_id=repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        initial = state.new_commit(
            "initial commit", {".gitattributes": StoredFile(content=b"*.safetensors filter=lfs\n")}
        )
        repo.branches["main"] = [initial]
        state.repos[repo_id] = repo
        self.send_json({"url": f"{self.endpoint()}/{repo_id}", "name": repo_id})

    def create_branch(self, repo, branch):
        found = self.find_repo(repo)
        if found is None:
            return
        if branch in found.branches:
            self.send_json({"error": f"Reference {branch} already exists"}, 409)
            return
        payload = json.loads(self.body or b"{}")
        start = found.head(payload.get("startingPoint") or "main")
        found.branches[branch] = [start]
        self.send_json({})

    def preupload(self, repo, revision):
        if self.find_repo(repo) is None:
            return
        files = []
        for entry in json.loads(self.body)["files"]:
            is_lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] >= LFS_MIN_SIZE
            files.append({"path": entry["path"], "uploadMode": "lfs" if is_lfs else "regular", "shouldIgnore": False})
        self.send_json({"files": files, "commitOid": None})

    def lfs_batch(self, repo):
        found = self.find_repo(repo)
        if found is None:
            return
        objects = []
        for entry in json.loads(self.body)["objects"]:
            item = {"oid": entry["oid"], "size": entry["size"], "authenticated": True}
            if entry["oid"] not in found.lfs_oids:
                href = f"{self.endpoint()}/lfs-upload/{repo}/{entry['oid']}"
                item["actions"] = {"upload": {"href": href, "header": {}}}
            objects.append(item)
        self.send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_upload(self, repo, oid):
        state = self.server.state
        found = self.find_repo(repo)
        if found is None:
            return
        if state.should_fail("lfs_upload"):
            # 507 is outside the client's retry list, so the failure reaches the caller at once.
            self.send_json({"error": "Insufficient storage (injected failure)"}, 507)
            return
        if hashlib.sha256(self.body).hexdigest() != oid:
            self.send_json({"error": "sha256 of the uploaded content does not match the oid"}, 400)
            return
        state.lfs_objects[oid] = self.body
        found.lfs_oids.add(oid)
        self.send_json({})

    def commit(self, repo, revision):
        state = self.server.state
        found = self.find_repo(repo)
        if found is None:
            return
        if state.should_fail("commit"):
            self.send_json({"error": "Internal server error (injected failure)"}, 500)
            return
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        parent = found.head(revision)
        if parent is None:
            self.send_error_code(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        files = dict(parent.files)
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = StoredFile(content=base64.b64decode(value["content"]))
            elif line["key"] == "lfsFile":
                if value["oid"] not in found.lfs_oids:
                    self.send_json({"error": f"LFS object {value['oid']} of {value['path']} was never uploaded"}, 422)
                    return
                files[value["path"]] = StoredFile(lfs_oid=value["oid"])
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
            elif line["key"] == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: stored for path, stored in files.items() if not path.startswith(prefix)}
        new_commit = state.new_commit(header["summary"], files)

        pull_request_url = None
        if self.query.get("create_pr") == "1":
            number = len(found.pull_requests) + 1
            branch = f"refs/pr/{number}"
            found.pull_requests.append(branch)
            found.branches[branch] = [parent, new_commit]
            pull_request_url = f"{self.endpoint()}/{repo}/discussions/{number}"
        else:
            found.branches[revision].append(new_commit)
        self.send_json(
            {
                "commitUrl": f"{self.endpoint()}/{repo}/commit/{new_commit.oid}",
                "commitOid": new_commit.oid,
                "pullRequestUrl": pull_request_url,
            }
        )

    def refs(self, repo):
        found = self.find_repo(repo)
        if found is None:
            return
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commits[-1].oid}
            for name, commits in found.branches.items()
            if not name.startswith("refs/pr/")
        ]
        pulls = [
            {"name": name, "ref": name, "targetCommit": found.branches[name][-1].oid} for name in found.pull_requests
        ]
        self.send_json({"branches": branches, "tags": [], "converts": [], "pullRequests": pulls})

    def repo_info(self, repo, revision="main"):
        found = self.find_repo(repo)
        if found is None:
            return
        commit = self.find_commit(found, revision)
        if commit is None:
            return
        self.send_json(
            {
                "id": repo,
                "modelId": repo,
                "sha": commit.oid,
                "private": found.private,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
                "tags": [],
            }
        )

    def tree(self, repo, revision, path=""):
        found = self.find_repo(repo)
        if found is None:
            return
        commit = self.find_commit(found, revision)
        if commit is None:
            return
        prefix = path.rstrip("/") + "/" if path else ""
        entries = []
        for file_path, stored in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            content = stored.content if stored.content is not None else self.server.state.lfs_objects[stored.lfs_oid]
            entry = {"type": "file", "path": file_path, "size": len(content), "oid": git_blob_sha1(content)}
            if stored.lfs_oid:
                entry["lfs"] = {"oid": stored.lfs_oid, "size": len(content), "pointerSize": 134}
            entries.append(entry)
        self.send_json(entries)

    def resolve(self, repo, revision, path):
        found = self.find_repo(repo)
        if found is None:
            return
        commit = self.find_commit(found, revision)
        if commit is None:
            return
        stored = commit.files.get(path)
        if stored is None:
            self.send_error_code(404, "EntryNotFound", f"{path} does not exist on {revision}")
            return
        headers = {"X-Repo-Commit": commit.oid}
        if stored.lfs_oid:
            content = self.server.state.lfs_objects[stored.lfs_oid]
            headers.update({"X-Linked-Etag": f'"{stored.lfs_oid}"', "X-Linked-Size": str(len(content))})
            headers["ETag"] = f'"{stored.lfs_oid}"'
        else:
            content = stored.content
            headers["ETag"] = f'"{git_blob_sha1(content)}"'
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(content)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), HubRequestHandler)
        self.state = state
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"


class HubServer:
    """The server running in a background thread; `state` is inspectable by tests."""

    def __init__(self):
        self.state = HubState()
        self.httpd = HubHTTPServer(self.state)
        self.endpoint = self.httpd.endpoint
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def files(self, repo_id: str, revision: str = "main") -> dict:
        """Return `{path: bytes}` of the newest commit on `revision`."""
        with self.state.lock:
            commit = self.state.repos[repo_id].head(revision)
            return {
                path: stored.content if stored.content is not None else self.state.lfs_objects[stored.lfs_oid]
                for path, stored in commit.files.items()
            }

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

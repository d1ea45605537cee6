"""A local stand-in for the Hugging Face Hub, and huggingface_hub pointed at it with its cache in a temporary HF_HOME.

The server answers what huggingface_hub asks when it downloads a snapshot: a revision's commit
(/api/{models,datasets}/<repo>/revision/<rev>), the file list at a commit (.../tree/<commit>), and each file
(HEAD and GET of /[datasets/]<repo>/resolve/<commit>/<path>). Every request is logged with its Authorization header.
"""
import contextlib
import hashlib
import http.server
import importlib
import json
import threading
import urllib.parse

import pytest
from huggingface_hub import constants

TYPES = {"models": "model", "datasets": "dataset"}


class Hub:
    def __init__(self):
        self.repos, self.log = {}, []  # (repo type, repo) -> {"refs": {revision: commit}, "commits": {commit: files}}
        self.unserved = set()  # paths listed but answered 404, as by a download cut off
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(head=True)

            def do_GET(self):
                self.answer(head=False)

            def answer(self, head):
                hub.log.append((self.command, urllib.parse.unquote(self.path), self.headers.get("Authorization")))
                status, body, headers = hub.route(urllib.parse.urlsplit(self.path).path)
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def add(self, repo, files, repo_type="model", revision="main", commit=None):
        """Publish `files` (path -> bytes) as `repo` at `revision`; returns the commit (40 hex digits)."""
        commit = commit or hashlib.sha1(json.dumps(sorted(files)).encode() + repo.encode()).hexdigest()
        entry = self.repos.setdefault((repo_type, repo), {"refs": {}, "commits": {}})
        entry["refs"][revision] = commit
        entry["commits"][commit] = dict(files)
        return commit

    def requests(self, kind=None):
        """The paths asked for, of one kind if given: "revision", "tree" or "resolve"."""
        return [path for _, path, _ in self.log if kind is None or f"/{kind}/" in path]

    def route(self, path):
        path = urllib.parse.unquote(path)
        for prefix, repo_type in TYPES.items():
            for (kind, repo), entry in self.repos.items():
                if kind != repo_type:
                    continue
                api = f"/api/{prefix}/{repo}/"
                resolve = f"/{'datasets/' if repo_type == 'dataset' else ''}{repo}/resolve/"
                if path.startswith(api + "revision/"):
                    commit = entry["refs"].get(path[len(api + "revision/"):], path[len(api + "revision/"):])
                    if commit not in entry["commits"]:
                        return self.not_found("RevisionNotFound")
                    siblings = [{"rfilename": name} for name in entry["commits"][commit]]
                    return self.json({"id": repo, "sha": commit, "siblings": siblings, "private": False})
                if path.startswith(api + "tree/"):
                    commit = path[len(api + "tree/"):].split("/")[0]
                    files = entry["commits"].get(commit)
                    if files is None:
                        return self.not_found("RevisionNotFound")
                    return self.json([{"type": "file", "path": name, "size": len(data),
                                       "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()])
                if path.startswith(resolve):
                    commit, name = path[len(resolve):].split("/", 1)
                    data = entry["commits"].get(commit, {}).get(name)
                    if data is None or name in self.unserved:
                        return self.not_found("EntryNotFound")
                    return 200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        return self.not_found("RepoNotFound")

    @staticmethod
    def json(obj):
        return 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}

    @staticmethod
    def not_found(code):
        return 404, json.dumps({"error": code}).encode(), {"X-Error-Code": code, "Content-Type": "application/json"}


@contextlib.contextmanager
def hub_environment(**env):
    """Set (or, with None, unset) environment variables for huggingface_hub, which reads them once, at import: its
    constants are read again on the way in and out."""
    mp = pytest.MonkeyPatch()
    try:
        for key, value in env.items():
            if value is None:
                mp.delenv(key, raising=False)
            else:
                mp.setenv(key, value)
        importlib.reload(constants)
        yield
    finally:
        mp.undo()
        importlib.reload(constants)


@pytest.fixture
def hub(tmp_path):
    """A local Hub that huggingface_hub talks to, with an empty cache (HF_HOME in tmp_path) and no token."""
    server = Hub()
    with hub_environment(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=None,
                         HF_TOKEN=None, HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None, HF_HUB_DISABLE_PROGRESS_BARS="1"):
        yield server
    server.httpd.shutdown()

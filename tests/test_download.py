"""Shard downloads against a local HTTP server (127.0.0.1 only): resume, corruption, checksums, locks, loud failures."""
import hashlib
import http.server
import os
import random
import socket
import threading
import time

import pytest

from jaxchat import corpus, dataset, pipeline
from jaxchat.common import UserError
from jaxchat.distributed import run_main


class Server:
    """Serves shards from memory at /plain/NAME (with a sha256 ETag) and /hf/NAME (a redirect carrying X-Linked-Etag,
    like Hugging Face's, to /cdn/NAME). `modes[name]` picks a misbehaviour; `log` records (path, Range header)."""

    def __init__(self):
        self.files, self.modes, self.log, self.delay = {}, {}, [], 0.0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                kind, name = self.path.strip("/").split("/", 1)
                server.log.append((kind, name, self.headers.get("Range")))
                mode = server.modes.get(name, "")
                if name not in server.files or mode == "404":
                    return self.send_error(404)
                data = server.files[name]
                sha = "0" * 64 if mode == "bad_etag" else hashlib.sha256(data).hexdigest()
                if kind == "hf":
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{name}")
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if mode == "corrupt":  # zeros from the middle on, PAR1 kept at both ends: only the footer read notices
                    data = data[:len(data) // 2] + bytes(len(data) - len(data) // 2 - 4) + b"PAR1"
                start = 0
                rng = self.headers.get("Range")
                if rng and mode != "ignore_range":
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                if kind == "plain" and mode != "corrupt":
                    self.send_header("ETag", f'"{sha}"')
                self.end_headers()
                body = data[start:]
                first = len(server.requests(name)) == 1
                if first and mode in ("drop_once", "ignore_range"):  # half the body, then hang up
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                time.sleep(server.delay)
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def requests(self, name):
        """The Range headers of the data requests (not the redirects) for `name`."""
        return [rng for kind, n, rng in self.log if n == name and kind != "hf"]


@pytest.fixture
def server(tmp_path):
    s = Server()
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in [0, 1, 2, 3, corpus.MAX_SHARD]:
        name = corpus.shard_name(i)
        texts = [f"{name} doc {j}: " + " ".join(rng.choices(words, k=200)) for j in range(300)]
        corpus.write_shard(str(tmp_path / name), texts)
        s.files[name] = (tmp_path / name).read_bytes()
        (tmp_path / name).unlink()
    yield s
    s.httpd.shutdown()


def download(server, d, indices, kind="plain", **kw):
    return dataset.download_shards(indices, d, f"{server.root}/{kind}", backoff=0, timeout=5, **kw)


def parquets(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".parquet"))


@pytest.mark.parametrize("kind", ["plain", "hf"])
def test_download_verified(server, tmp_path, kind):
    paths = download(server, tmp_path / "d", [0, 1, 2], kind=kind)
    for p in paths:
        assert open(p, "rb").read() == server.files[os.path.basename(p)]
    assert parquets(tmp_path / "d") == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert not [f for f in os.listdir(tmp_path / "d") if f.endswith(".part")]


@pytest.mark.parametrize("kind", ["plain", "hf"])
def test_dropped_connection_resumes_with_range(server, tmp_path, kind):
    server.modes["shard_00001.parquet"] = "drop_once"
    [path] = download(server, tmp_path, [1], kind=kind)
    ranges = server.requests("shard_00001.parquet")
    half = len(server.files["shard_00001.parquet"]) // 2
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] == f"bytes={half}-"
    assert open(path, "rb").read() == server.files["shard_00001.parquet"]


def test_server_ignoring_range_restarts(server, tmp_path):
    server.modes["shard_00002.parquet"] = "ignore_range"
    [path] = download(server, tmp_path, [2])
    assert len(server.requests("shard_00002.parquet")) == 2 and server.requests("shard_00002.parquet")[1]
    assert open(path, "rb").read() == server.files["shard_00002.parquet"]


@pytest.mark.parametrize("kind, mode, why", [("plain", "corrupt", "unreadable parquet"),
                                             ("plain", "bad_etag", "sha256 mismatch"),
                                             ("hf", "bad_etag", "sha256 mismatch")])
def test_corrupt_file_is_retried_then_fails_clearly(server, tmp_path, kind, mode, why):
    server.modes["shard_00003.parquet"] = mode
    with pytest.raises(dataset.DownloadError, match=f"shard_00003.parquet: corrupt download: {why}") as e:
        download(server, tmp_path, [0, 3], kind=kind, attempts=3)
    assert list(e.value.failed) == ["shard_00003.parquet"]
    assert len(server.requests("shard_00003.parquet")) == 3
    assert parquets(tmp_path) == ["shard_00000.parquet"]  # the good one stays, nothing half-made is left as .parquet
    assert not os.path.exists(tmp_path / "shard_00003.parquet.part")


def test_404_is_not_retried(server, tmp_path):
    server.modes["shard_00002.parquet"] = "404"
    with pytest.raises(dataset.DownloadError, match="shard_00002.parquet: HTTP 404"):
        download(server, tmp_path, [0, 1, 2])
    assert len(server.requests("shard_00002.parquet")) == 1 and parquets(tmp_path) == ["shard_00000.parquet",
                                                                                      "shard_00001.parquet"]


def test_complete_files_are_skipped_and_parts_resumed(server, tmp_path):
    (tmp_path / "shard_00000.parquet").write_bytes(server.files["shard_00000.parquet"])
    (tmp_path / "shard_00001.parquet.part").write_bytes(server.files["shard_00001.parquet"][:1000])  # an earlier run
    download(server, tmp_path, [0, 1])
    assert server.requests("shard_00000.parquet") == [] and server.requests("shard_00001.parquet") == ["bytes=1000-"]
    assert open(tmp_path / "shard_00001.parquet", "rb").read() == server.files["shard_00001.parquet"]


def test_concurrent_downloads_fetch_each_file_once(server, tmp_path):
    server.delay = 0.2
    results = []
    fetch = lambda: results.append(download(server, tmp_path, [0, 1, 2, 3]))
    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(len(server.requests(corpus.shard_name(i))) == 1 for i in range(4))


def test_cli_downloads_n_shards_plus_pinned_val(server, tmp_path, capsys):
    d = tmp_path / "d"
    dataset.main(["-n", "2", "--base-url", f"{server.root}/hf", "--data-dir", str(d)])
    assert parquets(d) == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    assert server.log[0][1] == "shard_01822.parquet"  # val first: it sorts last from the start
    assert corpus.split_files("val", d) == [str(d / "shard_01822.parquet")]
    assert next(corpus.iter_texts("val", d)).startswith("shard_01822.parquet doc 0")
    assert pipeline.stage_argv("data", {"num_files": 2}) == ["--num-files=2"]


def test_cli_partial_failure_exits_nonzero(server, tmp_path):
    server.modes["shard_00001.parquet"] = "404"
    with pytest.raises(SystemExit) as e:
        run_main(lambda _: dataset.main(["-n", "3", "--base-url", f"{server.root}/plain", "--data-dir", str(tmp_path)]))
    assert "1 of 4 shards" in str(e.value.code) and "shard_00001.parquet: HTTP 404" in str(e.value.code)
    assert parquets(tmp_path) == ["shard_00000.parquet", "shard_00002.parquet", "shard_01822.parquet"]


def test_cli_unreachable_source_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "RETRY_DELAY", 0)
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["-n", "2", "--base-url", f"http://127.0.0.1:{port}", "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        run_main(lambda _: dataset.main(argv))
    msg = str(e.value.code)
    assert msg.startswith("error: 3 of 3 shards could not be downloaded")
    assert "shard_01822.parquet: <urlopen error" in msg and "(after 5 attempts)" in msg
    assert "shard_00000.parquet: not attempted" in msg and "shard_00001.parquet" in msg
    assert "check the network" in msg and "--data-dir" in msg and "without -n" in msg
    assert parquets(tmp_path) == []


def test_default_and_downloads_never_mix(server, tmp_path):
    d = tmp_path / "d"
    dataset.build_default_shards(d)
    download(server, d, [corpus.MAX_SHARD, 0])  # the embedded default is replaced, not mixed in
    assert parquets(d) == ["shard_00000.parquet", "shard_01822.parquet"]
    assert open(d / "shard_00000.parquet", "rb").read() == server.files["shard_00000.parquet"]
    with pytest.raises(UserError, match="not the embedded default"):
        dataset.build_default_shards(d)
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "mine.txt").write_text("hello")
    with pytest.raises(UserError, match="mine.txt"):
        download(server, tmp_path / "own", [0])
    with pytest.raises(UserError, match="--num-files must be >= 1"):
        dataset.shard_indices(0)
    assert dataset.shard_indices(-1) == [1822] + list(range(1822))

"""Downloading one file properly: resumable (Range requests into NAME.part, across runs too), retried with
exponential backoff, verified (announced size, sha256 given or vouched for by the server, a content check), renamed
into place only when whole, and locked so parallel processes fetch it once. Used for pretraining shards, the CORE
eval bundle and the word list; the Hub's models and task data come through huggingface_hub (jaxchat.hf.hub).
"""
import contextlib
import hashlib
import http.client
import os
import re
import threading
import time
import urllib.error
import urllib.request

from jaxchat.common import UserError, file_lock

CHUNK = 1 << 20
RETRY_DELAY = 1.0  # seconds; failed attempt k waits RETRY_DELAY * 2**k before the next (nanochat: 2, 4, 8, 16 s)


class DownloadError(UserError):
    """Some files could not be downloaded; `failed` maps file name -> reason. The ones that did download stay."""

    def __init__(self, message, failed):
        super().__init__(message)
        self.failed = failed


class BadFile(Exception):
    """The bytes are wrong (sha256, content check): the next attempt starts from scratch instead of resuming."""


def sha256_from(headers):
    """Hugging Face LFS files carry their sha256 as X-Linked-Etag (on the redirect to the CDN) or as ETag."""
    for h in headers:
        for key in ("X-Linked-Etag", "ETag"):
            value = (h.get(key) or "").removeprefix("W/").strip('"').lower()
            if re.fullmatch(r"[0-9a-f]{64}", value):
                return value
    return None


class _KeepRedirectHeaders(urllib.request.HTTPRedirectHandler):
    def __init__(self):
        self.seen = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # keeps our Range header


class Progress:
    """One tqdm bar over bytes for all workers; its total grows as the responses announce their sizes."""

    def __init__(self, desc):
        from tqdm import tqdm
        self.bar, self.lock, self.stopped = tqdm(total=0, unit="B", unit_scale=True, desc=desc), threading.Lock(), False

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.bar.close()

    def update(self, n=0, expect=0):
        if self.stopped:  # Ctrl-C in the main thread: stop this worker too (its .part resumes next time)
            raise KeyboardInterrupt
        with self.lock:
            self.bar.total += expect
            self.bar.update(n)


def _fetch(url, part, timeout, progress):
    """One HTTP attempt into `part`, resuming it with a Range request; returns the sha256 the server vouches for."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "jaxchat"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    redirects = _KeepRedirectHeaders()
    with urllib.request.build_opener(redirects).open(req, timeout=timeout) as r:
        start, total = 0, None
        if r.status == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
            if not m or int(m[1]) != have:
                raise BadFile(f"unexpected Content-Range {r.headers.get('Content-Range')!r} for a resume at {have}")
            start, total = have, (int(m[2]) if m[2] != "*" else None)
        # else 200: the whole file, also from a server that ignored our Range: start over
        if total is None and r.headers.get("Content-Length"):
            total = start + int(r.headers["Content-Length"])
        progress.update(expect=(total or 0) - start)
        with open(part, "ab" if start else "wb") as f:
            while chunk := r.read(CHUNK):
                f.write(chunk)
                progress.update(len(chunk))
        sha = sha256_from([*redirects.seen, r.headers])
    if total is not None and os.path.getsize(part) != total:  # a dropped connection: keep the .part, resume it
        raise ConnectionError(f"connection closed after {os.path.getsize(part)} of {total} bytes")
    return sha


def download_one(url, path, check=None, attempts=5, timeout=30, backoff=RETRY_DELAY, progress=None, sha256=None):
    """Fetch one file via path.part, verify it, rename it into place; returns None or why it failed.

    `check(path)` is the content check (raises BadFile; e.g. "is it a parquet file"). A complete, valid file is not
    fetched again; a lock file makes a second process wanting the same file wait, then find it done."""
    part, (directory, name) = path + ".part", os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    progress = progress or Progress(name)
    with file_lock(os.path.join(directory, f".{name}.lock")):
        with contextlib.suppress(BadFile):  # missing or damaged: (re)download
            _verify(path, check, sha256)
            return None  # already complete
        for attempt in range(1, attempts + 1):
            try:
                sha = _fetch(url, part, timeout, progress)
                if sha and not sha256:
                    _verify(part, None, sha, "the server says")
                _verify(part, check, sha256)
                os.replace(part, path)
                return None
            except BadFile as e:
                why = f"corrupt download: {e}"
                os.remove(part)
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code} {e.reason}"
                if e.code == 416 and os.path.exists(part):  # our .part is no prefix of the server's file: restart
                    os.remove(part)
                elif 400 <= e.code < 500 and e.code not in (408, 429):
                    return f"{why} for {url}"  # permanent: retrying cannot help
            except (OSError, http.client.HTTPException) as e:  # network trouble: the next attempt resumes the .part
                why = str(e) or type(e).__name__
            if attempt < attempts:
                time.sleep(backoff * 2 ** attempt)
        return f"{why} (after {attempts} attempts)"


def download_file(url, path, check=None, sha256=None, attempts=5, timeout=30, backoff=RETRY_DELAY, what="file"):
    """download_one for a single file, with a tqdm bar; raises DownloadError with what to do when it fails."""
    with Progress(os.path.basename(path)) as progress:
        why = download_one(url, path, check, attempts, timeout, backoff, progress, sha256)
    if why:
        raise DownloadError(f"could not download the {what} from {url} into {path}: {why}\nwhat to do: check the "
                            f"network and rerun (a partial download resumes), or put the file there yourself",
                            {os.path.basename(path): why})
    return path


def _verify(path, check, sha256, who="expected"):
    if not os.path.exists(path):
        raise BadFile("missing")
    if sha256:
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != sha256:
                raise BadFile(f"sha256 mismatch ({who} {sha256[:16]}...)")
    if check is not None:
        check(path)

"""Task data from the Hugging Face hub without the `datasets` library, as nanochat HEAD does it.

Every hub dataset has an automatic parquet export: `{endpoint}/api/datasets/{repo}/parquet/{subset}/{split}` lists
its shard URLs. We download those once into `$JAXCHAT_BASE_DIR/task_data/{repo--slug}/{subset}/{split}/NNNNN.parquet`
and write `manifest.json` last, so a half-finished download is never mistaken for a complete one.

Bring your own files: put `*.parquet` or `*.jsonl` in `DIR/{repo--slug}/{subset}/{split}/` and pass `data_dir=DIR`
or set `JAXCHAT_TASK_DATA=DIR`; those are used before the cache and the network.
"""
import glob
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxchat.common import UserError, file_lock, get_base_dir
from jaxchat.corpus import check_parquet
from jaxchat.download import download_file

log = logging.getLogger(__name__)
SHUFFLE_SEED = 42  # every nanochat task shuffles its rows with seed 42


class TaskDataUnavailable(UserError):
    """A task's data could not be found locally nor downloaded; the message says what was tried and what to do."""


def hub_endpoint():
    """The Hub's address: JAXCHAT_HF_ENDPOINT, else huggingface_hub's HF_ENDPOINT (a mirror), else the Hub."""
    return (os.environ.get("JAXCHAT_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def slug(repo):
    return repo.replace("/", "--")


class Rows(Sequence):
    """Rows in a fixed order, made into dicts only when read (SmolTalk has 460K, too many to unpack up front)."""

    def __init__(self, source, order):
        self.source, self.order = source, order  # source: a pyarrow Table or a list of dicts

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        j = int(self.order[i])
        if isinstance(self.source, pa.Table):
            return self.source.slice(j, 1).to_pylist()[0]
        return self.source[j]


def shuffled(source, seed=SHUFFLE_SEED):
    """`source` (Table or list) in the order of `datasets.Dataset.shuffle(seed)`: a default_rng(seed) permutation."""
    n = source.num_rows if isinstance(source, pa.Table) else len(source)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    return Rows(source, order)


def read_rows(paths):
    """Parquet files → one Table; jsonl files → a list of dicts. Files are read in name order."""
    paths = sorted(paths)
    if all(p.endswith(".parquet") for p in paths):
        return pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return rows


def _download(repo, subset, split, shards_dir):
    """Fetch the shard listing and every shard, then write the manifest; returns the manifest's file names."""
    listing_url = f"{hub_endpoint()}/api/datasets/{repo}/parquet/{subset}/{split}"
    try:
        req = urllib.request.Request(listing_url, headers={"User-Agent": "jaxchat"})
        with urllib.request.urlopen(req, timeout=30) as r:
            urls = json.loads(r.read())
    except (OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors; bad JSON is a ValueError
        raise _unavailable(repo, subset, split, f"{listing_url}: {getattr(e, 'reason', None) or e}") from None
    if not isinstance(urls, list) or not urls:
        raise _unavailable(repo, subset, split, f"{listing_url} listed no parquet files ({str(urls)[:200]})")
    names = [f"{i:05d}.parquet" for i in range(len(urls))]
    for url, name in zip(urls, names):
        log.info("downloading %s", url)
        try:
            download_file(url, os.path.join(shards_dir, name), check=partial(check_parquet, column=None),
                          what=f"{repo} shard")
        except UserError as e:
            raise _unavailable(repo, subset, split, str(e).split("\n")[0]) from None
    tmp = os.path.join(shards_dir, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"repo": repo, "subset": subset, "split": split, "urls": urls, "files": names}, f, indent=1)
    os.replace(tmp, os.path.join(shards_dir, "manifest.json"))  # last: its presence means "complete"
    return names


def _unavailable(repo, subset, split, tried):
    where = f"DIR/{slug(repo)}/{subset}/{split}/"
    return TaskDataUnavailable(
        f"the task data {repo} ({subset}/{split}) is not available: tried {tried}\n"
        f"what to do: get network access to {hub_endpoint()} (or set JAXCHAT_HF_ENDPOINT to a mirror) and rerun, or "
        f"put the dataset's *.parquet or *.jsonl files in {where} and set JAXCHAT_TASK_DATA=DIR")


def load_hub_dataset(repo, subset="default", split="train", data_dir=None, seed=SHUFFLE_SEED):
    """The rows of a hub dataset (a read-only Sequence of dicts) shuffled like nanochat's `.shuffle(seed=42)`.

    Looks in `data_dir`, then $JAXCHAT_TASK_DATA, then the download cache; downloads when none has it."""
    local = [os.path.join(root, slug(repo), subset, split) for root in (data_dir, os.environ.get("JAXCHAT_TASK_DATA"))
             if root]
    for directory in local:
        if files := glob.glob(os.path.join(directory, "*.parquet")) or glob.glob(os.path.join(directory, "*.jsonl")):
            return shuffled(read_rows(files), seed)
    shards_dir = os.path.join(get_base_dir(), "task_data", slug(repo), subset, split)
    names = _cached(shards_dir)
    if names is None:
        os.makedirs(shards_dir, exist_ok=True)
        with file_lock(os.path.join(shards_dir, ".manifest.lock")):  # one process downloads, the others wait
            try:
                names = _cached(shards_dir) or _download(repo, subset, split, shards_dir)
            except TaskDataUnavailable as e:
                if local:
                    raise TaskDataUnavailable(f"{e}\n(no *.parquet or *.jsonl files in {', '.join(local)})") from None
                raise
    return shuffled(read_rows([os.path.join(shards_dir, n) for n in names]), seed)


def _cached(shards_dir):
    """The cached shard names when the download completed (manifest present, every file there), else None."""
    try:
        with open(os.path.join(shards_dir, "manifest.json")) as f:
            names = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return names if all(os.path.exists(os.path.join(shards_dir, n)) for n in names) else None

"""Task data: the rows of a Hub dataset's split, shuffled as nanochat shuffles them, without the `datasets` library.

The files come from the dataset's automatic parquet export through the Hugging Face cache (`jaxchat.hf.hub`).
Bring your own files instead: put `*.parquet` or `*.jsonl` in `DIR/{owner--name}/{subset}/{split}/` and pass
`data_dir=DIR` or set `JAXCHAT_TASK_DATA=DIR`; those are used before the cache and the network.
"""
import glob
import json
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxchat.common import UserError
from jaxchat.hf import hub

SHUFFLE_SEED = 42  # every nanochat task shuffles its rows with seed 42


class TaskDataUnavailable(UserError):
    """A task's data could not be found locally nor downloaded; the message says what was tried and what to do."""


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


def load_hub_dataset(repo, subset="default", split="train", data_dir=None, seed=SHUFFLE_SEED):
    """The rows of a hub dataset (a read-only Sequence of dicts) shuffled like nanochat's `.shuffle(seed=42)`.

    Looks in `data_dir`, then $JAXCHAT_TASK_DATA, then the Hugging Face cache; downloads when none has it."""
    local = [os.path.join(root, slug(repo), subset, split) for root in (data_dir, os.environ.get("JAXCHAT_TASK_DATA"))
             if root]
    for directory in local:
        if files := glob.glob(os.path.join(directory, "*.parquet")) or glob.glob(os.path.join(directory, "*.jsonl")):
            return shuffled(read_rows(files), seed)
    try:
        files = hub.dataset_parquet_files(repo, subset, split)
    except UserError as e:
        looked = f"\n(no *.parquet or *.jsonl files in {', '.join(local)})" if local else ""
        raise TaskDataUnavailable(
            f"the task data {repo} ({subset}/{split}) is not available: {e}\nwhat to do: get network access to the Hub "
            f"(or set HF_ENDPOINT to a mirror) and rerun, or put the dataset's *.parquet or *.jsonl files in "
            f"DIR/{slug(repo)}/{subset}/{split}/ and set JAXCHAT_TASK_DATA=DIR{looked}") from None
    return shuffled(read_rows(files), seed)

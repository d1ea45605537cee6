"""Pretraining text: where the files live, which are train and which validation, how to read their documents.

Layout (as nanochat's): `$JAXCHAT_BASE_DIR/base_data/shard_00000.parquet, ...`, one `text` column, row groups of
1,024 documents; the split is nanochat's: the last file (in sorted order) is validation, the rest train. One directory
holds one corpus, never a mix (the last-file rule would otherwise pick a val file from the wrong one). The command
that fills a directory (download, or the embedded default built offline) is `python -m jaxchat.dataset`.

A directory jaxchat builds or downloads records its split in `manifest.json` (the val shard's name, the train shards'
names; a later, larger download adds to it once it completes). Every stage that reads the data checks the record
first and refuses, naming them, when recorded shards are missing: a lost middle shard would train on without a word,
a lost val shard would turn the last train shard into validation. Shards in the directory but not in the record (a
download still running) are not used.

Bring your own data: point `data_dir` at a directory of `.parquet` (a `text` column), `.jsonl`/`.jsonl.gz`
(a "text" field per line) or `.txt` files (cut into documents at blank lines). The last file is validation; jaxchat
writes nothing into your directory, so keep its files in place (or name them so that validation sorts last).
"""
import glob
import gzip
import json
import os
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq

from jaxchat import distributed
from jaxchat.common import UserError, file_lock, get_base_dir, write_atomic
from jaxchat.download import BadFile

DEFAULT_CORPUS = os.path.join(os.path.dirname(__file__), "data", "default_corpus.jsonl.gz")
DATA_EXTENSIONS = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
ROW_GROUP_SIZE = 1024  # documents per parquet row group, nanochat's value
MAX_DOC_CHARS = 4000
DEFAULT_MARKER = ".default_corpus_built"  # in a directory built by dataset.build_default_shards
MANIFEST = "manifest.json"  # the split of a directory jaxchat built or downloaded: {"val": name, "train": [names]}
MAX_SHARD = 1822  # nanochat's FineWeb-EDU shards 0..1822; the last one is the pinned validation shard
SHARD_RE = re.compile(r"shard_\d{5}\.parquet")


def default_data_dir():
    return os.path.join(get_base_dir(), "base_data")


def split_documents(text, max_chars=MAX_DOC_CHARS):
    """Cut a long text into documents of whole paragraphs, at most max_chars each (a longer paragraph stands alone)."""
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
    paragraphs = [p.strip("\n") for p in re.split(r"\n{2,}", text) if p.strip()]
    docs = []
    for p in paragraphs:
        if docs and len(docs[-1]) + 2 + len(p) <= max_chars:
            docs[-1] += "\n\n" + p
        else:
            docs.append(p)
    return docs


def found_data_files(data_dir):
    """The data files of a directory, sorted (none: an empty list)."""
    return sorted(p for p in glob.glob(os.path.join(data_dir, "*")) if p.endswith(DATA_EXTENSIONS))


def list_data_files(data_dir=None):
    """The data files of a directory, sorted; a clear error when there are none."""
    data_dir = data_dir or default_data_dir()
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory {data_dir} does not exist (build the default with `python -m jaxchat.dataset`"
                        f" or pass a directory of .parquet/.jsonl/.txt files)")
    files = found_data_files(data_dir)
    if not files:
        raise UserError(f"no data files ({', '.join(DATA_EXTENSIONS)}) in {data_dir}")
    return files


def split_files(split, data_dir=None):
    """The files of a split: as recorded for a directory jaxchat built or downloaded (`recorded_split`: refused when
    recorded shards are missing), else nanochat's rule: the last file is validation, all the others train (one file
    serves as both)."""
    assert split in ("train", "val"), split
    data_dir = str(data_dir or default_data_dir())
    files = list_data_files(data_dir)
    if record := recorded_split(data_dir, files):
        train, val = record
        return [os.path.join(data_dir, n) for n in (train if split == "train" else [val])]
    if len(files) == 1:
        return files
    return files[:-1] if split == "train" else files[-1:]


def recorded_split(data_dir, files):
    """(train shard names, val shard name) of a directory jaxchat built or downloaded, or None for one of your own;
    a UserError when one of its shards is missing, since the split would then change.

    A directory from before the record (no MANIFEST) is recognised by its names and recorded on first use: the
    embedded default (its marker; the build fixes its shard names) or a download (the pinned val shard, train shards
    0..K-1). Other shard_NNNNN.parquet files (nanochat's older downloads, your own) keep nanochat's last-file rule,
    but a gap in their numbers is refused too: it is a lost middle shard. What no rule can tell apart is a download
    from before the record that lost its val shard before its first use here from such shards of your own."""
    names = {os.path.basename(f) for f in files}
    path, default = os.path.join(data_dir, MANIFEST), os.path.exists(os.path.join(data_dir, DEFAULT_MARKER))
    if os.path.exists(path):
        train, val = read_manifest(path)
    elif default:
        *train, val = map(shard_name, range(len(default_shards())))
    elif all(SHARD_RE.fullmatch(n) for n in names):
        val = shard_name(MAX_SHARD) if shard_name(MAX_SHARD) in names else None  # None: not a download
        train = [shard_name(i) for i in range(max([shard_index(n) for n in names if n != val], default=-1) + 1)]
    else:
        return None
    expected = train + [val] * (val is not None)
    if missing := [n for n in expected if n not in names]:
        fix = ("rebuild it: move the directory away and run `python -m jaxchat.dataset`" if default else
               "restore them, or number the files without a gap" if val is None else
               f"fetch them: `python -m jaxchat.dataset -n {len(train)} --data-dir={data_dir}`")
        raise UserError(f"{data_dir} is missing {len(missing)} of its {len(expected)} shards ("
                        f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): a run would train or "
                        f"validate on other data than the directory was made with; {fix}")
    if val is None:
        return None
    if not train:
        raise UserError(f"{data_dir} holds only the validation shard {val}: fetch train shards with "
                        f"`python -m jaxchat.dataset -n N --data-dir={data_dir}`")
    if not os.path.exists(path) and distributed.is_writer():  # first use after an upgrade: pin the split now
        try:
            with file_lock(os.path.join(data_dir, ".lock")):  # a download may be recording its shards
                if not os.path.exists(path):
                    write_manifest(data_dir, train, val)
        except OSError:  # a read-only copy: its names are checked again at every start
            pass
    return train, val


def write_manifest(data_dir, train, val):
    """Record a directory's split: the val shard's name and the train shards' names."""
    write_atomic(os.path.join(data_dir, MANIFEST), json.dumps({"val": val, "train": sorted(train)}, indent=1).encode())


def read_manifest(path):
    try:
        with open(path, "rb") as f:
            record = json.load(f)
        train, val = record["train"], record["val"]
        if not all(isinstance(n, str) and SHARD_RE.fullmatch(n) for n in [val, *train]):
            raise ValueError("expected shard names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is damaged ({e}); remove it and the split is worked out again from the file names") \
            from None
    return train, val


def iter_file_batches(path):
    """Yield lists of document texts from one file: a parquet row group at a time, else chunks of ROW_GROUP_SIZE."""
    try:
        if path.endswith(".parquet"):
            pf = pq.ParquetFile(path)
            if "text" not in pf.schema_arrow.names:
                raise UserError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
            for rg in range(pf.num_row_groups):
                yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
        elif path.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                docs = []
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        docs.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise UserError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from None
                    if len(docs) == ROW_GROUP_SIZE:
                        yield docs
                        docs = []
                if docs:
                    yield docs
        else:
            with open(path, encoding="utf-8") as f:
                docs = split_documents(f.read())
            for i in range(0, len(docs), ROW_GROUP_SIZE):
                yield docs[i:i + ROW_GROUP_SIZE]
    except (OSError, pa.ArrowException, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"cannot read data file {path}: {e}") from None


def parquets_iter_batched(split, data_dir=None):
    """nanochat's iterator (one process: no start/step): the document lists of every file of the split, in order."""
    for path in split_files(split, data_dir):
        yield from iter_file_batches(path)


def iter_texts(split, data_dir=None, max_chars=None, doc_cap=None):
    """Documents of a split, each cropped to doc_cap characters, stopping after max_chars in total."""
    total = 0
    for docs in parquets_iter_batched(split, data_dir=data_dir):
        for doc in docs:
            doc = doc[:doc_cap] if doc_cap else doc
            yield doc
            total += len(doc)
            if max_chars and total >= max_chars:
                return


def write_shard(path, texts):
    """Write one shard in nanochat's format (text column, zstd, 1,024-doc row groups) atomically."""
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    write_atomic(path, lambda f: pq.write_table(table, f, row_group_size=ROW_GROUP_SIZE, compression="zstd",
                                                compression_level=3, use_dictionary=False, write_statistics=False))


def default_shards(num_val_docs=96, docs_per_shard=600):
    """The embedded default's shards (lists of texts): the shipped corpus shuffled (seed 42) into train shards plus a
    last, validation shard."""
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    random.Random(42).shuffle(docs)
    train, val = docs[:-num_val_docs], docs[-num_val_docs:]
    return [train[i:i + docs_per_shard] for i in range(0, len(train), docs_per_shard)] + [val]


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def shard_index(name):
    return int(name[len("shard_"):-len(".parquet")])


def check_parquet(path, column="text"):
    """Cheap sanity check of a parquet file: PAR1 at both ends, a readable footer, `column` (if any). Raises BadFile."""
    try:
        with open(path, "rb") as f:
            head, _, tail = f.read(4), f.seek(-4, os.SEEK_END), f.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            raise BadFile("not a parquet file (no PAR1 magic at both ends)")
        names = pq.ParquetFile(path).schema_arrow.names
    except (OSError, pa.ArrowException) as e:
        raise BadFile(f"unreadable parquet ({e})") from None
    if column and column not in names:
        raise BadFile(f"no {column!r} column (columns: {names})")

"""Pretraining text: where the shards live, how the embedded default is built, how to iterate documents.

Layout (as nanochat's): `$JAXCHAT_BASE_DIR/base_data/shard_00000.parquet, ...`, one `text` column, row groups of
1,024 documents; the split rule is nanochat's: the last shard (in sorted order) is validation, the rest train.

Bring your own data: point `data_dir` at a directory of `.parquet` (a `text` column), `.jsonl`/`.jsonl.gz`
(a "text" field per line) or `.txt` files (cut into documents at blank lines). The same split rule applies.
"""
import glob
import gzip
import json
import os
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq

from jaxchat.common import UserError, file_lock, get_base_dir, run_main

DEFAULT_CORPUS = os.path.join(os.path.dirname(__file__), "data", "default_corpus.jsonl.gz")
DATA_EXTENSIONS = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
ROW_GROUP_SIZE = 1024  # documents per parquet row group, nanochat's value
MAX_DOC_CHARS = 4000


def default_data_dir():
    return os.path.join(get_base_dir(), "base_data")


def split_documents(text, max_chars=MAX_DOC_CHARS):
    """Cut a long text into documents of whole paragraphs, at most max_chars each (a longer paragraph stands alone)."""
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
    paragraphs = [p.strip("\n") for p in re.split(r"\n{2,}", text) if p.strip()]
    docs, current = [], ""
    for p in paragraphs:
        if current and len(current) + 2 + len(p) > max_chars:
            docs.append(current)
            current = ""
        current = p if not current else current + "\n\n" + p
    if current:
        docs.append(current)
    return docs


def list_data_files(data_dir=None):
    """The data files of a directory, sorted; a clear error when there are none."""
    data_dir = data_dir or default_data_dir()
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory {data_dir} does not exist (build the default with `python -m jaxchat.dataset`"
                        f" or pass a directory of .parquet/.jsonl/.txt files)")
    files = sorted(p for p in glob.glob(os.path.join(data_dir, "*")) if p.endswith(DATA_EXTENSIONS))
    if not files:
        raise UserError(f"no data files ({', '.join(DATA_EXTENSIONS)}) in {data_dir}")
    return files


def split_files(split, data_dir=None):
    """nanochat's rule: the last file is validation, all the others train (one file serves as both)."""
    assert split in ("train", "val"), split
    files = list_data_files(data_dir)
    if len(files) == 1:
        return files
    return files[:-1] if split == "train" else files[-1:]


def iter_file_batches(path):
    """Yield lists of document texts from one file: a parquet row group at a time, else chunks of ROW_GROUP_SIZE."""
    try:
        if path.endswith(".parquet"):
            pf = pq.ParquetFile(path)
            if "text" not in pf.schema_arrow.names:
                raise UserError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
            for rg in range(pf.num_row_groups):
                yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            return
        if path.endswith((".jsonl", ".jsonl.gz")):
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
            return
        with open(path, encoding="utf-8") as f:
            docs = split_documents(f.read())
        for i in range(0, len(docs), ROW_GROUP_SIZE):
            yield docs[i:i + ROW_GROUP_SIZE]
    except UserError:
        raise
    except (OSError, pa.ArrowException, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"cannot read data file {path}: {e}") from None


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """nanochat's iterator: for each file of the split, yield the document lists of batches start, start+step, ..."""
    for path in split_files(split, data_dir):
        for i, docs in enumerate(iter_file_batches(path)):
            if i >= start and (i - start) % step == 0:
                yield docs


def iter_texts(split, data_dir=None, max_chars=None, doc_cap=None):
    """Documents of a split, each cropped to doc_cap characters, stopping after max_chars in total."""
    total = 0
    for docs in parquets_iter_batched(split, data_dir=data_dir):
        for doc in docs:
            if doc_cap:
                doc = doc[:doc_cap]
            yield doc
            total += len(doc)
            if max_chars and total >= max_chars:
                return


def write_shard(path, texts):
    """Write one shard in nanochat's format (text column, zstd, 1,024-doc row groups) atomically."""
    tmp = path + ".tmp"
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd", compression_level=3,
                   use_dictionary=False, write_statistics=False)
    os.replace(tmp, path)


def build_default_shards(data_dir=None, num_val_docs=96, docs_per_shard=600):
    """The embedded default: shuffle the shipped corpus (seed 42) into train shards plus a last, validation shard."""
    data_dir = data_dir or default_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    done = os.path.join(data_dir, ".default_corpus_built")
    with file_lock(os.path.join(data_dir, ".lock")):
        if os.path.exists(done):
            return list_data_files(data_dir)
        with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f]
        random.Random(42).shuffle(docs)
        train, val = docs[:-num_val_docs], docs[-num_val_docs:]
        shards = [train[i:i + docs_per_shard] for i in range(0, len(train), docs_per_shard)] + [val]
        for i, texts in enumerate(shards):
            write_shard(os.path.join(data_dir, f"shard_{i:05d}.parquet"), texts)
        with open(done, "w") as f:
            f.write(f"{len(docs)} documents from {os.path.basename(DEFAULT_CORPUS)}\n")
    return list_data_files(data_dir)


def build_parser():
    import argparse
    p = argparse.ArgumentParser(description="Prepare pretraining shards (for now: the embedded default corpus).")
    p.add_argument("--data-dir", "--data_dir", default=None, help="where to write them (default: $JAXCHAT_BASE_DIR/base_data)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    files = build_default_shards(args.data_dir)
    print(f"{len(files)} shards in {os.path.dirname(files[0])} (the last one is validation)")


if __name__ == "__main__":
    run_main(main)

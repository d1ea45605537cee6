"""Pretraining data loader: a grain pipeline with nanochat's BOS-aligned best-fit packing and exact, resumable state.

Streams. A batch of B rows comes from `num_streams` independent streams of B / num_streams rows each (by default one
per device, as nanochat's one loader per GPU); stream j packs documents j, j+n, ... of every row group. The streams,
and so every batch, are the same however many processes share the devices: `DistributedDataLoader` runs only the
streams behind the rows this process's devices hold, and its state holds every stream's, so a run saved by two
processes resumes on one and vice versa.

Pipeline (one per stream):

    MapDataset.source([(file, row_group), ...])   every row group of the split's files, in order
      .repeat(num_epochs)                         None = forever; element k of the repeated source is in epoch k // len
      .map_with_index(read + tokenize)            -> (k, [BOS-prefixed int32 token arrays: this stream's documents])
      .to_iter_dataset(ReadOptions(...))          row groups are read and tokenized ahead in grain's threads
    _BestFitPackIterDataset                       rows of T+1 tokens (below)
      .batch(B).map(split)                        {"inputs": (B, T), "targets": (B, T)} int32
      [ThreadPrefetchIterDataset]                 optional: batches built ahead in a background thread

Packing (nanochat HEAD's): a buffer of at least `buffer_size` tokenized documents, refilled
`tokenizer_batch_size` documents at a time from the current row group; each row of capacity T+1 repeatedly takes the
largest buffered document that fits the remaining space (the earliest one on ties); when none fits, the shortest
(earliest on ties) is cropped to fill the row exactly and its remainder discarded. Every row starts with BOS; no
padding.

Exact state, by reference: the packing buffer is stored as references, not tokens, and not as a replay position.
Every document has an identity (k, i): document i of element k of the repeated source, and the buffer (plus the unread
rest of the current row group) is a set of such identities. The buffer is kept in stream order, which is exactly
(k, i) order, so the set alone restores its order and therefore every later tie-break. The state is the grain parent
iterator's state, those identities as ranges per row group ({"buffer": [[k, "0-17,40"], ...]}) and a few counters:
~5 kB of JSON for a 1,000-document buffer, at most ~12 bytes per buffered document. Restoring re-reads the referenced
row groups (in threads) and re-tokenizes only the referenced documents. A replay position alone would not do: a
document longer than T+1 leaves the buffer only when it is the shortest one, so such documents pile up there (in
steady state most of the buffer) and a replay would have to start arbitrarily far back. (nanochat's resume is
approximate: it skips to the next row group.)
"""
import bisect
import concurrent.futures
import functools
import hashlib
import itertools
import json
import os
import weakref

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxchat import distributed
from jaxchat.common import UserError
from jaxchat.corpus import iter_file_batches, split_files

STATE_VERSION = 2  # 2: one state per stream (1: per process)
_SEQ = 1 << 32  # document identity (k, i) as the single int k * _SEQ + i (stream order = int order)


def _to_ranges(ints):
    """Sorted ints -> '0-5,7,9-12'."""
    runs = [[x for _, x in run] for _, run in itertools.groupby(enumerate(ints), lambda p: p[1] - p[0])]
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _from_ranges(text):
    out = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def _group_refs(seqs):
    """Document identities -> [[k, ranges], ...] in stream order."""
    groups = {}
    for s in sorted(seqs):
        groups.setdefault(s // _SEQ, []).append(s % _SEQ)
    return [[k, _to_ranges(v)] for k, v in groups.items()]


class _BestFitIterator(grain.DatasetIterator):
    def __init__(self, parent, capacity, buffer_size, chunk, epoch_len, load_docs):
        super().__init__(parent)
        self._cap, self._buffer_size, self._chunk, self._epoch_len = capacity, buffer_size, chunk, epoch_len
        self._load_docs = load_docs  # (k, doc indices) -> token arrays, to rebuild the buffer from references
        self._reset()

    def _reset(self):
        self._keys = []        # sorted (length, -identity): the largest that fits and the earliest tie come first
        self._docs = {}        # identity -> int32 tokens
        self._pending = []     # [(identity, tokens)] of the current row group not yet moved into the buffer
        self._pos = 0
        self._k = -1           # last element fetched from the parent
        self._done = False     # the parent is exhausted (finite passes only)
        self._used = self._cropped = 0

    def _add(self, seq, toks):
        self._docs[seq] = toks
        bisect.insort(self._keys, (len(toks), -seq))

    def _take(self, j):
        _, neg = self._keys.pop(j)
        return self._docs.pop(-neg)

    def _refill(self):
        """Move up to `chunk` documents of the current row group into the buffer; False once the source is done."""
        while self._pos >= len(self._pending):
            if self._done:
                return False
            try:
                k, docs = next(self._parent)
            except StopIteration:
                self._done, self._pending, self._pos = True, [], 0
                return False
            self._k, self._pending, self._pos = k, [(k * _SEQ + i, t) for i, t in enumerate(docs)], 0
        for seq, toks in self._pending[self._pos:self._pos + self._chunk]:
            self._add(seq, toks)
        self._pos = min(self._pos + self._chunk, len(self._pending))
        return True

    def __next__(self):
        pieces, rem = [], self._cap
        while rem > 0:
            while len(self._keys) < self._buffer_size and self._refill():
                pass
            if not self._keys:  # finite pass over: the unfinished row is dropped
                raise StopIteration
            j = bisect.bisect_right(self._keys, (rem, 1)) - 1  # largest length <= rem, earliest among equals
            if j >= 0:
                toks = self._take(j)
                pieces.append(toks)
                rem -= len(toks)
            else:  # nothing fits: crop the shortest (earliest among equals) to fill the row exactly
                toks = self._take(bisect.bisect_right(self._keys, (self._keys[0][0], 1)) - 1)
                pieces.append(toks[:rem])
                self._cropped += len(toks) - rem
                rem = 0
        self._used += self._cap
        return {"tokens": np.concatenate(pieces), "epoch": np.int64(max(self._k, 0) // self._epoch_len + 1),
                "used": np.int64(self._used), "cropped": np.int64(self._cropped)}

    def get_state(self):
        return {"parent": self._parent.get_state(), "k": self._k, "done": self._done,
                "buffer": _group_refs(self._docs), "pending": _group_refs(s for s, _ in self._pending[self._pos:]),
                "used": self._used, "cropped": self._cropped}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._reset()
        self._k, self._done, self._used, self._cropped = state["k"], state["done"], state["used"], state["cropped"]
        groups = [(k, _from_ranges(ranges)) for k, ranges in state["buffer"] + state["pending"]]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # many row groups to re-read after a long run
            loaded = list(pool.map(lambda g: self._load_docs(*g), groups))
        for n, ((k, idx), docs) in enumerate(zip(groups, loaded)):
            docs = [(k * _SEQ + i, t) for i, t in zip(idx, docs)]
            if n < len(state["buffer"]):
                for seq, toks in docs:
                    self._add(seq, toks)
            else:
                self._pending += docs


class _BestFitPackIterDataset(grain.IterDataset):
    def __init__(self, parent, **kwargs):
        super().__init__(parent)
        self._kwargs = kwargs

    def __iter__(self):
        return _BestFitIterator(self._parent.__iter__(), **self._kwargs)

    def __str__(self):
        return f"BestFitPackIterDataset(capacity={self._kwargs['capacity']})"


def _split_rows(batch):
    rows = batch["tokens"]
    return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:]),
            "epoch": int(batch["epoch"][-1]), "used": int(batch["used"][-1]), "cropped": int(batch["cropped"][-1])}


@functools.lru_cache(maxsize=32)  # a process's streams read the same row groups at about the same time: once
def _read_row_group(path, rg, _version):
    """The texts of one parquet row group; `_version` (mtime, size) keeps a rewritten file from being served stale."""
    try:
        return pq.ParquetFile(path).read_row_group(rg, columns=["text"]).column("text").to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read data file {path} (row group {rg}): {e}") from None


class _ShardReader:
    """Row groups of the split's files -> this stream's texts -> BOS-prefixed int32 token arrays. Held by the grain
    pipeline (not the DataLoader, so that an abandoned DataLoader can be collected and close its threads)."""

    def __init__(self, files, tokenizer, tokenizer_threads, tokenizer_batch_size, stream, num_streams):
        self.files, self.tokenizer, self.stream, self.num_streams = files, tokenizer, stream, num_streams
        self._bos, self._threads, self._tbs = tokenizer.get_bos_token_id(), tokenizer_threads, tokenizer_batch_size
        self._text_cache = (None, None)  # (path, [row-group texts]) of the last non-parquet file read
        self.elements = []  # [(file index, row group)] of the split, set by the DataLoader

    def row_group_sizes(self, path):
        if path.endswith(".parquet"):
            try:
                pf = pq.ParquetFile(path)
                if "text" not in pf.schema_arrow.names:
                    raise UserError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
                return [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
            except (OSError, pa.ArrowException) as e:
                raise UserError(f"cannot read data file {path}: {e}") from None
        return [len(docs) for docs in self._file_batches(path)]

    def _file_batches(self, path):
        cached_path, batches = self._text_cache  # one tuple read: safe across grain's reader threads
        if cached_path != path:
            batches = list(iter_file_batches(path))
            self._text_cache = (path, batches)
        return batches

    def read_texts(self, file_idx, rg):
        """This stream's documents of a row group."""
        path = self.files[file_idx]
        if not path.endswith(".parquet"):
            texts = self._file_batches(path)[rg]
        else:
            try:
                stat = os.stat(path)
            except OSError as e:
                raise UserError(f"cannot read data file {path} (row group {rg}): {e}") from None
            texts = _read_row_group(path, rg, (stat.st_mtime_ns, stat.st_size))
        return texts[self.stream::self.num_streams]

    def tokenize(self, texts):
        out = []
        for i in range(0, len(texts), self._tbs):
            ids = self.tokenizer.encode(texts[i:i + self._tbs], prepend=self._bos, num_threads=self._threads)
            out += [np.array(t, dtype=np.int32) for t in ids]
        return out

    def read_and_tokenize(self, k, element):
        return k, self.tokenize(self.read_texts(*element))

    def load_docs(self, k, doc_indices):
        texts = self.read_texts(*self.elements[k % len(self.elements)])
        return self.tokenize([texts[i] for i in doc_indices])


def _close_iterator(holder):
    if holder:
        holder.pop().close()


class _Batches:
    """What both loaders share: iteration, `accum` micro-batches stacked, closing as a context manager."""

    def __iter__(self):
        return self

    def next_stacked(self, accum):
        """`accum` micro-batches stacked: {"inputs", "targets"} of shape (accum, B, T), as train_step takes."""
        micro = [next(self) for _ in range(accum)]
        return {key: np.stack([m[key] for m in micro]) for key in ("inputs", "targets")}

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


class DataLoader(_Batches):
    """Batches {"inputs", "targets"} (np.int32, (B, T)) of BOS-aligned best-fit rows from a split's shards.

    Iterates forever over epochs (`num_epochs=None`) or makes a finite pass (`num_epochs=1`: StopIteration when the
    documents cannot fill another batch). `get_state()` -> a small JSON-serializable dict; `DataLoader(..., state=s)`
    or `set_state(s)` continues with exactly the batches the uninterrupted loader would have produced (B may differ:
    the state is a position in the row stream). Counters: `epoch` (1-based, as nanochat's), `batches`,
    `tokens_used`, `tokens_cropped`, `cropped_fraction`. Extra knobs: `read_threads`/`read_ahead` (row groups read and
    tokenized ahead in grain's threads), `prefetch_batches` (batches built ahead in a background thread; the state
    stays that of the last batch returned). `close()` (or `with`, or dropping the loader) stops the threads.
    """

    def __init__(self, tokenizer, B, T, split, data_dir=None, *, buffer_size=1000, tokenizer_threads=4,
                 tokenizer_batch_size=128, stream=0, num_streams=1, state=None, num_epochs=None,
                 read_threads=1, read_ahead=2, prefetch_batches=0):
        assert 0 <= stream < num_streams and B >= 1 and T >= 1 and buffer_size >= 1
        self.B, self.T, self.split, self.stream, self.num_streams = B, T, split, stream, num_streams
        self.files = split_files(split, data_dir)
        reader = _ShardReader(self.files, tokenizer, tokenizer_threads, tokenizer_batch_size, stream, num_streams)
        n_rgs, n_docs = [], 0
        for path in self.files:
            counts = reader.row_group_sizes(path)
            n_rgs.append(len(counts))
            n_docs += sum(len(range(stream, c, num_streams)) for c in counts)
        reader.elements = [(f, rg) for f, n in enumerate(n_rgs) for rg in range(n)]
        if n_docs == 0:
            raise UserError(f"the {split} split ({len(self.files)} file(s) in {self.files[0].rsplit('/', 1)[0]}) has "
                            f"no documents for stream {stream} of {num_streams} (one per device; files have "
                            f"{sum(n_rgs)} row groups in all)")
        self.row_groups = list(reader.elements)  # (file index, row group) of one epoch
        names = [[path.rsplit("/", 1)[-1], n] for path, n in zip(self.files, n_rgs)]
        self._config = {"version": STATE_VERSION, "split": split, "seq_len": T, "buffer_size": buffer_size,
                        "tokenizer_batch_size": tokenizer_batch_size, "vocab_size": tokenizer.get_vocab_size(),
                        "stream": [stream, num_streams],
                        "data": hashlib.sha1(json.dumps(names).encode()).hexdigest()[:16]}
        source = grain.MapDataset.source(reader.elements).repeat(num_epochs).map_with_index(reader.read_and_tokenize)
        rows = _BestFitPackIterDataset(
            source.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_ahead)),
            capacity=T + 1, buffer_size=buffer_size, chunk=tokenizer_batch_size, epoch_len=len(reader.elements),
            load_docs=reader.load_docs)
        ds = rows.batch(B, drop_remainder=True).map(_split_rows)
        if prefetch_batches:
            ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
        self._holder = [iter(ds)]  # the finalizer empties it: the iterator is gone before interpreter teardown
        self._close = weakref.finalize(self, _close_iterator, self._holder)  # at close(), when dropped, or at exit
        self.epoch, self.batches, self.tokens_used, self.tokens_cropped = 1, 0, 0, 0
        if state is not None:
            self.set_state(state)

    # ---- iteration and state ------------------------------------------------------------------------------------
    @property
    def _it(self):
        if not self._holder:
            raise RuntimeError("this DataLoader is closed")
        return self._holder[0]

    def __next__(self):
        b = next(self._it)
        self.epoch, self.tokens_used, self.tokens_cropped = b["epoch"], b["used"], b["cropped"]
        self.batches += 1
        return {"inputs": b["inputs"], "targets": b["targets"]}

    @property
    def cropped_fraction(self):
        """Tokens discarded by cropping / tokens of all documents taken from the buffer so far (nanochat: ~35% at
        T=2048 on FineWeb)."""
        total = self.tokens_used + self.tokens_cropped
        return self.tokens_cropped / total if total else 0.0

    def get_state(self):
        return {**self._config, "epoch": self.epoch, "batches": self.batches, "tokens_used": self.tokens_used,
                "tokens_cropped": self.tokens_cropped, "pipeline": self._it.get_state()}

    def set_state(self, state):
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise UserError(f"data loader state of an unknown format (expected a dict with version {STATE_VERSION})")
        if diff := [f"{key}: saved {state.get(key)!r}, now {value!r}" for key, value in self._config.items()
                    if state.get(key) != value and key != "version"]:
            raise UserError("the data loader state does not match this loader (exact resume impossible): "
                            + "; ".join(diff) + (" (the data files or their row groups changed)"
                                                 if any(d.startswith("data:") for d in diff) else ""))
        self._it.set_state(state["pipeline"])
        self.epoch, self.batches = state["epoch"], state["batches"]
        self.tokens_used, self.tokens_cropped = state["tokens_used"], state["tokens_cropped"]

    def close(self):
        self._close()


def agree_on_split(split, data_dir):
    """Every process checks the split's files (`split_files`: a recorded shard missing is refused) and all stop with
    the same error: one that alone refused would leave the others waiting in the next collective until the
    timeout, and its own message could be lost when process 0 ends the job first."""
    try:
        split_files(split, data_dir)
        problem = None
    except UserError as e:
        problem = str(e)
    problems = distributed.all_gather_json(f"data/{split}", problem)
    if failed := [(i, p) for i, p in enumerate(problems) if p]:
        i, problem = failed[0]
        raise UserError(problem if len(problems) == 1 else f"process {i}: {problem}")


class DistributedDataLoader(_Batches):
    """Batches {"inputs", "targets"} of B global rows from `num_streams` streams (B / num_streams rows each;
    default one stream per device), of which this process builds only `rows` (a range of the global rows; default
    the rows its devices hold under the active mesh), for `sharding.shard_batch(batch, global_rows=B)`.
    `get_state()` holds every stream's state, gathered from every process (all call it together); `state=`
    restores any process's share of it. Other keywords: DataLoader's."""

    def __init__(self, tokenizer, B, T, split, data_dir=None, *, num_streams=None, rows=None, state=None, **kwargs):
        if num_streams is None or rows is None:
            import jax
            from jaxchat import sharding
            num_streams = jax.device_count() if num_streams is None else num_streams
            rows = sharding.local_rows(B) if rows is None else rows
        per, rem = divmod(B, num_streams)
        assert rem == 0 and rows.start % per == 0 and len(rows) % per == 0, (B, num_streams, rows)
        if state is not None and "streams" not in state:
            raise UserError("the data loader state predates per-device streams (a jaxchat before multi-process "
                            "support): this run cannot resume exactly; start it again")
        if state is not None and len(state["streams"]) != num_streams:
            raise UserError(f"the data loader state has {len(state['streams'])} streams, this run "
                            f"{num_streams} (one per device): resume on as many devices")
        self.B, self.streams = B, range(rows.start // per, rows.stop // per)
        agree_on_split(split, data_dir)
        self.loaders = []
        try:
            for j in self.streams:
                self.loaders.append(DataLoader(tokenizer, per, T, split, data_dir, stream=j, num_streams=num_streams,
                                               state=None if state is None else state["streams"][j], **kwargs))
        except BaseException:
            self.close()
            raise

    @property
    def epoch(self):
        return min(loader.epoch for loader in self.loaders)

    def __next__(self):
        parts = [next(loader) for loader in self.loaders]
        return {key: np.concatenate([p[key] for p in parts]) for key in ("inputs", "targets")}

    def get_state(self):
        shares = distributed.all_gather_json("loader_state", {j: l.get_state() for j, l in zip(self.streams,
                                                                                                self.loaders)})
        merged = {int(j): state for share in shares for j, state in share.items()}
        return {"streams": [merged[j] for j in range(len(merged))]}

    def close(self):
        for loader in self.loaders:
            loader.close()

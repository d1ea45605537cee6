"""The pretraining loader: BOS-aligned best-fit packing, exact resumable state, streams, clear errors."""
import gc
import json
import os
import random
import threading
import time

import numpy as np
import pytest

import jaxchat.corpus
from jaxchat.common import UserError
from jaxchat.dataloader import DataLoader, DistributedDataLoader
from jaxchat.tokenizer import RustBPETokenizer

WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be or has had "
         "river mountain engine theory garden winter music number history language orbit protein market").split()
RG = 16  # documents per row group in the test shards
FILE_DOCS = [50, 40, 33, 20]  # three train files (4, 3, 3 row groups) and a validation file
B, T = 4, 64
KW = dict(buffer_size=24, tokenizer_batch_size=8, tokenizer_threads=2, stream=0, num_streams=1)


class CharTokenizer:
    """One token per character (2 + code point), BOS = 1: documents of exactly known lengths."""

    def get_bos_token_id(self):
        return 1

    def get_vocab_size(self):
        return 1 << 20

    def encode(self, texts, prepend=None, num_threads=1):
        return [[prepend] + [2 + ord(c) for c in t] for t in texts]


def write_files(d, files, row_group=RG):
    os.makedirs(d, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jaxchat.corpus, "ROW_GROUP_SIZE", row_group)
        for i, texts in enumerate(files):
            jaxchat.corpus.write_shard(os.path.join(d, f"shard_{i:05d}.parquet"), texts)
    return str(d)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    files = [[" ".join(rng.choice(WORDS) for _ in range(min(200, int(3 * rng.paretovariate(1.1)))))
              for _ in range(n)] for n in FILE_DOCS]
    d = write_files(tmp_path_factory.mktemp("corpus") / "data", files)
    tok = RustBPETokenizer.train_from_iterator(iter(sum(files, [])), 384)
    return d, files, tok


def take(loader, n):
    return [next(loader) for _ in range(n)]


def rows_of(batch):
    return np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


def test_packing_invariants_and_determinism(corpus):
    d, files, tok = corpus
    bos = tok.get_bos_token_id()
    docs = [tuple(ids) for ids in tok.encode(sum(files[:-1], []), prepend=bos)]
    loader = DataLoader(tok, B, T, "train", d, **KW)
    batches = take(loader, 40)
    assert loader.epoch >= 2  # several epochs of the small train split
    n_seg = n_cropped = 0
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (B, T) and b["inputs"].dtype == b["targets"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        for row in rows_of(b):
            assert row[0] == bos and len(row) == T + 1
            starts = list(np.flatnonzero(row == bos)) + [T + 1]
            for j, (s, e) in enumerate(zip(starts, starts[1:])):
                seg = tuple(row[s:e])
                n_seg += 1
                if seg in docs:
                    continue
                # only a row's last segment may be a crop, and a crop keeps a document's first tokens
                assert j == len(starts) - 2 and any(doc[:len(seg)] == seg for doc in docs), seg
                n_cropped += 1
    assert n_cropped > 10 and n_seg > 2 * len(batches) * B  # both whole documents and crops are exercised
    assert_same(batches, take(DataLoader(tok, B, T, "train", d, **KW), 40))
    assert 0 < loader.cropped_fraction < 1
    assert loader.tokens_used == 40 * B * (T + 1)


def nanochat_rows(doc_batches, capacity, buffer_size, n_rows):
    """nanochat HEAD's algorithm, transcribed: list buffer, linear scans, pop."""
    buffer, rows, it = [], [], iter(doc_batches)
    for _ in range(n_rows):
        row = []
        while len(row) < capacity:
            while len(buffer) < buffer_size:
                buffer.extend(next(it))
            remaining = capacity - len(row)
            best, best_len = -1, 0
            for i, doc in enumerate(buffer):
                if best_len < len(doc) <= remaining:
                    best, best_len = i, len(doc)
            if best >= 0:
                row += buffer.pop(best)
            else:
                row += buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i])))[:remaining]
        rows.append(row)
    return rows


def test_matches_nanochat_best_fit_including_ties(tmp_path):
    rng = random.Random(1)
    # few distinct lengths: many ties, so the tie-breaking order is checked too
    files = [[chr(65 + i % 50) * rng.choice([0, 2, 5, 9, 9, 14, 30, 70]) for i in range(n)] for n in (37, 29, 5)]
    d = write_files(tmp_path, files, row_group=10)
    tok = CharTokenizer()

    def doc_batches():
        while True:
            for texts in files[:-1]:
                for r in range(0, len(texts), 10):
                    rg = tok.encode(texts[r:r + 10], prepend=1)
                    for i in range(0, len(rg), 4):
                        yield rg[i:i + 4]

    loader = DataLoader(tok, 3, 23, "train", d, buffer_size=7, tokenizer_batch_size=4)
    got = np.concatenate([rows_of(b) for b in take(loader, 60)])
    np.testing.assert_array_equal(got, np.array(nanochat_rows(doc_batches(), 24, 7, 180)))


def test_best_fit_hand_case_and_cropped_fraction(tmp_path):
    # BOS-prefixed lengths 7, 3, 5, 2, 9, 4, 6 (letters a..g); rows of capacity 10, one pass over all of them:
    # row 1: e(9) + the first token of d (nothing fits the last slot: the shortest doc, d, is cropped: 1 token lost)
    # row 2: a(7) + b(3);  row 3: g(6) + f(4);  c(5) cannot fill a row: the finite pass ends
    lengths = [7, 3, 5, 2, 9, 4, 6]
    texts = [chr(97 + i) * (n - 1) for i, n in enumerate(lengths)]
    d = write_files(tmp_path, [texts])
    loader = DataLoader(CharTokenizer(), 1, 9, "train", d, buffer_size=100, num_epochs=1)
    rows = [rows_of(b)[0] for b in loader]
    doc = {ch: [1] + [2 + ord(ch)] * (n - 1) for ch, n in zip("abcdefg", lengths)}
    assert [list(r) for r in rows] == [doc["e"] + doc["d"][:1], doc["a"] + doc["b"], doc["g"] + doc["f"]]
    assert loader.tokens_cropped == 1 and loader.tokens_used == 30
    assert loader.cropped_fraction == pytest.approx(1 / 31)


def test_state_round_trip_is_exact(corpus):
    d, _, tok = corpus
    straight = DataLoader(tok, B, T, "train", d, **KW)
    states = [straight.get_state()]
    batches = []
    for _ in range(60):
        batches.append(next(straight))
        states.append(straight.get_state())
    # element k of the pipeline: files hold row groups 0-3, 4-6, 7-9; epoch 2 starts at k = 10
    ks = [s["pipeline"]["k"] for s in states]
    file_boundary = next(i for i, k in enumerate(ks) if k >= 4)
    epoch_boundary = next(i for i, s in enumerate(states) if s["epoch"] == 2)
    assert 0 < file_boundary < epoch_boundary < 50
    checks = sorted({0, 1, 3, file_boundary - 1, file_boundary, epoch_boundary - 1, epoch_boundary, 50})
    for k in checks:
        state = json.loads(json.dumps(states[k]))  # JSON-serializable and survives the trip
        assert len(json.dumps(state)) < 4000
        resumed = DataLoader(tok, B, T, "train", d, state=state, **KW)
        assert resumed.epoch == states[k]["epoch"] and resumed.batches == k
        assert_same(take(resumed, 6), batches[k:k + 6])
        assert resumed.get_state() == states[k + 6]
    # set_state rewinds a used loader; a background prefetch thread keeps the state of the last batch returned
    straight.set_state(states[5])
    assert_same(take(straight, 3), batches[5:8])
    with DataLoader(tok, B, T, "train", d, prefetch_batches=3, **KW) as pre:
        assert_same(take(pre, 12), batches[:12])
        assert pre.get_state() == states[12]
    # the state is a position in the row stream: a different B continues with the same rows
    half = DataLoader(tok, B // 2, T, "train", d, state=states[7], **KW)
    np.testing.assert_array_equal(np.concatenate([rows_of(b) for b in take(half, 4)]),
                                  np.concatenate([rows_of(b) for b in batches[7:9]]))


def test_stack_micro_batches(corpus):
    d, _, tok = corpus
    ref = take(DataLoader(tok, B, T, "train", d, **KW), 6)
    loader = DataLoader(tok, B, T, "train", d, **KW)
    batch, state = loader.next_stacked(3), loader.get_state()
    assert batch["inputs"].shape == batch["targets"].shape == (3, B, T) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"], np.stack([r["targets"] for r in ref[:3]]))
    assert state == loader.get_state() and state["batches"] == 3
    np.testing.assert_array_equal(
        DataLoader(tok, B, T, "train", d, state=state, **KW).next_stacked(3)["inputs"],
        np.stack([r["inputs"] for r in ref[3:]]))


def test_val_pass_is_fresh_and_finite(corpus):
    d, files, tok = corpus
    first = list(DataLoader(tok, 2, 32, "val", d, num_epochs=1, **KW))
    again = list(DataLoader(tok, 2, 32, "val", d, num_epochs=1, **KW))
    assert first and len(first) * 2 * 33 <= sum(len(t) for t in tok.encode(files[-1], prepend=0))
    assert_same(first, again)
    # the forever loader refills from the next epoch instead of draining (so it differs after a while); fresh ones agree
    assert_same(take(DataLoader(tok, 2, 32, "val", d, **KW), 5), take(DataLoader(tok, 2, 32, "val", d, **KW), 5))


def test_streams_split_every_row_group(tmp_path):
    """Stream j of n packs documents j, j+n, ... of every row group: disjoint streams that cover the data."""
    texts = [[f"{f}.{i:03d}|" + "x" * (i % 7) for i in range(n)] for f, n in enumerate((50, 40, 33, 20))]
    d = write_files(tmp_path, texts)
    tok = CharTokenizer()
    seen = []
    for j in range(3):
        loader = DataLoader(tok, 2, 40, "train", d, buffer_size=8, tokenizer_batch_size=4, num_epochs=1, stream=j,
                            num_streams=3)
        assert loader.row_groups == [(f, g) for f, n in enumerate((4, 3, 3)) for g in range(n)]
        ids = set()
        for b in loader:
            for row in rows_of(b):
                docs = "".join(chr(t - 2) if t != 1 else "\n" for t in row).split("\n")[1:]
                ids |= {(int(doc[0]), int(doc[2:5])) for doc in docs if len(doc) >= 6}  # "f.iii|" was not cropped
        assert ids and all((i % RG) % 3 == j for _, i in ids)  # this stream's documents only
        seen.append(ids)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert {(f, i // RG) for f, i in set().union(*seen)} == {(f, g) for f, n in enumerate((4, 3, 3)) for g in range(n)}


def test_distributed_loader_is_its_streams_side_by_side(corpus):
    """The global batch is the streams' rows in stream order, whichever process builds which streams; its state
    restores any share of them (a run saved by 2 processes resumes on 1, and the reverse)."""
    d, _, tok = corpus
    kw = {k: v for k, v in KW.items() if k not in ("stream", "num_streams")}
    whole = DistributedDataLoader(tok, 4, T, "train", d, num_streams=4, **kw)
    streams = [DataLoader(tok, 1, T, "train", d, stream=j, num_streams=4, **kw) for j in range(4)]
    for _ in range(3):
        got = next(whole)["inputs"]
        np.testing.assert_array_equal(got, np.concatenate([next(s)["inputs"] for s in streams]))
    state = whole.get_state()
    halves = [DistributedDataLoader(tok, 4, T, "train", d, num_streams=4, rows=range(r, r + 2), state=state, **kw)
              for r in (0, 2)]
    after = whole.next_stacked(2)["inputs"]
    np.testing.assert_array_equal(np.concatenate([h.next_stacked(2)["inputs"] for h in halves], axis=1), after)
    with pytest.raises(UserError, match="4 streams, this run 2"):
        DistributedDataLoader(tok, 4, T, "train", d, num_streams=2, state=state, **kw)
    with pytest.raises(UserError, match="predates per-device streams"):  # a checkpoint of an older jaxchat
        DistributedDataLoader(tok, 4, T, "train", d, num_streams=4, state=state["streams"][0], **kw)


def test_errors_name_the_file(corpus, tmp_path):
    d, files, tok = corpus
    for name, make in [("broken", lambda p: os.symlink(tmp_path / "nowhere.parquet", p)),
                       ("corrupt", lambda p: open(p, "wb").write(b"PAR1 not a parquet file PAR1"))]:
        bad = write_files(tmp_path / name, files[:2])
        make(os.path.join(bad, "shard_00000x.parquet"))
        with pytest.raises(UserError, match="shard_00000x.parquet"):
            DataLoader(tok, B, T, "train", bad, **KW)
    # a shard that goes missing or is damaged after the loader started: the error comes out of grain's reader thread
    late = write_files(tmp_path / "late", files)
    loader = DataLoader(tok, B, T, "train", late, **KW)
    os.remove(os.path.join(late, "shard_00002.parquet"))
    with pytest.raises(UserError, match="shard_00002.parquet"):
        take(loader, 100)
    empty = write_files(tmp_path / "empty", [[]])
    with pytest.raises(UserError, match="no documents"):
        DataLoader(tok, B, T, "train", empty, **KW)
    two = write_files(tmp_path / "two", [["a b", "c d"], ["e f"]])  # train: 2 documents; val: 1
    with pytest.raises(UserError, match="stream 2 of 3"):
        DataLoader(tok, B, T, "train", two, **{**KW, "stream": 2, "num_streams": 3})
    state = DataLoader(tok, B, T, "train", d, **KW).get_state()
    with pytest.raises(UserError, match="seq_len"):
        DataLoader(tok, B, T + 1, "train", d, state=state, **KW)
    with pytest.raises(UserError, match="data: saved"):
        DataLoader(tok, B, T, "train", d, state={**state, "data": "0" * 16}, **KW)
    with pytest.raises(UserError, match="unknown format"):
        DataLoader(tok, B, T, "train", d, state={"step": 3}, **KW)


def test_dropped_loaders_stop_their_threads(corpus):
    d, _, tok = corpus
    before = threading.active_count()
    for _ in range(5):
        take(DataLoader(tok, B, T, "train", d, prefetch_batches=2, **KW), 2)
    gc.collect()
    for _ in range(100):  # threads end shortly after their loader is collected
        if threading.active_count() <= before:
            break
        time.sleep(0.05)
    assert threading.active_count() <= before, threading.enumerate()


def test_text_files_resume_exactly(corpus, tmp_path):
    _, files, tok = corpus
    d = tmp_path / "byo"
    d.mkdir()
    for i, texts in enumerate(files):
        (d / f"part{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    loader = DataLoader(tok, B, T, "train", str(d), **KW)
    take(loader, 9)
    state = loader.get_state()
    assert_same(take(DataLoader(tok, B, T, "train", str(d), state=state, **KW), 5), take(loader, 5))

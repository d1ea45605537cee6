"""The train/val split of a data directory is recorded when jaxchat builds or downloads it (manifest.json) and checked
by every stage that reads it: a lost shard is refused by name instead of silently changing what trains or validates,
on every process of a run alike."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from _harness import fresh_env
from jaxchat import corpus, dataset
from jaxchat.common import UserError
from jaxchat.dataloader import DistributedDataLoader
from test_download import download, server  # noqa: F401 (the local shard server and its fixture)


def names(paths):
    return [os.path.basename(p) for p in paths]


def record(d):
    with open(os.path.join(d, corpus.MANIFEST)) as f:
        return json.load(f)


def split_names(d):
    return names(corpus.split_files("train", d)), names(corpus.split_files("val", d))


def test_default_corpus_records_its_split_and_refuses_a_lost_shard(tmp_path):
    d = tmp_path / "default"
    dataset.build_default_shards(d)
    train = ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert record(d) == {"val": "shard_00003.parquet", "train": train}
    assert split_names(d) == (train, ["shard_00003.parquet"])
    # before: the middle shard's loss trained on without a word; the val shard's made shard_00002 validation
    for lost in ("shard_00001.parquet", "shard_00003.parquet"):
        os.rename(d / lost, tmp_path / lost)
        for split in ("train", "val"):
            with pytest.raises(UserError, match=f"missing 1 of its 4 shards \\({lost}\\).*rebuild it"):
                corpus.split_files(split, d)
        with pytest.raises(UserError, match=lost):  # what tok_train reads, and the data stage's own check
            next(corpus.iter_texts("train", d))
        with pytest.raises(UserError, match=lost):
            dataset.build_default_shards(d)
        os.rename(tmp_path / lost, d / lost)
    assert split_names(d) == (train, ["shard_00003.parquet"])


def test_a_directory_from_before_the_record(tmp_path):
    """No manifest: a directory whose names leave no doubt (the default's marker, a download's pinned val shard
    with train shards 0..K-1) is recorded at its first use; a gap is refused, never recorded."""
    d = tmp_path / "default"
    dataset.build_default_shards(d)
    os.remove(d / corpus.MANIFEST)
    os.remove(d / "shard_00003.parquet")  # the default's shard count is fixed by the build: the loss is seen
    with pytest.raises(UserError, match="shard_00003.parquet"):
        corpus.split_files("val", d)
    assert not os.path.exists(d / corpus.MANIFEST)

    old = tmp_path / "old_download"
    old.mkdir()
    for i in (0, 1, 2, corpus.MAX_SHARD):
        corpus.write_shard(str(old / corpus.shard_name(i)), [f"doc of shard {i}"])
    assert split_names(old) == (["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"],
                                ["shard_01822.parquet"])
    assert record(old)["val"] == "shard_01822.parquet" and len(record(old)["train"]) == 3  # recorded at first use
    os.remove(old / "shard_01822.parquet")  # from now on its loss is seen, not read as "shard_00002 is val"
    with pytest.raises(UserError, match=r"missing 1 of its 4 shards \(shard_01822.parquet\).*-n 3"):
        corpus.split_files("val", old)

    gap = tmp_path / "gap"
    gap.mkdir()
    for i in (0, 2, corpus.MAX_SHARD):
        corpus.write_shard(str(gap / corpus.shard_name(i)), [f"doc of shard {i}"])
    with pytest.raises(UserError, match=r"missing 1 of its 4 shards \(shard_00001.parquet\)"):
        corpus.split_files("train", gap)
    assert not os.path.exists(gap / corpus.MANIFEST)


def test_shards_of_your_own(tmp_path):
    """shard_NNNNN files without the pinned val shard (nanochat's older downloads, or yours): nanochat's last-file
    rule, nothing written into the directory, but a gap in the numbers is a lost middle shard."""
    own = tmp_path / "own"
    own.mkdir()
    for i in range(3):
        corpus.write_shard(str(own / corpus.shard_name(i)), [f"doc {i}"])
    assert split_names(own) == (["shard_00000.parquet", "shard_00001.parquet"], ["shard_00002.parquet"])
    os.remove(own / "shard_00001.parquet")
    with pytest.raises(UserError, match=r"missing 1 of its 3 shards \(shard_00001.parquet\)"):
        corpus.split_files("train", own)
    assert sorted(os.listdir(own)) == ["shard_00000.parquet", "shard_00002.parquet"]


def test_downloads_keep_the_record(server, tmp_path):  # noqa: F811
    d = tmp_path / "d"
    val = corpus.shard_name(corpus.MAX_SHARD)
    dataset.main(["-n", "2", "--base-url", f"{server.root}/plain", "--data-dir", str(d)])
    assert record(d) == {"val": val, "train": ["shard_00000.parquet", "shard_00001.parquet"]}
    dataset.main(["-n", "4", "--base-url", f"{server.root}/plain", "--data-dir", str(d)])  # more shards later
    four = [corpus.shard_name(i) for i in range(4)]
    assert record(d) == {"val": val, "train": four}
    dataset.main(["-n", "1", "--base-url", f"{server.root}/plain", "--data-dir", str(d)])  # fewer: none forgotten
    assert record(d) == {"val": val, "train": four} and split_names(d) == (four, [val])
    for lost in ("shard_00002.parquet", val):
        os.remove(d / lost)
        with pytest.raises(UserError, match=f"missing 1 of its 5 shards \\({lost}\\).*-n 4 --data-dir="):
            corpus.split_files("train", d)
        dataset.main(["-n", "4", "--base-url", f"{server.root}/plain", "--data-dir", str(d)])  # the fix it names
        assert split_names(d) == (four, [val])

    # a failed download records nothing: the shards it left behind a gap are refused, not trained on
    failed = tmp_path / "failed"
    server.modes["shard_00001.parquet"] = "404"
    with pytest.raises(dataset.DownloadError):
        download(server, failed, dataset.shard_indices(3))
    assert not os.path.exists(failed / corpus.MANIFEST)
    with pytest.raises(UserError, match=r"shard_00001.parquet\).*-n 3"):
        corpus.split_files("train", failed)
    del server.modes["shard_00001.parquet"]
    download(server, failed, dataset.shard_indices(3))
    assert record(failed)["train"] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    # shards downloaded but not (yet) in the record, as while a larger download runs, are not used
    shutil.copy(d / "shard_00003.parquet", failed / "shard_00003.parquet")
    assert names(corpus.split_files("train", failed)) == record(failed)["train"]


def test_the_loader_refuses_a_lost_shard(tmp_path):
    d = tmp_path / "default"
    dataset.build_default_shards(d)
    os.remove(d / "shard_00003.parquet")
    with pytest.raises(UserError, match=r"shard_00003.parquet"):  # not a val pass over shard_00002
        DistributedDataLoader(None, 4, 16, "val", str(d), num_streams=1, rows=range(0, 4))


AGREE = """
import os, sys
from jaxchat.distributed import run_main
from jaxchat.dataloader import agree_on_split
def main(argv):
    agree_on_split("train", argv[int(os.environ["JAXCHAT_PROCESS_ID"])])
    print("agreed", flush=True)
run_main(main)
"""


@pytest.mark.slow
def test_every_process_reaches_the_same_decision(tmp_path):
    """Two processes, and only the second one's data has lost a shard: both stop at once, and process 0 (the one
    whose output is shown) names the missing shard. Without the agreement the first would go on and wait in the
    next collective until the distributed timeout."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    dataset.build_default_shards(good)
    shutil.copytree(good, bad)
    os.remove(bad / "shard_00001.parquet")
    env = fresh_env(processes=2, JAXCHAT_DISTRIBUTED_TIMEOUT=60)
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(good), str(bad)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "JAXCHAT_PROCESS_ID": str(i)})
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    elapsed = time.monotonic() - t0
    assert procs[0].returncode == 1 and procs[1].returncode != 0 and "agreed" not in outs[0][0] + outs[1][0], outs
    assert outs[0][1].startswith("error: process 1: ") and "missing 1 of its 4 shards (shard_00001.parquet)" in \
        outs[0][1] and outs[0][1].count("\n") == 1, outs[0][1]  # process 0 says why, in one line
    assert elapsed < 50, elapsed  # well inside the 60 s timeout: nobody waited for a peer that had given up

"""Prepare the pretraining text (`jaxchat.corpus` reads it): download nanochat's shards, or build the embedded default.

One directory holds one corpus, never a mix (the last-file rule would otherwise pick a val file from the wrong one):
- `python -m jaxchat.dataset -n N` downloads nanochat's FineWeb-EDU-100B shuffle: train shards 0..N-1 plus the pinned
  val shard `shard_01822` (as nanochat HEAD does), which is fetched first, so it sorts last from the first moment on and
  val never depends on how far a download got. An embedded default found in the directory is replaced (it rebuilds
  offline); a directory with other files (not `shard_NNNNN.parquet`) is refused.
- `python -m jaxchat.dataset` (no `-n`) builds the embedded default offline into an empty directory (marked with
  `.default_corpus_built`); it refuses a directory that already holds other data: use `--data-dir` for it.
Either records the directory's split in its `manifest.json`.
"""
import argparse
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

from jaxchat import distributed
from jaxchat.common import UserError, count_or_unset, file_lock, flag_adder, positive_int
from jaxchat.corpus import (DEFAULT_CORPUS, DEFAULT_MARKER, MANIFEST, MAX_SHARD, SHARD_RE, check_parquet,
                            default_data_dir, default_shards, found_data_files, read_manifest, shard_name, split_files,
                            write_manifest, write_shard)
from jaxchat.distributed import run_main
from jaxchat.download import RETRY_DELAY, DownloadError, Progress, download_one


def build_default_shards(data_dir=None):
    """Write the embedded default into data_dir (once: a built directory is only checked); returns its files."""
    data_dir = str(data_dir or default_data_dir())
    os.makedirs(data_dir, exist_ok=True)
    done = os.path.join(data_dir, DEFAULT_MARKER)
    with file_lock(os.path.join(data_dir, ".lock")):
        if not os.path.exists(done):
            if present := found_data_files(data_dir):  # downloaded shards or the user's own: never overwrite or mix
                raise UserError(f"{data_dir} already holds {len(present)} data files that are not the embedded "
                                f"default (downloaded shards or your own); build the default elsewhere with "
                                f"--data-dir=DIR (the launcher passes it to every stage), or move those files away")
            shards = default_shards()
            for i, texts in enumerate(shards):
                write_shard(os.path.join(data_dir, shard_name(i)), texts)
            write_manifest(data_dir, [shard_name(i) for i in range(len(shards) - 1)], shard_name(len(shards) - 1))
            with open(done, "w") as f:
                f.write(f"{sum(map(len, shards))} documents from {os.path.basename(DEFAULT_CORPUS)}\n")
    return split_files("train", data_dir) + split_files("val", data_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Downloading nanochat's FineWeb-EDU-100B shuffle (standard-library HTTP)

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"


def shard_indices(num_files):
    """-n N: the pinned val shard MAX_SHARD first, then train shards 0..N-1; -1 (or N >= MAX_SHARD) = all of them."""
    if num_files == 0 or num_files < -1:
        raise UserError(f"--num-files must be >= 1 (train shards, plus the val shard) or -1 for all; got {num_files}")
    return [MAX_SHARD] + list(range(MAX_SHARD if num_files == -1 else min(num_files, MAX_SHARD)))


def _prepare_download_dir(data_dir):
    """Downloads own their directory: an embedded default there is replaced, other files are refused (no mixing)."""
    os.makedirs(data_dir, exist_ok=True)
    with file_lock(os.path.join(data_dir, ".lock")):
        files = found_data_files(data_dir)
        if foreign := [os.path.basename(f) for f in files if not SHARD_RE.fullmatch(os.path.basename(f))]:
            raise UserError(f"{data_dir} holds {len(foreign)} other data files ({', '.join(foreign[:3])}); "
                            f"download into a directory of its own: --data-dir=DIR")
        if os.path.exists(marker := os.path.join(data_dir, DEFAULT_MARKER)):
            print(f"replacing the embedded default corpus in {data_dir} (rebuild it anywhere: no -n, --data-dir=DIR)")
            for f in files + [marker, os.path.join(data_dir, MANIFEST)]:
                if os.path.exists(f):
                    os.remove(f)


def _record_download(data_dir, names):
    """Add a completed download's shards to the directory's record (one with the val shard: jaxchat's downloads).
    Without a record yet, the shards already there count from shard 0 up to the first gap (a failed earlier
    download's shards past a gap are recorded once a download that includes the gap completes)."""
    val = shard_name(MAX_SHARD)
    if val not in names:
        return
    with file_lock(os.path.join(data_dir, ".lock")):
        path = os.path.join(data_dir, MANIFEST)
        if os.path.exists(path):
            before = read_manifest(path)[0]
        else:
            present = set(os.listdir(data_dir))
            before = list(itertools.takewhile(present.__contains__, map(shard_name, range(MAX_SHARD))))
        write_manifest(data_dir, set(before + names) - {val}, val)


def download_shards(indices, data_dir=None, base_url=BASE_URL, num_workers=4, attempts=5, timeout=30, backoff=None):
    """Download shard_{i:05d}.parquet for each index into data_dir, in parallel threads; returns their paths.

    Each file as download_one fetches it (resumable, retried, verified, with check_parquet); complete files are
    skipped. The first index is fetched alone, first: with shard_indices() it is the val shard, and an unreachable
    source fails after one file, not after all of them.
    Raises DownloadError naming every shard that is missing; what did download stays.
    """
    data_dir, names = str(data_dir or default_data_dir()), [shard_name(i) for i in indices]
    backoff = RETRY_DELAY if backoff is None else backoff
    _prepare_download_dir(data_dir)
    with Progress(f"{len(names)} shards") as progress:
        one = lambda name: download_one(f"{base_url.rstrip('/')}/{name}", os.path.join(data_dir, name), check_parquet,
                                        attempts, timeout, backoff, progress)
        whys = [one(names[0])] if names else []
        if whys and whys[0]:
            whys += ["not attempted (the first shard failed)"] * (len(names) - 1)
        elif names:
            with ThreadPoolExecutor(max(1, num_workers)) as pool:
                try:
                    whys += pool.map(one, names[1:])
                except BaseException:  # Ctrl-C: stop the workers now rather than after their current files
                    progress.stopped = True
                    pool.shutdown(cancel_futures=True)
                    raise
    if failed := {n: why for n, why in zip(names, whys) if why}:
        lines = [f"  {n}: {why}" for n, why in list(failed.items())[:20]] + ["  ..."] * (len(failed) > 20)
        hint = ("what to do: check the network (or pass --base-url=MIRROR) and rerun the same command (finished shards"
                " are kept, partial ones resume); or train on your own files with --data-dir=DIR; or use the embedded"
                " default corpus, offline: run without -n/--num-files")
        raise DownloadError(f"{len(failed)} of {len(names)} shards could not be downloaded from {base_url} into "
                            f"{data_dir}:\n" + "\n".join(lines) + "\n" + hint, failed)
    _record_download(data_dir, names)  # only a whole download: a failed one must not record its gaps as the split
    return [os.path.join(data_dir, n) for n in names]


def build_parser():
    p = argparse.ArgumentParser(description="Prepare pretraining shards: download FineWeb-EDU shards (-n N), "
                                            "or build the embedded default corpus offline (no -n).")
    add = flag_adder(p)
    add("num_files", "-n", type=count_or_unset, default=None,
        help=f"download train shards 0..N-1 plus the val shard {shard_name(MAX_SHARD)}; -1 = all {MAX_SHARD + 1} "
             f"(default: build the embedded default instead)")
    add("num_workers", "-w", type=positive_int, default=4, help="parallel downloads")
    add("base_url", default=BASE_URL, help="where the shards are (a mirror, a test server)")
    add("data_dir", default=None, help="where to write them (default: $JAXCHAT_BASE_DIR/base_data)")
    return p


@distributed.one_writer  # several processes: process 0 writes the files, the others wait for them
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_files is None:
        if args.data_dir and found_data_files(args.data_dir) and \
                not os.path.exists(os.path.join(args.data_dir, DEFAULT_MARKER)):
            train, val = split_files("train", args.data_dir), split_files("val", args.data_dir)  # used as it is
            print(f"using the {len(set(train + val))} data files in {args.data_dir}: {len(train)} to train on, "
                  f"{os.path.basename(val[0])} for validation")
            return
        files = build_default_shards(args.data_dir)
        print(f"{len(files)} shards in {os.path.dirname(files[0])} (the last one is validation)")
        return
    indices = shard_indices(args.num_files)
    data_dir = args.data_dir or default_data_dir()
    print(f"{len(indices) - 1} train shards + val shard {shard_name(MAX_SHARD)} from {args.base_url} into {data_dir}")
    files = download_shards(indices, data_dir, args.base_url, args.num_workers)
    print(f"{len(files)} shards in {data_dir} (the last one, {shard_name(MAX_SHARD)}, is validation)")


if __name__ == "__main__":
    run_main(main)

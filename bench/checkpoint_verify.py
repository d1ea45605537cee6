"""The cost of checkpoint checksums: hashing a step's files, and saving/restoring with and without them.

    python bench/checkpoint_verify.py                  # d20: 561M parameters + optimizer state
    python bench/checkpoint_verify.py --depth 8        # smaller, for a small machine

The state is a real TrainState of that depth (nanochat's vocabulary and context), every float array filled with
random numbers as after training (fresh zeros would compress to almost nothing under orbax's zstd and flatter the
hash). It is saved and restored through jaxchat's Checkpointer into --dir: "with" as jaxchat does, "without" with
the writing and the checking of checksums switched off. A save returns once the arrays are on the host; its files
and checksums are written in the background ("written"). Files are read back from the page cache (just written): the
figures are the hash's CPU cost; a cold restore also reads the disk, which orbax's own read would pay anyway.
"""
import argparse
import contextlib
import os
import shutil
import tempfile
import time
import zlib

import jax
import jax.numpy as jnp

from jaxchat import sharding
from jaxchat.checkpoint_manager import CHECKSUM, Checkpointer, _item_files, file_checksum
from jaxchat.model import config_for_depth
from jaxchat.train import abstract_train_state, init_train_state


class _Tokenizer:
    """What a save needs of a tokenizer (its copy is not what is measured)."""

    def fingerprint(self):
        return "bench"

    def save(self, path):
        os.makedirs(path)


def randomized(tree, seed=0):
    """Every floating array of `tree` plus random normal numbers, each its own, in its own sharding."""
    leaves, treedef = jax.tree.flatten(tree)
    noise = jax.jit(lambda x, k: x + jax.random.normal(k, x.shape, x.dtype))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([noise(x, k) if jnp.issubdtype(x.dtype, jnp.floating) else x
                              for x, k in zip(leaves, keys)])


def crc32_file(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@contextlib.contextmanager
def checksums_off(off):
    """Checkpointer as before checksums: nothing written after a save, nothing checked before a restore."""
    write, verify = Checkpointer._write_checksums, Checkpointer._verify
    if off:
        Checkpointer._write_checksums = lambda self: None
        Checkpointer._verify = lambda self, *args: None
    try:
        yield
    finally:
        Checkpointer._write_checksums, Checkpointer._verify = write, verify


def save(directory, state):
    """(seconds until save() returned, seconds until the step was written) of one step."""
    with Checkpointer(directory, max_to_keep=1) as ckpt:
        t = time.perf_counter()
        ckpt.save(1, state.params, state.opt_state, {"bench": True}, _Tokenizer())
        returned = time.perf_counter() - t
        ckpt.wait()
        return returned, time.perf_counter() - t


def restore(directory, abstract):
    with Checkpointer(directory, create=False) as ckpt:
        restored, seconds = timed(lambda: jax.block_until_ready(ckpt.restore(1, abstract.params,
                                                                             abstract.opt_state)[:2]))
    del restored
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--dir", default="", help="where to write the checkpoints (default: a temporary directory here)")
    p.add_argument("--repeat", type=int, default=2, help="rounds of each (the best is shown)")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir or ".")
    config = config_for_depth(args.depth, args.vocab_size, args.seq_len)
    modes = {"with": False, "without": True}  # name -> checksums off
    try:
        with jax.set_mesh(sharding.make_mesh()):
            state = init_train_state(config)
            state = state.replace(params=randomized(state.params), opt_state=randomized(state.opt_state, 1))
            n_params = sum(x.size for x in jax.tree.leaves(state.params))
            n_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
            print(f"d{args.depth}: {n_params / 1e6:.0f}M parameters, model + optimizer state {n_bytes / 1e9:.2f} GB "
                  f"in memory | {jax.devices()[0].device_kind} × {jax.device_count()} | {os.cpu_count()} CPUs | "
                  f"checksums: {CHECKSUM}")
            saves, restores = {m: [] for m in modes}, {m: [] for m in modes}
            order = lambda r: list(modes.items())[::1 if r % 2 == 0 else -1]  # neither always goes first
            for r in range(args.repeat):
                for mode, off in order(r):
                    with checksums_off(off):
                        saves[mode].append(save(os.path.join(root, f"{mode}_{r}"), state))
            del state  # restores go one at a time beside nothing else: the peak memory stays one state
            abstract = abstract_train_state(config)
            for r in range(args.repeat):
                for mode, off in order(r):
                    with checksums_off(off):
                        restores[mode].append(restore(os.path.join(root, f"{mode}_{r}"), abstract))
        step_dir = os.path.join(root, "with_0", "000001")
        files = [os.path.join(step_dir, f) for f in _item_files(step_dir)]
        size = sum(os.path.getsize(f) for f in files)
        sizes = {item: sum(os.path.getsize(f) for f in files if os.path.relpath(f, step_dir).startswith(item + "/"))
                 for item in ("model", "optim")}
        print(f"on disk: {size / 1e9:.2f} GB in {len(files)} files (model {sizes['model'] / 1e9:.2f} GB, optim "
              f"{sizes['optim'] / 1e9:.2f} GB), the largest {max(map(os.path.getsize, files)) / 1e9:.2f} GB")
        for name, fn in ((f"{CHECKSUM} (used)", lambda f: file_checksum(f, CHECKSUM)),
                         ("blake2b", lambda f: file_checksum(f, "blake2b")), ("crc32 (zlib)", crc32_file)):
            _, seconds = timed(lambda: [fn(f) for f in files])
            print(f"hash {name:>14}: {seconds:6.2f} s for the step, {size / seconds / 1e6:6.0f} MB/s (one thread)")
        rows = (("save() returned", saves, 0), ("save written", saves, 1), ("restore", restores, None))
        for label, runs, i in rows:
            best = {m: min(x if i is None else x[i] for x in runs[m]) for m in modes}
            print(f"{label:>15}: {best['with']:6.2f} s with checksums, {best['without']:6.2f} s without "
                  f"({best['with'] - best['without']:+.2f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

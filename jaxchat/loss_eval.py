"""Bits per byte: the tokenizer-independent loss (nanochat's `evaluate_bpb`).

bpb = Σ nats over target tokens that stand for bytes / (ln 2 · Σ their bytes). Special tokens (0 bytes) and ignored
targets (−1) count in neither sum, so models with different vocabularies compare fairly.
"""
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxchat import sharding


@nnx.jit
def bpb_sums(model, inputs, targets, token_bytes):
    """(nats, bytes) of one batch: per-token losses summed where the target has bytes."""
    losses, _ = model.token_losses(inputs, targets)
    nbytes = jnp.where(targets < 0, 0, token_bytes[jnp.maximum(targets, 0)])
    return jnp.sum(jnp.where(nbytes > 0, losses, 0.0)), jnp.sum(nbytes)


def evaluate_bpb(model, batches, steps, token_bytes, global_rows=None):
    """Mean bpb over `steps` batches ({"inputs", "targets"} int arrays (B, T)) from the iterator `batches`, with
    the rows split over the mesh the caller set (`jax.set_mesh`), if any. `global_rows`: the batches hold only this
    process's rows of batches of that many (`DistributedDataLoader`)."""
    token_bytes = jnp.asarray(np.asarray(token_bytes, dtype=np.int32))
    nats, nbytes = 0.0, 0
    for _ in tqdm(range(steps), desc="val bpb", unit="batch", leave=False, disable=steps < 2):
        batch = sharding.shard_batch(next(batches), global_rows=global_rows)
        n, b = bpb_sums(model, batch["inputs"], batch["targets"], token_bytes)
        nats += float(n)
        nbytes += int(b)
    return nats / (math.log(2) * nbytes) if nbytes > 0 else float("inf")

"""Validation losses over batches from an iterator: bits per byte, the tokenizer-independent loss (nanochat's
`evaluate_bpb`: base and midtraining), and the mean loss per supervised token (SFT's val loss, as nanochat's).

bpb = Σ nats over target tokens that stand for bytes / (ln 2 · Σ their bytes). Special tokens (0 bytes) and ignored
targets (−1) count in neither sum, so models with different vocabularies compare fairly. The mean loss counts every
supervised target, special tokens included: in SFT they are what ends a turn or calls a tool.
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


@nnx.jit
def loss_sums(model, inputs, targets):
    """(nats, supervised tokens) of one batch."""
    return model.loss(inputs, targets, reduction="sum"), jnp.sum(targets != -1)


def summed(sums, model, batches, steps, global_rows, desc, *extra):
    """(Σ first, Σ second) of `sums(model, inputs, targets, *extra)` over `steps` batches of the iterator."""
    first, second = 0.0, 0
    for _ in tqdm(range(steps), desc=desc, unit="batch", leave=False, disable=steps < 2):
        batch = sharding.shard_batch(next(batches), global_rows=global_rows)
        a, b = sums(model, batch["inputs"], batch["targets"], *extra)
        first += float(a)
        second += int(b)
    return first, second


def evaluate_bpb(model, batches, steps, token_bytes, global_rows=None):
    """Mean bpb over `steps` batches ({"inputs", "targets"} int arrays (B, T)) from the iterator `batches`, with
    the rows split over the mesh the caller set (`jax.set_mesh`), if any. `global_rows`: the batches hold only this
    process's rows of batches of that many (`DistributedDataLoader`)."""
    token_bytes = jnp.asarray(np.asarray(token_bytes, dtype=np.int32))
    nats, nbytes = summed(bpb_sums, model, batches, steps, global_rows, "val bpb", token_bytes)
    return nats / (math.log(2) * nbytes) if nbytes > 0 else float("inf")


def evaluate_loss(model, batches, steps, global_rows=None):
    """Mean loss (nats) per supervised target over `steps` batches from `batches`, as `evaluate_bpb`."""
    nats, count = summed(loss_sums, model, batches, steps, global_rows, "val loss")
    return nats / max(count, 1)

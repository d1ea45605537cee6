"""Greedy samples for the training loop's progress checks (the engine issue brings the full on-device decoder).

All prompts advance together, one token per jitted call over the KV cache: a row feeds its own prompt while it lasts,
then its own argmax tokens. One compiled shape for any prompts.
"""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxchat import sharding
from jaxchat.model import KVCache


@nnx.jit
def _decode_one(model, tokens, cache):
    logits, cache = model(tokens, kv_cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1), cache


def sample_greedy(model, tokenizer, prompts, max_tokens=16):
    """Each prompt (BOS-prefixed) continued by `max_tokens` greedy tokens; returns the decoded texts."""
    prompt_ids = [tokenizer.encode(p, prepend=tokenizer.get_bos_token_id()) for p in prompts]
    shards = sharding.batch_shards()
    rows = prompt_ids + [prompt_ids[0]] * (-len(prompt_ids) % shards)  # pad the batch to the mesh
    total = max(map(len, rows)) + max_tokens
    cache = KVCache.create(model.config, len(rows), total)
    seqs = [list(r) for r in rows]
    tokens = np.array([[r[0]] for r in rows], np.int32)
    for t in range(total - 1):
        nxt, cache = _decode_one(model, tokens, cache)
        nxt = np.asarray(nxt)
        for i, seq in enumerate(seqs):
            if t + 1 == len(seq) and len(seq) < len(rows[i]) + max_tokens:
                seq.append(int(nxt[i]))
            tokens[i, 0] = seq[t + 1] if t + 1 < len(seq) else seq[-1]
    return [tokenizer.decode(seq[1:]) for seq in seqs[:len(prompts)]]

"""The GPT's decoding cache: each layer's keys and values, written in place a chunk at a time, with an optional
prompt prefix shared by the rows that continue it. The engine and the server create it; `GPT.decode` feeds it."""

import jax
import jax.numpy as jnp
from flax import struct

from jaxchat import sharding
from jaxchat.attention import cached_attention


@struct.dataclass
class KVCache:
    """Decoding cache: per layer, separate k and v of shape (B, n_kv_head, max_len, head_dim) (heads-major, so the
    decode matmuls read it in place).

    Rows move in lockstep: every row writes its next tokens at the shared slot `index` (one dynamic_update_slice,
    in place), and row b's tokens live in slots start[b]..index−1. Prompts of different lengths are left-padded,
    so start[b] > 0 marks padding that attention never reads.

    Shared prefix (optional): rows that continue the same prompt (the engine's num_samples rows per prompt) need
    not each hold a copy of its K/V. Then `prefix_k`, `prefix_v` hold, per layer, the P prompts' K/V once,
    (P, n_kv_head, Tp, head_dim), left-padded (prompt p's tokens in slots prefix_start[p]..Tp−1), read-only; the
    B = P·G rows (row b continues prompt b // G) keep only what is written after the prompt in `k`, `v`, whose
    slots and `index` count from the prompt's end. A query attends to [its prompt's prefix slots, its own slots]
    under one softmax, the prefix part as one matmul per (prompt, kv head) over all G rows' queries instead of
    G matrix-vector products, and no row re-reads a copy of the prompt. Token positions (RoPE) are
    slot − start[b], plus the prompt's length with a prefix.

    Smear (GPTConfig.smear) mixes the previous token's embedding into each token's: `embed` holds each row's last
    normed embedding (B, n_embd) (with a shared prefix, its prompt's last). Sliding windows mask the keys a query
    has left behind (a layer's window comes with each `attend`).
    """
    k: tuple
    v: tuple
    start: jax.Array  # (B,) int32: first slot holding a real token of the row
    index: jax.Array  # () int32: next slot to write
    prefix_k: tuple | None = None  # per layer (P, n_kv_head, Tp, head_dim), or None: no shared prefix
    prefix_v: tuple | None = None
    prefix_start: jax.Array | None = None  # (P,) int32: first slot holding a real prompt token
    embed: jax.Array | None = None  # (B, n_embd) fp32: each row's last token's normed embedding (smear), or None

    @classmethod
    def create(cls, config, batch_size, max_len, dtype=jnp.float32, start=None):
        shape = (batch_size, config.n_kv_head, max_len, config.n_embd // config.n_head)
        zeros = lambda: sharding.constrain(jnp.zeros(shape, dtype), ("batch", "kv_heads", None, None))
        start = jnp.zeros((batch_size,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        embed = sharding.constrain_rows(jnp.zeros((batch_size, config.n_embd), jnp.float32)) if config.smear else None
        return cls(k=tuple(zeros() for _ in range(config.n_layer)), v=tuple(zeros() for _ in range(config.n_layer)),
                   start=start, index=jnp.zeros((), jnp.int32), embed=embed)

    def as_prefix(self, rows, max_len):
        """This (prefilled, prefix-less) cache of P prompts as the shared prefix of `rows` rows (a multiple of P;
        rows b·G..b·G+G−1 continue prompt b), each with an empty part of max_len slots of its own."""
        P, K, T, D = self.k[0].shape
        assert self.prefix_k is None and rows % P == 0
        pin = lambda t: tuple(map(sharding.constrain_rows, t))  # prompts split over the batch axes when they divide
        zeros = lambda: sharding.constrain_rows(jnp.zeros((rows, K, max_len, D), self.k[0].dtype))
        n = len(self.k)
        embed = None if self.embed is None else sharding.constrain_rows(jnp.repeat(self.embed, rows // P, axis=0))
        return KVCache(k=tuple(zeros() for _ in range(n)), v=tuple(zeros() for _ in range(n)),
                       start=jnp.zeros((rows,), jnp.int32), index=jnp.zeros((), jnp.int32),
                       prefix_k=pin(self.k), prefix_v=pin(self.v), prefix_start=self.start, embed=embed)

    @property
    def max_len(self):
        """Slots of each row's own part."""
        return self.k[0].shape[2]

    @property
    def pos(self):
        """Tokens held per row (B,), prompt included."""
        if self.prefix_k is None:
            return self.index - self.start
        prompt_len = self.prefix_k[0].shape[2] - self.prefix_start
        return self.index - self.start + jnp.repeat(prompt_len, self.start.shape[0] // prompt_len.shape[0])

    def attend(self, layer, q, k, v, dtype, window=None):
        """Write this chunk's k, v at slots index..index+T−1 of `layer`; attend to the row's prompt prefix (if any)
        and its slots up to there; with a `window` W, only to the keys at most W positions back."""
        T = q.shape[1]
        write = lambda cache, x: jax.lax.dynamic_update_slice(cache, x.swapaxes(1, 2).astype(cache.dtype),
                                                              (0, 0, self.index, 0))
        kc, vc = write(self.k[layer], k), write(self.v[layer], v)
        slots, query_slots = jnp.arange(self.max_len), self.index + jnp.arange(T)
        mask = (slots >= self.start[:, None, None]) & (slots <= query_slots[:, None])  # (B, T, S)
        if window is not None:  # a row's slots are consecutive positions
            mask &= slots >= query_slots[:, None] - window
        prefix = None
        if self.prefix_k is not None:  # every prompt slot precedes every query: mask the left padding (and window)
            P, Tp = self.prefix_start.shape[0], self.prefix_k[layer].shape[2]
            valid = (jnp.arange(Tp) >= self.prefix_start[:, None])[:, None, None, None, None]  # (P, 1, 1, 1, 1, Tp)
            if window is not None:  # query position − key position <= W, per row of the group
                query_pos = (self.pos[:, None] + jnp.arange(T)).reshape(P, 1, -1, T, 1, 1)
                key_pos = (jnp.arange(Tp) - self.prefix_start[:, None])[:, None, None, None, None]
                valid = valid & (query_pos - key_pos <= window)
            prefix = (self.prefix_k[layer], self.prefix_v[layer], valid)
        swap = lambda t, new: t[:layer] + (new,) + t[layer + 1:]
        y = cached_attention(q, kc, vc, mask[:, None, None], dtype, prefix)
        return y, self.replace(k=swap(self.k, kc), v=swap(self.v, vc))

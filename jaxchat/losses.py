"""Fused lm_head + softcap + cross-entropy, summed over supervised tokens.

The (B, T, V) logits are never held at once: a `lax.scan` walks the sequence in chunks and, since the loss is a
sum with a scalar cotangent, computes the gradients for x and the head kernel in the same pass (one logits
matmul instead of two; toolchain.md B10). Chunks run along T, so the batch axis keeps its sharding.
"""

from functools import partial

import jax
import jax.numpy as jnp

CHUNK_ROWS = {"cpu": 512, "gpu": 8192}  # rows (batch × positions) per chunk; 256-1024 best on the 2-core CPU


def _chunk_len(B, T):
    """Largest divisor of T that keeps B·chunk within the backend's row budget."""
    limit = max(1, CHUNK_ROWS.get(jax.default_backend(), 4096) // B)
    return max(c for c in range(1, min(T, limit) + 1) if T % c == 0)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def softcap_cross_entropy_sum(x, w, targets, softcap, dtype):
    """Σ over targets ≠ −1 of CE(softcap·tanh(x @ w / softcap), target). x (B,T,D), w (D,V), targets (B,T)."""
    return _forward(x, w, targets, softcap, dtype)[0]


def _forward(x, w, targets, softcap, dtype):
    B, T, D = x.shape
    c = _chunk_len(B, T)
    to_chunks = lambda a: a.reshape(B, T // c, c, *a.shape[2:]).swapaxes(0, 1)
    w_c = w.astype(dtype)

    def step(dw, chunk):
        xc, tc = chunk
        xc = xc.astype(dtype)
        logits = jnp.einsum("bcd,dv->bcv", xc, w_c, preferred_element_type=jnp.float32)
        t = jnp.tanh(logits / softcap)
        z = softcap * t
        valid = tc != -1
        safe = jnp.where(valid, tc, 0)
        lse = jax.nn.logsumexp(z, axis=-1)
        z_target = jnp.take_along_axis(z, safe[..., None], -1)[..., 0]
        loss = jnp.sum(jnp.where(valid, lse - z_target, 0.0))
        # d loss / d z = softmax(z) − onehot(target); through the softcap, dz/dlogits = 1 − t².
        dz = jnp.exp(z - lse[..., None]) - jax.nn.one_hot(safe, z.shape[-1], dtype=z.dtype)
        dlogits = (jnp.where(valid[..., None], dz, 0.0) * (1.0 - t * t)).astype(dtype)
        dx = jnp.einsum("bcv,dv->bcd", dlogits, w_c, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("bcd,bcv->dv", xc, dlogits, preferred_element_type=jnp.float32)
        return dw, (loss, dx)

    dw, (losses, dx) = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), (to_chunks(x), to_chunks(targets)))
    return jnp.sum(losses), (dx.swapaxes(0, 1).reshape(B, T, D), dw)


def _bwd(softcap, dtype, grads, g):
    dx, dw = grads
    return g * dx, g * dw, None


softcap_cross_entropy_sum.defvjp(_forward, _bwd)

"""Fused lm_head + softcap + cross-entropy, summed over supervised tokens.

Optional per-token weights (RL: the advantages) scale each token's loss and gradient.

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


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_loss(x, w, targets, weights, softcap, dtype):
    return _forward(x, w, targets, weights, softcap, dtype)[0]


def softcap_cross_entropy_sum(x, w, targets, softcap, dtype, weights=None):
    """Σ over targets ≠ −1 of weight·CE(softcap·tanh(x @ w / softcap), target). x (B,T,D), w (D,V), targets (B,T),
    weights (B,T) fp32 or None (= 1, and then no weights array exists in the graph)."""
    return _fused_loss(x, w, targets, weights, softcap, dtype)


def _forward(x, w, targets, weights, softcap, dtype):
    B, T, D = x.shape
    c = _chunk_len(B, T)
    to_chunks = lambda a: a.reshape(B, T // c, c, *a.shape[2:]).swapaxes(0, 1)
    from_chunks = lambda a: a.swapaxes(0, 1).reshape(B, T, *a.shape[3:])
    w_c = w.astype(dtype)

    def step(dw, chunk):
        xc, tc, wc = chunk
        xc = xc.astype(dtype)
        logits = jnp.einsum("bcd,dv->bcv", xc, w_c, preferred_element_type=jnp.float32)
        t = jnp.tanh(logits / softcap)
        z = softcap * t
        valid = tc != -1
        safe = jnp.where(valid, tc, 0)
        lse = jax.nn.logsumexp(z, axis=-1)
        z_target = jnp.take_along_axis(z, safe[..., None], -1)[..., 0]
        token_loss = jnp.where(valid, lse - z_target, 0.0)  # its CE is also d loss / d weight
        loss = jnp.sum(token_loss if wc is None else wc * token_loss)
        # d loss / d z = softmax(z) − onehot(target); through the softcap, dz/dlogits = 1 − t².
        dz = jnp.exp(z - lse[..., None]) - jax.nn.one_hot(safe, z.shape[-1], dtype=z.dtype)
        if wc is not None:  # each token's gradient scales by its weight, as its loss does
            dz = dz * wc[..., None]
        dlogits = (jnp.where(valid[..., None], dz, 0.0) * (1.0 - t * t)).astype(dtype)
        dx = jnp.einsum("bcv,dv->bcd", dlogits, w_c, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("bcd,bcv->dv", xc, dlogits, preferred_element_type=jnp.float32)
        return dw, (loss, dx, None if wc is None else token_loss)

    dw, (losses, dx, token_losses) = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), (
        to_chunks(x), to_chunks(targets), None if weights is None else to_chunks(weights)))
    dweights = None if weights is None else from_chunks(token_losses)
    return jnp.sum(losses), (from_chunks(dx), dw, dweights)


def _bwd(softcap, dtype, grads, g):
    dx, dw, dweights = grads
    return g * dx, g * dw, None, None if dweights is None else g * dweights


_fused_loss.defvjp(_forward, _bwd)

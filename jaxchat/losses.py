"""The one cross-entropy of jaxchat: lm_head + softcap + cross-entropy, fused and run over chunks of the sequence.

The (B, T, V) logits are never held at once: a `lax.scan` walks the sequence in chunks and each chunk's logits
live only inside its step. Chunks run along T, so the batch axis keeps its sharding. Two forms share the chunk
math (`_softcap`, `_token_losses`):

- `softcap_cross_entropy_sum`: Σ weight·CE over supervised tokens (training). The loss is a sum with a scalar
  cotangent, so its custom VJP computes the gradients for x and the head kernel in the same pass as the loss
  (one logits matmul per chunk instead of two). With `fp8` (training only) its three matmuls take fp8 operands.
- `softcap_cross_entropy_per_token`: each token's (weighted) CE and the argmax of its logits (evaluation, RL's
  log-probs). Differentiable by plain autodiff: each step is rematerialised, so the backward pass recomputes one
  chunk's logits at a time instead of saving them all.

Optional per-token weights (RL: the advantages) scale each token's loss and gradient.
"""

from functools import partial

import jax
import jax.numpy as jnp

from jaxchat import sharding
from jaxchat.fp8 import E4M3, E5M2, matmul, quantize

# Rows (batch × positions) per chunk: a chunk's (rows, vocab) fp32 logits are the loss's largest temporary, while
# fewer rows mean more scan steps of smaller matmuls; tuned per backend.
CHUNK_ROWS = {"cpu": 512, "gpu": 8192}


def _chunk_len(B, T):
    """Largest divisor of T that keeps B·chunk within the backend's row budget."""
    limit = max(1, CHUNK_ROWS.get(sharding.platform(), 4096) // B)
    return max(c for c in range(1, min(T, limit) + 1) if T % c == 0)


def _to_chunks(a, c):
    """(B, T, ...) -> (T // c, B, c, ...): the scan runs over the leading axis."""
    B, T = a.shape[:2]
    return a.reshape(B, T // c, c, *a.shape[2:]).swapaxes(0, 1)


def _from_chunks(a):
    """(T // c, B, c, ...) -> (B, T, ...)."""
    n, B, c = a.shape[:3]
    return a.swapaxes(0, 1).reshape(B, n * c, *a.shape[3:])


def _softcap(logits, softcap):
    """Softcapped logits z = softcap·tanh(logits / softcap) of one chunk (fp32), and t = tanh(...), which the
    backward of the softcap reuses."""
    t = jnp.tanh(logits / softcap)
    return softcap * t, t


def _token_losses(z, tc):
    """Each token's CE (0 where the target is −1), with the pieces its gradient reuses: (losses, lse, valid,
    safe targets)."""
    valid = tc != -1
    safe = jnp.where(valid, tc, 0)
    lse = jax.nn.logsumexp(z, axis=-1)
    z_target = jnp.take_along_axis(z, safe[..., None], -1)[..., 0]
    return jnp.where(valid, lse - z_target, 0.0), lse, valid, safe


# ---- the sum, with its gradient computed in the forward pass ---------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_sum(x, w, targets, weights, softcap, dtype, fp8):
    return _sum_and_grads(x, w, targets, weights, softcap, dtype, fp8)[0]


def softcap_cross_entropy_sum(x, w, targets, softcap, dtype, weights=None, fp8=False):
    """Σ over targets ≠ −1 of weight·CE(softcap·tanh(x @ w / softcap), target). x (B,T,D), w (D,V),
    targets (B,T), weights (B,T) fp32 or None (= 1, and then no weights array exists in the graph).
    fp8: the head's three matmuls in fp8, as fp8.linear's."""
    return _fused_sum(x, w, targets, weights, softcap, dtype, fp8)


def _sum_and_grads(x, w, targets, weights, softcap, dtype, fp8):
    c = _chunk_len(*x.shape[:2])
    # The matmuls' operands as (values, inverse scale) pairs for fp8.matmul; in the compute dtype they are unscaled.
    if fp8:
        # x and w get one scale each (amax over the whole tensor), as nanochat's fp8 head. The logits' gradient
        # exists one chunk at a time, so it is scaled per chunk; nanochat scales the whole (B·T, V) gradient at
        # once, and a chunk's amax is never larger than the whole's, so its scale is never coarser.
        (xs, x_inv), w_op = quantize(x, E4M3), quantize(w, E4M3)
        as_input, as_grad = lambda xc: (xc, x_inv), lambda g: quantize(g, E5M2)
    else:
        xs, w_op = x, (w.astype(dtype), 1.0)
        as_input = as_grad = lambda a: (a.astype(dtype), 1.0)

    def step(dw, chunk):
        xc, tc, wc = chunk
        xc = as_input(xc)
        z, t = _softcap(matmul("bcd,dv->bcv", xc, w_op), softcap)
        token_loss, lse, valid, safe = _token_losses(z, tc)  # a token's CE is also d loss / d its weight
        loss = jnp.sum(token_loss if wc is None else wc * token_loss)
        # d loss / d z = softmax(z) − onehot(target); through the softcap, dz/dlogits = 1 − t².
        dz = jnp.exp(z - lse[..., None]) - jax.nn.one_hot(safe, z.shape[-1], dtype=z.dtype)
        if wc is not None:  # each token's gradient scales by its weight, as its loss does
            dz = dz * wc[..., None]
        dlogits = as_grad(jnp.where(valid[..., None], dz, 0.0) * (1.0 - t * t))
        dx = matmul("bcv,dv->bcd", dlogits, w_op)
        dw = dw + matmul("bcd,bcv->dv", xc, dlogits)
        return dw, (loss, dx, None if wc is None else token_loss)

    dw, (losses, dx, token_losses) = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), (
        _to_chunks(xs, c), _to_chunks(targets, c), None if weights is None else _to_chunks(weights, c)))
    dweights = None if weights is None else _from_chunks(token_losses)
    return jnp.sum(losses), (_from_chunks(dx), dw, dweights)


def _sum_bwd(softcap, dtype, fp8, grads, g):
    dx, dw, dweights = grads
    return g * dx, g * dw, None, None if dweights is None else g * dweights


_fused_sum.defvjp(_sum_and_grads, _sum_bwd)


# ---- per token ---------------------------------------------------------------------------------------------------


def softcap_cross_entropy_per_token(x, w, targets, softcap, dtype, weights=None):
    """Per token of (B, T): (weight·CE, 0 where the target is −1; argmax of the softcapped logits, int32).
    Same arguments as `softcap_cross_entropy_sum`; differentiable in x, w and weights."""
    c = _chunk_len(*x.shape[:2])
    w_c = w.astype(dtype)

    @jax.checkpoint  # the backward recomputes this chunk's logits rather than keeping every chunk's
    def step(_, chunk):
        xc, tc = chunk
        logits = jnp.einsum("bcd,dv->bcv", xc.astype(dtype), w_c, preferred_element_type=jnp.float32)
        z, _ = _softcap(logits, softcap)
        return None, (_token_losses(z, tc)[0], jnp.argmax(z, axis=-1).astype(jnp.int32))

    _, (losses, argmax) = jax.lax.scan(step, None, (_to_chunks(x, c), _to_chunks(targets, c)))
    losses = _from_chunks(losses)
    return losses if weights is None else weights * losses, _from_chunks(argmax)

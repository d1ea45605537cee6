"""Picking the next token from logits, on the device, each row with its own settings (the engine's rows share
theirs, the server's each have a request's). Sampling inverts the CDF with one uniform per row: Gumbel-max would
draw B·V random numbers per step, which cost more than the whole forward pass of a small model on CPU."""
import jax
import jax.numpy as jnp

MAX_TOP_K = 200  # the largest top-k a request may ask for (nanochat's limit)


def argmax(x):
    """Row argmax (first maximum) as two plain reductions: XLA:CPU's variadic argmax reduce is slower."""
    is_max = x == jnp.max(x, axis=-1, keepdims=True)
    return (-jnp.max(jnp.where(is_max, -jnp.arange(x.shape[-1], dtype=jnp.float32), -jnp.inf), -1)).astype(jnp.int32)


def inverse_cdf(probs, u, block=128):
    """For each row the first index whose cumulative probability exceeds u·total: first the block, then the index
    inside it, each from a cumulative sum done as a small triangular matmul (XLA:CPU's cumsum over a whole
    vocabulary is much slower). Zero-probability entries are never picked."""
    B, V = probs.shape
    nb = -(-V // block)
    blocks = jnp.pad(probs, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
    # x @ upper(n) = running sums of x; "highest": GPUs would otherwise run fp32 matmuls as TF32 (10-bit mantissa)
    running_sums = lambda x, n: jnp.matmul(x, jnp.triu(jnp.ones((n, n), jnp.float32)), precision="highest")
    block_cdf = running_sums(blocks.sum(-1), nb)
    target = u * block_cdf[:, -1]
    b = jnp.minimum(jnp.sum(block_cdf <= target[:, None], -1), nb - 1)
    inside = jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(block_cdf, b[:, None], axis=1)[:, 0] - inside.sum(-1)
    cdf = before[:, None] + running_sums(inside, block)
    i = b * block + jnp.minimum(jnp.sum(cdf <= target[:, None], -1), block - 1)
    chosen = jnp.take_along_axis(probs, jnp.minimum(i, V - 1)[:, None], axis=1)[:, 0]
    return jnp.where((i < V) & (chosen > 0), i, argmax(probs)).astype(jnp.int32)  # rounding at the very end


def sample_next_token(logits, keys, temperature, top_k, top_p):
    """One token per row of logits (B, V) fp32, with one key and the settings of each row: temperature 0 → argmax;
    top_k (0 = off, ≤ MAX_TOP_K) keeps the k largest logits; top_p (1 = off) the smallest set whose probability
    reaches p."""
    V = logits.shape[-1]

    def sample(_):
        def keep_top_k(x):
            kth = jax.lax.top_k(x, min(MAX_TOP_K, V))[0]
            kth = jnp.take_along_axis(kth, jnp.clip(top_k - 1, 0, kth.shape[1] - 1)[:, None], axis=1)
            return jnp.where((top_k[:, None] > 0) & (x < kth), -jnp.inf, x)

        x = jax.lax.cond(jnp.any(top_k > 0), keep_top_k, lambda x: x, logits)
        probs = jax.nn.softmax(x / jnp.maximum(temperature, 1e-6)[:, None], axis=-1)

        def nucleus(p):  # keep the tokens at least as likely as the one where the sorted running sum reaches top_p
            sorted_p = -jnp.sort(-p, axis=-1)
            cut = jnp.sum(jnp.cumsum(sorted_p, axis=-1) - sorted_p < top_p[:, None], axis=-1)
            floor = jnp.take_along_axis(sorted_p, jnp.maximum(cut - 1, 0)[:, None], axis=1)
            return jnp.where((top_p[:, None] >= 1) | (p >= floor), p, 0.0)

        probs = jax.lax.cond(jnp.any(top_p < 1), nucleus, lambda p: p, probs)  # a full sort only when asked for
        picks = inverse_cdf(probs, jax.vmap(jax.random.uniform)(keys))
        mixed = lambda _: jnp.where(temperature > 0, picks, argmax(logits))
        return jax.lax.cond(jnp.all(temperature > 0), lambda _: picks, mixed, None)

    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: argmax(logits), None)

"""Attention kernels: grouped-query softmax attention, for training (causal) and for decoding against a cache.

Layouts: q (B, T, H, D), k and v (B, S, K, D) with K | H (GQA: query head h reads kv head h // (H/K)); a KV
cache is held heads-major, (B, K, S, D), the layout the decode matmuls read without a transposed copy per step.
Scores, softmax and outputs are fp32; matmul inputs are cast to `dtype` (bf16 matmuls, fp32 accumulation).

Training attention (`causal_attention`) has three implementations (KERNELS), all memory-efficient (no (T, T)
tensor is kept for the backward pass): cuDNN's flash attention, on GPU in 16-bit where its rules hold
(`cudnn_problem`); Splash attention, the Pallas flash-attention kernel for TPU (`splash_attention`); and
jaxchat's own flash-style kernel in plain XLA everywhere else. In the latter, queries in blocks of
ATTN_BLOCK attend only to keys up to the end of their block (skipping ~half of the masked work) and, under a sliding
window, from the first key the block's first query sees (skipping the keys every query has left behind), a custom VJP
keeps the inputs, the output and the log-sum-exp and recomputes probabilities in the backward pass, and on CPU
sequences go through ATTN_SEQS at a time so one chunk's scores stay in cache. It
works heads-major, (B, H, T, D), and its backward on transposed scores (keys × queries), so XLA:CPU inserts no
transposed copy per block (in the sequence-major layout it would copy `k` once per block and matmul).

Sliding window `window` = W (nanochat's (W, 0)): the query at position i sees keys i − W..i (W + 1 keys); None
sees every earlier key. Every kernel takes it natively (cuDNN's local_window_size, Splash's LocalMask, the XLA
kernel's key ranges).
"""

from functools import partial

import jax
import jax.numpy as jnp

from jaxchat import sharding

ATTN_BLOCK = 128  # query block size (the causal skipping granularity)
ATTN_SEQS = 2  # sequences per chunk on CPU
NEG = -1e30  # masked score: exp underflows to exactly 0, no inf arithmetic
SPLASH_BLOCKS = (512, 256, 128)  # Splash tile sizes, the largest that divides the (padded) sequence is used


def _mm(spec, a, b, dtype):
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def cached_attention(q, k, v, mask, dtype, prefix=None):
    """Masked softmax attention against a cache: q (B, T, H, D), k and v (B, K, S, D) heads-major; mask
    broadcastable to (B, K, H/K, T, S), True = attend.

    prefix: optional (k, v, mask) of a read-only prefix shared by groups of rows: k and v (P, K, Tp, D), row b
    reading prefix b // (B/P); mask broadcastable to (P, K, B/P, T, H/K, Tp). Each query then attends to
    [its prefix's slots, its own slots] under one softmax, computed in two parts (each part's scores and
    exponentials stay in the layout of its own matmul; only the per-query max and sum are rearranged): the prefix
    scores of all B/P rows of a group come from one matmul per (group, kv head), which reads the prefix once."""
    (B, T, H, D), K = q.shape, k.shape[1]
    qg = (q * D**-0.5).reshape(B, T, K, H // K, D)
    scores = jnp.where(mask, _mm("btkgd,bksd->bkgts", qg, k, dtype), NEG)  # (B, K, H/K, T, S)
    if prefix is None:
        probs = jax.nn.softmax(scores, axis=-1)
        return _mm("bkgts,bksd->btkgd", probs, v, dtype).reshape(B, T, H, D)
    pk, pv, pmask = prefix
    P, n, g = pk.shape[0], B // pk.shape[0], H // K
    pscores = jnp.where(pmask, _mm("pntkgd,pksd->pkntgs", qg.reshape(P, n, T, K, g, D), pk, dtype), NEG)
    to_rows = lambda x: x.transpose(0, 2, 1, 4, 3).reshape(B, K, g, T)  # (P, K, n, T, g) -> (B, K, g, T)
    to_groups = lambda x: x.reshape(P, n, K, g, T).transpose(0, 2, 1, 4, 3)
    m = jnp.maximum(jnp.max(scores, axis=-1), to_rows(jnp.max(pscores, axis=-1)))  # (B, K, g, T)
    e, pe = jnp.exp(scores - m[..., None]), jnp.exp(pscores - to_groups(m)[..., None])
    total = jnp.sum(e, axis=-1) + to_rows(jnp.sum(pe, axis=-1))
    out = _mm("bkgts,bksd->btkgd", e, v, dtype) + _mm("pkntgs,pksd->pntkgd", pe, pv, dtype).reshape(B, T, K, g, D)
    return (out / total.transpose(0, 3, 1, 2)[..., None]).reshape(B, T, H, D)


def cudnn_problem(q, k, dtype):
    """Why cuDNN flash attention cannot run this call (None: it can). It raises rather than falling back, so the
    rules are checked here: a GPU, 16-bit inputs, head dim a multiple of 8 up to 256, query heads a multiple of
    kv heads (the sequence and head-dim axes are never sharded in jaxchat)."""
    D, H, K = q.shape[-1], q.shape[2], k.shape[2]
    if sharding.platform() != "gpu":
        return f"it needs a GPU (platform: {sharding.platform()})"
    if jnp.dtype(dtype).itemsize != 2:
        return f"it needs 16-bit inputs (compute dtype {jnp.dtype(dtype).name})"
    if D % 8 or D > 256:
        return f"head dim {D} is not a multiple of 8 up to 256"
    if H % K:
        return f"{H} query heads are not a multiple of {K} kv heads"
    return None


def splash_problem(q, k, dtype):
    """Why Splash attention cannot run this call (None: it can): it needs a TPU, and the batch split evenly over the
    devices (each runs the kernel on its own rows)."""
    if sharding.platform() != "tpu":
        return f"it needs a TPU (platform: {sharding.platform()})"
    if q.shape[0] % sharding.batch_shards():
        return f"batch {q.shape[0]} does not split over {sharding.batch_shards()} devices"
    return None


def _cudnn_attention(q, k, v, dtype, window=None):
    out = jax.nn.dot_product_attention(*(t.astype(dtype) for t in (q, k, v)), is_causal=True, implementation="cudnn",
                                       local_window_size=None if window is None else (window, 0))
    return out.astype(q.dtype)


def splash_attention(q, k, v, dtype, window=None, interpret=False):
    """Splash attention (Pallas, TPU): its MHA form takes K kv heads for H query heads itself (GQA). A Pallas kernel
    sees one device's arrays, so under a mesh it runs per device on its rows (shard_map over the batch axes).
    interpret: run the kernel in Pallas's interpreter (any backend; slow), to check its numbers without a TPU.
    Tiles must divide the sequence, so it is padded to a multiple of 128: under the causal mask padded keys come
    after every real query, which never sees them, and the padded queries' outputs are dropped. A window is a
    LocalMask (W, 0): causal, and no key more than W behind; Splash skips the tiles it masks entirely."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # here: only TPU programs load Pallas

    T, H, D = q.shape[1:]
    pad = -T % 128
    heads_major = lambda t: jnp.pad(t.astype(dtype), ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    block = next(b for b in SPLASH_BLOCKS if (T + pad) % b == 0)
    shape = (T + pad, T + pad)
    mask = splash.CausalMask(shape) if window is None else splash.LocalMask(shape, (window, 0), offset=0)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([mask] * H), head_shards=1, q_seq_shards=1,
        block_sizes=splash.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                                      block_q_dq=block, block_kv_dq=block), interpret=interpret)
    attend = jax.vmap(kernel)
    if not jax.sharding.get_abstract_mesh().empty:
        spec = sharding.batch_spec(4)
        # check_vma=False: Splash's pallas_calls declare no per-device variance for their outputs
        attend = jax.shard_map(attend, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    # The kernel does not scale the scores: q is scaled in fp32, before the cast to `dtype`.
    out = attend(heads_major(q.astype(jnp.float32) * D**-0.5), heads_major(k), heads_major(v))
    return out.transpose(0, 2, 1, 3)[:, :T].astype(q.dtype)


def _xla_attention(q, k, v, dtype, window=None):
    B, T, H, D = q.shape
    # GQA: repeat kv heads for the kernel (autodiff of the repeat sums the groups' gradients back); transpose each
    # tensor once here to the kernel's heads-major layout, rather than once per block and matmul inside.
    k, v = (jnp.repeat(t, H // t.shape[2], axis=2) for t in (k, v))
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    local = B // sharding.batch_shards()
    n = local // ATTN_SEQS if sharding.platform() == "cpu" and local % ATTN_SEQS == 0 else 1
    if n == 1:
        return _block_causal(q, k, v, dtype, window).transpose(0, 2, 1, 3)
    # Interleaved split (row i·n + j -> chunk j): each device keeps its own rows, the mapped axis is unsharded.
    split = lambda t: t.reshape(B // n, n, *t.shape[1:]).swapaxes(0, 1)
    y = jax.lax.map(lambda c: _block_causal(*c, dtype, window), (split(q), split(k), split(v)))
    return y.swapaxes(0, 1).reshape(B, H, T, D).transpose(0, 2, 1, 3)


# attn_impl -> (why it cannot run a call, or None; the kernel). "auto" takes the first that can run.
KERNELS = {
    "cudnn": (cudnn_problem, _cudnn_attention),
    "splash": (splash_problem, splash_attention),
    "xla": (lambda q, k, dtype: None, _xla_attention),
}


def causal_attention(q, k, v, dtype, impl="auto", window=None):
    """Causal self-attention over the whole sequence (training, evaluation): q (B, T, H, D), k and v (B, T, K, D)
    -> (B, T, H, D) in q's dtype. impl: a key of KERNELS, or "auto" (the first of them that can run). window: the
    sliding window W (keys i − W..i), None = all earlier keys."""
    if impl == "auto":
        impl = next(name for name, (problem, _) in KERNELS.items() if problem(q, k, dtype) is None)
    problem, kernel = KERNELS[impl]
    if why := problem(q, k, dtype):
        raise ValueError(f"{impl} attention cannot run: {why}; use attn_impl 'xla' or 'auto'")
    if window is not None and window >= q.shape[1] - 1:  # the window holds every earlier key
        window = None
    return kernel(q, k, v, dtype, window)


def _blocks(T, window):
    """(start, end, first key) per query block: queries s..e−1 see keys lo..e−1, lo = s − window (0 without one),
    under `_visible`'s mask."""
    return [(s, min(s + ATTN_BLOCK, T), 0 if window is None else max(0, s - window)) for s in range(0, T, ATTN_BLOCK)]


def _visible(s, e, lo, window):
    """(e − s, e − lo) mask of a block: query s + i sees key lo + j when it is not later and (under a window) at
    most `window` positions earlier."""
    gap = (s + jnp.arange(e - s))[:, None] - (lo + jnp.arange(e - lo))[None]
    return (gap >= 0) if window is None else (gap >= 0) & (gap <= window)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _block_causal(q, k, v, dtype, window=None):
    return _block_causal_fwd(q, k, v, dtype, window)[0]


def _block_causal_fwd(q, k, v, dtype, window):
    """q, k, v (B, H, T, D) -> o (B, H, T, D) in q's dtype; residuals: inputs, o, per-block log-sum-exp
    (B, H, block, 1). Scores are scaled in fp32, so 16-bit inputs are kept as they are."""
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for s, e, lo in _blocks(q.shape[2], window):
        mask = _visible(s, e, lo, window)
        scores = jnp.where(mask, _mm("bhtd,bhsd->bhts", q[:, :, s:e], k[:, :, lo:e], dtype) * scale, NEG)
        m = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        outs.append(_mm("bhts,bhsd->bhtd", p, v[:, :, lo:e], dtype) / l)
        lses.append(m + jnp.log(l))
    o = jnp.concatenate(outs, axis=2).astype(q.dtype)
    return o, (q, k, v, o, lses)


def _block_causal_bwd(dtype, window, res, do):
    """Flash-attention backward per block, on transposed scores Sᵀ = K Qᵀ (keys × queries), so that
    dV = Pᵀ dO and dK = dSᵀ Q are plain matmuls (no transposed copy of the block): Pᵀ = exp(Sᵀ − lse),
    dSᵀ = Pᵀ ∘ (V dOᵀ − rowsum(dO ∘ O)), dQ = dSᵀᵀ K (the scale applied to dS once)."""
    q, k, v, o, lses = res
    scale = q.shape[-1] ** -0.5
    do = do.astype(jnp.float32)
    delta = jnp.sum(do * o, axis=-1)[:, :, None, :]  # (B, H, 1, T)
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for (s, e, lo), lse in zip(_blocks(q.shape[2], window), lses):
        mask = _visible(s, e, lo, window).T  # (keys, queries)
        p = jnp.exp(jnp.where(mask, _mm("bhsd,bhtd->bhst", k[:, :, lo:e], q[:, :, s:e], dtype) * scale, NEG)
                    - jnp.swapaxes(lse, 2, 3))
        dv = dv.at[:, :, lo:e].add(_mm("bhst,bhtd->bhsd", p, do[:, :, s:e], dtype))
        ds = p * (_mm("bhsd,bhtd->bhst", v[:, :, lo:e], do[:, :, s:e], dtype) - delta[..., s:e]) * scale
        dk = dk.at[:, :, lo:e].add(_mm("bhst,bhtd->bhsd", ds, q[:, :, s:e], dtype))
        dq.append(_mm("bhst,bhsd->bhtd", ds, k[:, :, lo:e], dtype))
    return jnp.concatenate(dq, axis=2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_block_causal.defvjp(_block_causal_fwd, _block_causal_bwd)

"""The GPT of nanochat as a Flax NNX module.

Token embedding -> parameter-free RMSNorm -> n_layer pre-norm blocks (rotary + QK-norm causal attention with
optional grouped-query heads, ReLU² MLP) -> RMSNorm -> untied lm_head -> logit softcap 15·tanh(x/15).
Weights, the residual stream, norms' statistics, softmax, logits and the loss are fp32; matmuls take inputs in
`config.compute_dtype` and return it (bf16 activations on the accelerator path, as torch's autocast), so what the
backward pass keeps is 16-bit. Kernels are stored (in, out) as in JAX, i.e. transposed w.r.t. torch's weights.
Every parameter carries logical axis names; `sharding.py` alone maps them onto the mesh.

Memory of the backward pass: RoPE + QK-norm and relu² + the MLP's output projection are recomputed from their
16-bit inputs rather than saving their fp32 / 4·d-wide intermediates; `config.remat` recomputes more (see
REMAT), and `config.scan_layers` runs the blocks under one `lax.scan` (one compiled block: faster compiles) with
the same per-layer parameters, stacked on the fly, so checkpoints do not depend on it.

Entry points: `model(idx)` -> logits and `model(idx, targets)` -> mean loss (nanochat's spelling);
`model.loss(idx, targets, weights, reduction)` -> mean, sum or per-token losses, always through the fused, chunked
head of losses.py (no (B, T, V) logits); `model.decode(idx, kv_cache)` -> (logits, kv_cache). They share
`hidden` (the trunk) and `logits` (the head), which callers may also use to take logits at a few positions.
"""

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from jaxchat import sharding
from jaxchat.attention import cached_attention, causal_attention
from jaxchat.losses import softcap_cross_entropy_per_token, softcap_cross_entropy_sum

SOFTCAP = 15.0
ROPE_BASE = 10_000
NORM_EPS = float(jnp.finfo(jnp.float32).eps)  # every RMSNorm's: torch's F.rms_norm(eps=None) on fp32, as nanochat


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768
    # How to compute, not what (never checked against a checkpoint; see EXECUTION_FIELDS):
    compute_dtype: str = "float32"  # matmul inputs and activations ("bfloat16" on GPU); params, loss stay fp32
    remat: str = "none"  # what each block's backward recomputes: a key of REMAT
    scan_layers: bool = False  # blocks under lax.scan (compiles once) instead of unrolled
    attn_impl: str = "auto"  # "cudnn" | "xla" | "auto" (cuDNN flash attention where its rules hold): attention.py

    def __post_init__(self):
        if self.remat not in REMAT:
            raise ValueError(f"remat {self.remat!r}: one of {', '.join(REMAT)}")
        if self.attn_impl not in ("auto", "cudnn", "xla"):
            raise ValueError(f"attn_impl {self.attn_impl!r}: one of auto, cudnn, xla")

    def with_execution(self, **options):
        """This config with the given execution fields replaced (None = keep)."""
        unknown = set(options) - set(EXECUTION_FIELDS)
        assert not unknown, f"not execution fields: {unknown}"
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})


EXECUTION_FIELDS = ("compute_dtype", "remat", "scan_layers", "attn_impl")

# Rematerialisation of a training block: the jax.checkpoint policy its backward runs under, None = no checkpoint.
# "block" keeps only each block's input (the least memory, one more forward of the blocks); "matmuls" keeps the
# matmul and attention outputs named below and recomputes the norms, RoPE and activations between them;
# "attention" keeps q, k, v and the attention output, and recomputes the MLP. (An attention kernel's own
# statistics carry no name: under a policy its forward may run again. `python -m jaxchat.memory` shows the bytes.)
REMAT = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "matmuls": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", "attn_proj", "mlp_hidden"),
    "attention": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
}


def config_for_depth(depth, vocab_size, sequence_len, n_kv_head=None, head_dim=128, **execution):
    """nanochat's one dial: model_dim = 64·depth, n_head = ceil(model_dim / head_dim)."""
    model_dim = depth * 64
    n_head = max(1, -(-model_dim // head_dim))
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head or n_head, n_embd=model_dim).with_execution(**execution)


def linear(x, w, dtype, w_axes=None):
    """x (B, T, in) @ w (in, out): inputs cast to `dtype`, fp32 accumulation, result in `dtype` (autocast-style).
    The backward keeps the cast inputs and accumulates in fp32 too (autodiff of a bf16 matmul gives bf16-output
    matmuls, slow on CPU); gradients come back in the inputs' dtypes. `w_axes`: the kernel's logical names, to
    cast it where it is stored: under FSDP the all-gather then moves 16-bit weights, while the gradient's
    reduce-scatter stays fp32."""
    return _linear(x, w, jnp.dtype(dtype), x.dtype, w_axes)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _linear(x, w, dtype, x_dtype, w_axes):
    return _linear_fwd(x, w, dtype, x_dtype, w_axes)[0]


def _linear_fwd(x, w, dtype, x_dtype, w_axes):
    x, w = x.astype(dtype), w.astype(dtype)
    if w_axes is not None:
        w = sharding.constrain(w, w_axes)
    return jnp.einsum("bti,io->bto", x, w, preferred_element_type=jnp.float32).astype(dtype), (x, w)


def _linear_bwd(dtype, x_dtype, w_axes, res, g):
    x, w = res
    g = g.astype(dtype)
    dx = jnp.einsum("bto,io->bti", g, w, preferred_element_type=jnp.float32).astype(x_dtype)
    if dtype == jnp.float32:  # XLA:CPU then transposes g, not the wider x (measured 8% off the fp32 d4 step)
        gt_x = jnp.dot(g.reshape(-1, g.shape[-1]).T, x.reshape(-1, x.shape[-1]), preferred_element_type=jnp.float32)
        return dx, jax.lax.optimization_barrier(gt_x).T
    return dx, jnp.einsum("bto,bti->io", g, x, preferred_element_type=jnp.float32)  # the fast form in bf16


_linear.defvjp(_linear_fwd, _linear_bwd)


def norm(x):
    """Parameter-free RMSNorm with eps NORM_EPS."""
    return _norm_and_scale(x)[0]


# The two RMSNorms of a block and the QK-norm keep only their (16-bit) output y and the inverse RMS r for the
# backward pass, not their fp32 input: y is what the next matmul or the attention keeps anyway, and with y = x·r,
# dx = r·(dy − y·mean(y·dy)). So the fp32 residual stream is never saved, and neither are pre-RoPE q and k.


def norm_to(x, dtype):
    """norm(x) in `dtype` (a block's pre-norm: the input of its matmuls)."""
    return _norm_to(x, jnp.dtype(dtype), x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _norm_to(x, dtype, x_dtype):
    return _norm_to_fwd(x, dtype, x_dtype)[0]


def _norm_to_fwd(x, dtype, x_dtype):
    y, r = _norm_and_scale(x.astype(jnp.float32))
    y = y.astype(dtype)
    return y, (y, r)


def _norm_to_bwd(dtype, x_dtype, res, dy):
    return (_norm_grad(*res, dy).astype(x_dtype),)


_norm_to.defvjp(_norm_to_fwd, _norm_to_bwd)


@jax.custom_vjp
def rope_qk_norm(x, cos, sin):
    """RoPE, then QK-norm, computed in fp32; the result in x's dtype."""
    return _rope_qk_norm_fwd(x, cos, sin)[0]


def _rope_qk_norm_fwd(x, cos, sin):
    y, r = _norm_and_scale(apply_rotary(x.astype(jnp.float32), cos, sin))
    y = y.astype(x.dtype)
    return y, (y, r, cos, sin)


def _rope_qk_norm_bwd(res, dy):
    y, r, cos, sin = res
    # the rotation is orthogonal: its transpose rotates by −θ (sin negated)
    dx = apply_rotary(_norm_grad(y, r, dy), cos, -sin).astype(y.dtype)
    return dx, jnp.zeros_like(cos), jnp.zeros_like(sin)


rope_qk_norm.defvjp(_rope_qk_norm_fwd, _rope_qk_norm_bwd)


def _norm_and_scale(x):
    """(norm(x), the inverse RMS r)."""
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + NORM_EPS)
    return x * r, r


def _norm_grad(y, r, dy):
    y, dy = y.astype(jnp.float32), dy.astype(jnp.float32)
    return r * (dy - y * jnp.mean(y * dy, axis=-1, keepdims=True))


def rotary(positions, head_dim):
    """Rotation tables for integer positions (B|1, T): (cos, sin) of shape (B|1, T, 1, head_dim), fp32 angles,
    laid out for `apply_rotary`: cos = [cos θ, cos θ], sin = [sin θ, −sin θ] over the two halves."""
    inv_freq = 1.0 / ROPE_BASE ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, -sin], -1)


def apply_rotary(x, cos, sin):
    """nanochat's rotate-half pairing on the two halves (x1, x2) -> (x1·cos + x2·sin, x2·cos − x1·sin), written
    as x·cos + roll(x, half)·sin (one fused elementwise pass; the split/concat form was 5% slower on CPU)."""
    return x * cos + jnp.roll(x, x.shape[-1] // 2, axis=-1) * sin


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
    """
    k: tuple
    v: tuple
    start: jax.Array  # (B,) int32: first slot holding a real token of the row
    index: jax.Array  # () int32: next slot to write
    prefix_k: tuple | None = None  # per layer (P, n_kv_head, Tp, head_dim), or None: no shared prefix
    prefix_v: tuple | None = None
    prefix_start: jax.Array | None = None  # (P,) int32: first slot holding a real prompt token

    @classmethod
    def create(cls, config, batch_size, max_len, dtype=jnp.float32, start=None):
        shape = (batch_size, config.n_kv_head, max_len, config.n_embd // config.n_head)
        zeros = lambda: sharding.constrain(jnp.zeros(shape, dtype), ("batch", "kv_heads", None, None))
        start = jnp.zeros((batch_size,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        return cls(k=tuple(zeros() for _ in range(config.n_layer)), v=tuple(zeros() for _ in range(config.n_layer)),
                   start=start, index=jnp.zeros((), jnp.int32))

    def as_prefix(self, rows, max_len):
        """This (prefilled, prefix-less) cache of P prompts as the shared prefix of `rows` rows (a multiple of P;
        rows b·G..b·G+G−1 continue prompt b), each with an empty part of max_len slots of its own."""
        P, K, T, D = self.k[0].shape
        assert self.prefix_k is None and rows % P == 0
        pin = lambda t: tuple(map(sharding.constrain_rows, t))  # prompts split over the batch axes when they divide
        zeros = lambda: sharding.constrain_rows(jnp.zeros((rows, K, max_len, D), self.k[0].dtype))
        n = len(self.k)
        return KVCache(k=tuple(zeros() for _ in range(n)), v=tuple(zeros() for _ in range(n)),
                       start=jnp.zeros((rows,), jnp.int32), index=jnp.zeros((), jnp.int32),
                       prefix_k=pin(self.k), prefix_v=pin(self.v), prefix_start=self.start)

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

    def attend(self, layer, q, k, v, dtype):
        """Write this chunk's k, v at slots index..index+T−1 of `layer`; attend to the row's prompt prefix (if any)
        and its slots up to there."""
        T = q.shape[1]
        write = lambda cache, x: jax.lax.dynamic_update_slice(cache, x.swapaxes(1, 2).astype(cache.dtype),
                                                              (0, 0, self.index, 0))
        kc, vc = write(self.k[layer], k), write(self.v[layer], v)
        slots, query_slots = jnp.arange(self.max_len), self.index + jnp.arange(T)
        mask = (slots >= self.start[:, None, None]) & (slots <= query_slots[:, None])  # (B, T, S)
        prefix = None
        if self.prefix_k is not None:  # every prompt slot precedes every query: mask only the left padding
            valid = jnp.arange(self.prefix_k[layer].shape[2]) >= self.prefix_start[:, None]  # (P, Tp)
            prefix = (self.prefix_k[layer], self.prefix_v[layer], valid[:, None, None, None, None])
        swap = lambda t, new: t[:layer] + (new,) + t[layer + 1:]
        y = cached_attention(q, kc, vc, mask[:, None, None], dtype, prefix)
        return y, self.replace(k=swap(self.k, kc), v=swap(self.v, vc))


def _param(init, key, shape, axes):
    # Logical names `axes`, which Flax resolves to mesh axes with the rules the parameter carries (the optimizer's
    # buffers inherit both). eager_sharding=False: Flax would shard at creation and refuse to build without a mesh;
    # sharding.create_sharded places the arrays instead, so a model can also be built on one device.
    return nnx.Param(init(key, shape, jnp.float32), out_sharding=axes, sharding_rules=sharding.RULES,
                     eager_sharding=False)


class Linear(nnx.Module):
    """Bias-free linear layer, kernel (in, out) ~ N(0, 1/√in · min(1, √(out/in))) (arXiv 2310.17813) or zero."""

    def __init__(self, d_in, d_out, axes, *, dtype, rngs, zero=False):
        std = d_in**-0.5 * min(1.0, math.sqrt(d_out / d_in))
        init = jax.nn.initializers.zeros if zero else jax.nn.initializers.normal(std)
        self.kernel = _param(init, rngs.params(), (d_in, d_out), axes)
        self.dtype, self.axes = dtype, axes

    def __call__(self, x):
        return linear(x, self.kernel[...], self.dtype, self.axes)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        d, hd = config.n_embd, self.head_dim
        self.c_q = Linear(d, self.n_head * hd, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.c_k = Linear(d, self.n_kv_head * hd, ("embed", "kv_heads"), dtype=dtype, rngs=rngs)
        self.c_v = Linear(d, self.n_kv_head * hd, ("embed", "kv_heads"), dtype=dtype, rngs=rngs)
        self.c_proj = Linear(self.n_head * hd, d, ("heads", "embed"), dtype=dtype, rngs=rngs, zero=True)
        self.dtype, self.attn_impl = dtype, config.attn_impl

    def __call__(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)
        q, k = rope_qk_norm(q, cos, sin), rope_qk_norm(k, cos, sin)
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        if cache is None:
            y = causal_attention(q, k, v, self.dtype, self.attn_impl)
        else:
            y, cache = cache.attend(layer, q, k, v, self.dtype)
        y = checkpoint_name(y, "attn_out")
        return checkpoint_name(self.c_proj(y.reshape(B, T, -1)), "attn_proj"), cache


@partial(jax.checkpoint, static_argnums=(2, 3))  # keep only h: relu²(h), 4·d wide, is recomputed for the backward
def relu2_proj(h, kernel, dtype, axes):
    return linear(jnp.square(jax.nn.relu(h)), kernel, dtype, axes)


class MLP(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        d = config.n_embd
        self.c_fc = Linear(d, 4 * d, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.c_proj = Linear(4 * d, d, ("mlp", "embed"), dtype=dtype, rngs=rngs, zero=True)

    def __call__(self, x):
        h = checkpoint_name(self.c_fc(x), "mlp_hidden")
        return relu2_proj(h, self.c_proj.kernel[...], self.c_proj.dtype, self.c_proj.axes)


class Block(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.attn = CausalSelfAttention(config, dtype=dtype, rngs=rngs)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x, cos, sin, cache=None, layer=0):
        y, cache = self.attn(norm_to(x, self.dtype), cos, sin, cache, layer)
        x = x + y
        x = x + self.mlp(norm_to(x, self.dtype))
        return sharding.constrain(x, ("batch", None, None)), cache


class GPT(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.compute_dtype)
        self.wte = _param(jax.nn.initializers.normal(1.0), rngs.params(), (config.vocab_size, config.n_embd),
                          ("vocab", "embed"))
        self.h = nnx.List([Block(config, dtype=dtype, rngs=rngs) for _ in range(config.n_layer)])
        self.lm_head = Linear(config.n_embd, config.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs,
                              zero=True)

    def __call__(self, idx, targets=None):
        """idx (B, T) int -> logits (B, T, V) fp32, softcapped; with `targets` (B, T) (−1 = ignore), the mean loss
        over supervised tokens instead (nanochat's spelling)."""
        if targets is not None:
            return self.loss(idx, targets)
        return self.logits(self.hidden(idx))

    def loss(self, idx, targets, weights=None, reduction="mean"):
        """Cross-entropy of the next tokens `targets` (B, T) (−1 = ignore), through the fused, chunked head
        (no (B, T, V) logits). `weights` (B, T) fp32 scale each token's loss (RL: the advantages).
        reduction "mean": over supervised tokens (0 if none; weights do not change the count); "sum";
        "none": per token, (losses (B, T), 0 where ignored; argmax of each position's logits (B, T) int32)."""
        x, kernel, dtype = self.hidden(idx), self.lm_head.kernel[...], self.lm_head.dtype
        if reduction == "none":
            return softcap_cross_entropy_per_token(x, kernel, targets, SOFTCAP, dtype, weights)
        loss_sum = softcap_cross_entropy_sum(x, kernel, targets, SOFTCAP, dtype, weights)
        if reduction == "sum":
            return loss_sum
        if reduction != "mean":
            raise ValueError(f"reduction {reduction!r}: one of 'mean', 'sum', 'none'")
        return loss_sum / jnp.maximum(jnp.sum(targets != -1), 1)

    def decode(self, idx, kv_cache, at=None):
        """Feed idx (B, T) at the cache's next slot (each row's positions continue from `kv_cache.pos`):
        (logits (B, T, V) fp32, the cache holding them); with `at` (an int, may be traced), only column at's
        logits (B, V) — a prefill then never builds (B, T, V) logits."""
        x, kv_cache = self._trunk(idx, kv_cache.pos[:, None] + jnp.arange(idx.shape[1])[None], kv_cache)
        if at is not None:
            x = jax.lax.dynamic_index_in_dim(x, at, axis=1, keepdims=False)[:, None]
        logits = self.logits(x)
        return logits if at is None else logits[:, 0], kv_cache.replace(index=kv_cache.index + idx.shape[1])

    def hidden(self, idx, positions=None):
        """The final (normed) hidden states (B, T, D) fp32 that the head reads; `positions` (B|1, T) default to
        0..T−1. With `logits`, lets a caller take logits at a few positions only."""
        return self._trunk(idx, jnp.arange(idx.shape[1])[None] if positions is None else positions)[0]

    def logits(self, x):
        """Softcapped logits 15·tanh(head(x)/15) (B, T, V) fp32 of hidden states x (B, T, D) (the matmul's fp32
        accumulation, not rounded to the compute dtype: sampling reads them)."""
        dtype = self.lm_head.dtype
        z = jnp.einsum("btd,dv->btv", x.astype(dtype), self.lm_head.kernel[...].astype(dtype),
                       preferred_element_type=jnp.float32)
        return SOFTCAP * jnp.tanh(z / SOFTCAP)

    def _trunk(self, idx, positions, kv_cache=None):
        """Embedding, the blocks and the final norm: (hidden states, the cache with this chunk's K/V written)."""
        cos, sin = rotary(positions, self.config.n_embd // self.config.n_head)
        x = sharding.constrain(norm(jnp.take(self.wte[...], idx, axis=0)), ("batch", None, None))
        if kv_cache is not None:  # decoding: no backward pass, one cache per layer
            for layer, block in enumerate(self.h):
                x, kv_cache = block(x, cos, sin, kv_cache, layer)
            return norm(x), kv_cache
        graphdef = nnx.graphdef(self.h[0])  # every block has the same structure

        def run_block(x, block_state):
            return nnx.merge(graphdef, block_state)(x, cos, sin)[0]

        if (policy := REMAT[self.config.remat]) is not None:
            run_block = jax.checkpoint(run_block, policy=policy)
        states = [nnx.state(block) for block in self.h]
        if self.config.scan_layers:
            x, _ = jax.lax.scan(lambda x, s: (run_block(x, s), None), x, jax.tree.map(lambda *a: jnp.stack(a), *states))
        else:
            for block_state in states:
                x = run_block(x, block_state)
        return norm(x), None

    def num_params(self):
        return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def estimate_flops(self):
        """FLOPs per token, nanochat/PaLM: 6·(N − N_wte) + 12·L·H·head_dim·T (attention counted unmasked)."""
        c = self.config
        return 6 * (self.num_params() - c.vocab_size * c.n_embd) + 12 * c.n_layer * c.n_embd * c.sequence_len

"""The GPT of nanochat as a Flax NNX module.

Token embedding -> parameter-free RMSNorm -> n_layer pre-norm blocks (rotary + QK-norm causal attention with
optional grouped-query heads, ReLU² MLP) -> RMSNorm -> untied lm_head -> logit softcap 15·tanh(x/15).
Weights, the residual stream, norms' statistics, softmax, logits and the loss are fp32; matmuls take inputs in
`config.compute_dtype` and return it (bf16 activations on the accelerator path, as torch's autocast), so what the
backward pass keeps is 16-bit; `config.fp8` (training on Hopper GPUs, nanochat's --fp8) gives the layers that
fp8.eligible takes fp8 operands (fp8.py), and evaluations run the same weights without it (TrainState.eval_model).
Kernels are stored (in, out) as in JAX, i.e. transposed w.r.t. torch's weights. Every parameter carries logical
axis names; `sharding.py` alone maps them onto the mesh.

Memory of the backward pass: the norms, RoPE + QK-norm and relu² + the MLP's output projection keep only 16-bit
tensors and recompute the rest (their backward passes are written out in custom_grads.py); `config.remat`
recomputes more (see REMAT), and `config.scan_layers` runs the blocks under one `lax.scan` (one compiled block:
faster compiles) with the same per-layer parameters, stacked on the fly, so checkpoints do not depend on it.

Entry points: `model(idx)` -> logits and `model(idx, targets)` -> mean loss (nanochat's spelling);
`model.loss(idx, targets, weights, reduction)` -> the mean or sum of the losses and `model.token_losses(idx,
targets, weights)` -> (per-token losses, argmax), both through the fused, chunked head of losses.py (no (B, T, V)
logits); `model.decode(idx, kv_cache)` -> (logits, kv_cache), the cache a kv_cache.KVCache. They share `hidden`
(the trunk) and `logits` (the head), which callers may also use to take logits at a few positions.
"""

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxchat import sharding
from jaxchat.attention import KERNELS, causal_attention
from jaxchat.custom_grads import linear, norm, norm_to, relu2_proj, rope_qk_norm
from jaxchat.fp8 import eligible as fp8_eligible
from jaxchat.fp8 import linear as fp8_linear
from jaxchat.losses import softcap_cross_entropy_per_token, softcap_cross_entropy_sum

SOFTCAP = 15.0
ROPE_BASE = 10_000


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
    attn_impl: str = "auto"  # "cudnn" | "splash" | "xla" | "auto" (the first that can run): attention.KERNELS
    fp8: bool = False  # training matmuls of the layers fp8.eligible takes in fp8 (Hopper); evaluations run without

    def __post_init__(self):
        if self.remat not in REMAT:
            raise ValueError(f"remat {self.remat!r}: one of {', '.join(REMAT)}")
        if self.attn_impl not in ("auto", *KERNELS):
            raise ValueError(f"attn_impl {self.attn_impl!r}: one of auto, {', '.join(KERNELS)}")
        if self.fp8 and self.compute_dtype != "bfloat16":
            raise ValueError(f"fp8 needs compute_dtype 'bfloat16' (its matmuls take bf16 activations), not "
                             f"{self.compute_dtype!r}")

    def with_execution(self, **options):
        """This config with the given execution fields replaced (None = keep)."""
        unknown = set(options) - set(EXECUTION_FIELDS)
        assert not unknown, f"not execution fields: {unknown}"
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})


EXECUTION_FIELDS = ("compute_dtype", "remat", "scan_layers", "attn_impl", "fp8")

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


def rotary(positions, head_dim):
    """Rotation tables for integer positions (B|1, T): (cos, sin) of shape (B|1, T, 1, head_dim), fp32 angles,
    laid out for custom_grads.apply_rotary: cos = [cos θ, cos θ], sin = [sin θ, −sin θ] over the two halves."""
    inv_freq = 1.0 / ROPE_BASE ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, -sin], -1)


def _param(init, key, shape, axes):
    # Logical names `axes`, which Flax resolves to mesh axes with the rules the parameter carries (the optimizer's
    # buffers inherit both). eager_sharding=False: Flax would shard at creation and refuse to build without a mesh;
    # sharding.create_sharded places the arrays instead, so a model can also be built on one device.
    return nnx.Param(init(key, shape, jnp.float32), out_sharding=axes, sharding_rules=sharding.RULES,
                     eager_sharding=False)


class Linear(nnx.Module):
    """Bias-free linear layer, kernel (in, out) ~ N(0, 1/√in · min(1, √(out/in))) (arXiv 2310.17813) or zero.
    With `fp8` its matmuls run in fp8 when its shape is one fp8.eligible takes (nanochat's filter)."""

    def __init__(self, d_in, d_out, axes, *, dtype, rngs, fp8=False, zero=False):
        std = d_in**-0.5 * min(1.0, math.sqrt(d_out / d_in))
        init = jax.nn.initializers.zeros if zero else jax.nn.initializers.normal(std)
        self.kernel = _param(init, rngs.params(), (d_in, d_out), axes)
        self.dtype, self.axes, self.fp8 = dtype, axes, fp8 and fp8_eligible(d_in, d_out)

    def __call__(self, x):
        return (fp8_linear if self.fp8 else linear)(x, self.kernel[...], self.dtype, self.axes)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        d, hd = config.n_embd, self.head_dim
        dense = partial(Linear, dtype=dtype, fp8=config.fp8, rngs=rngs)
        self.c_q = dense(d, self.n_head * hd, ("embed", "heads"))
        self.c_k = dense(d, self.n_kv_head * hd, ("embed", "kv_heads"))
        self.c_v = dense(d, self.n_kv_head * hd, ("embed", "kv_heads"))
        self.c_proj = dense(self.n_head * hd, d, ("heads", "embed"), zero=True)
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


class MLP(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        d = config.n_embd
        dense = partial(Linear, dtype=dtype, fp8=config.fp8, rngs=rngs)
        self.c_fc = dense(d, 4 * d, ("embed", "mlp"))
        self.c_proj = dense(4 * d, d, ("mlp", "embed"), zero=True)

    def __call__(self, x):
        h = checkpoint_name(self.c_fc(x), "mlp_hidden")
        p = self.c_proj
        return relu2_proj(h, p.kernel[...], p.dtype, p.axes, p.fp8)


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
        self.lm_head = Linear(config.n_embd, config.vocab_size, ("embed", "vocab"), dtype=dtype, fp8=config.fp8,
                              rngs=rngs, zero=True)

    def __call__(self, idx, targets=None):
        """idx (B, T) int -> logits (B, T, V) fp32, softcapped; with `targets` (B, T) (−1 = ignore), the mean loss
        over supervised tokens instead (nanochat's spelling)."""
        if targets is not None:
            return self.loss(idx, targets)
        return self.logits(self.hidden(idx))

    def loss(self, idx, targets, weights=None, reduction="mean"):
        """Cross-entropy of the next tokens `targets` (B, T) (−1 = ignore), through the fused, chunked head
        (no (B, T, V) logits). `weights` (B, T) fp32 scale each token's loss (RL: the advantages).
        reduction "mean": over supervised tokens (0 if none; weights do not change the count); "sum"."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction {reduction!r}: one of 'mean', 'sum' (per token: token_losses)")
        head = self.lm_head
        loss_sum = softcap_cross_entropy_sum(self.hidden(idx), head.kernel[...], targets, SOFTCAP, head.dtype, weights,
                                             head.fp8)
        if reduction == "sum":
            return loss_sum
        return loss_sum / jnp.maximum(jnp.sum(targets != -1), 1)

    def token_losses(self, idx, targets, weights=None):
        """Each token's cross-entropy, as `loss` sums them: (losses (B, T) fp32, weighted, 0 where the target is
        −1; argmax of each position's logits (B, T) int32, for evaluations that check greedy predictions)."""
        x, kernel, dtype = self.hidden(idx), self.lm_head.kernel[...], self.lm_head.dtype
        return softcap_cross_entropy_per_token(x, kernel, targets, SOFTCAP, dtype, weights)

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

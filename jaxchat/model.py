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

nanochat's 2026 architecture is a set of options, all off by default (the October 2025 model above): value
embeddings gated into the values of alternate layers (`value_embeds`), sliding-window attention (`window_pattern`),
"smear" (each position's embedding gets a gated share of the previous one's), per-layer residual and x0 lambdas
(x = r_i·x + a_i·x0 before every block, x0 the embedding), "backout" (the middle block's output subtracted before
the final norm), q and k scaled after QK-norm (`qk_scale`), `rope_base`, a vocabulary padded for the matmuls
(`vocab_multiple`; logits and the loss see only the real tokens) and its init (`init`). NANOCHAT_2026 turns them
all on; `config_for_depth(..., recipe="2026")` also applies its width rule.

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
VE_GATE_CHANNELS, SMEAR_GATE_CHANNELS = 12, 24  # leading channels of the normed input that the gates read


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
    # nanochat 2026 (the defaults are the October 2025 model):
    window_pattern: str | None = None  # e.g. "SSSL" tiled over layers, last layer L: see `windows`; None = all full
    value_embeds: bool = False  # value embeddings with their gates on layers i % 2 == (n_layer − 1) % 2
    smear: bool = False  # x[t] += λ·σ(gate(x[t]))·x[t−1] on the normed embedding
    backout: bool = False  # x −= λ·(output of block n_layer // 2) before the final norm
    residual_lambdas: bool = False  # x = resid_lambdas[i]·x + x0_lambdas[i]·x0 before block i
    qk_scale: float = 1.0  # q and k times this after QK-norm
    rope_base: int = ROPE_BASE
    vocab_multiple: int = 1  # wte, lm_head and value embeddings padded to a multiple of it
    init: str = "2025"  # "2025" | "2026": see _inits

    def __post_init__(self):
        if self.remat not in REMAT:
            raise ValueError(f"remat {self.remat!r}: one of {', '.join(REMAT)}")
        if self.attn_impl not in ("auto", *KERNELS):
            raise ValueError(f"attn_impl {self.attn_impl!r}: one of auto, {', '.join(KERNELS)}")
        if self.fp8 and self.compute_dtype != "bfloat16":
            raise ValueError(f"fp8 needs compute_dtype 'bfloat16' (its matmuls take bf16 activations), not "
                             f"{self.compute_dtype!r}")
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r}: one of {', '.join(INITS)}")
        if self.window_pattern is not None and (not self.window_pattern or set(self.window_pattern) - set("SL")):
            raise ValueError(f"window_pattern {self.window_pattern!r}: a string of S (short) and L (long)")
        if self.scan_layers and (self.value_embeds or self.residual_lambdas or self.backout
                                 or len(set(self.windows)) > 1):
            raise ValueError("scan_layers runs identical blocks one after another: not with value_embeds, "
                             "residual_lambdas, backout or windows that differ between layers")

    @property
    def padded_vocab(self):
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def windows(self):
        """Each layer's sliding window W (its queries see the W previous keys and their own), None = all earlier
        keys. nanochat's: the pattern tiled over the layers, the last layer long; L = sequence_len, S = a quarter of
        it rounded up to a multiple of 128 (the FA3 tile)."""
        if self.window_pattern is None:
            return (None,) * self.n_layer
        size = {"L": self.sequence_len, "S": -(-self.sequence_len // 4 // 128) * 128}
        return tuple(size[self.window_pattern[i % len(self.window_pattern)]] for i in range(self.n_layer - 1)) + (
            size["L"],)

    def has_ve(self, layer):
        """Whether `layer` has a value embedding: alternate layers, the last one always."""
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2

    def with_execution(self, **options):
        """This config with the given execution fields replaced (None = keep)."""
        unknown = set(options) - set(EXECUTION_FIELDS)
        assert not unknown, f"not execution fields: {unknown}"
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})


EXECUTION_FIELDS = ("compute_dtype", "remat", "scan_layers", "attn_impl", "fp8")

# nanochat's 2026 architecture (GPTConfig(**NANOCHAT_2026, ...)).
NANOCHAT_2026 = dict(window_pattern="SSSL", value_embeds=True, smear=True, backout=True, residual_lambdas=True,
                     qk_scale=1.2, rope_base=100_000, vocab_multiple=64, init="2026")

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


def config_for_depth(depth, vocab_size, sequence_len, n_kv_head=None, head_dim=128, recipe="2025", **execution):
    """nanochat's one dial. recipe "2025": model_dim = 64·depth, n_head = ceil(model_dim / head_dim); "2026":
    model_dim = 64·depth rounded up to a multiple of head_dim, n_head = model_dim / head_dim, and NANOCHAT_2026."""
    if recipe not in ("2025", "2026"):
        raise ValueError(f"recipe {recipe!r}: '2025' or '2026'")
    model_dim = depth * 64
    if recipe == "2026":
        model_dim = -(-model_dim // head_dim) * head_dim
    n_head = max(1, -(-model_dim // head_dim))
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head or n_head, n_embd=model_dim,
                     **(NANOCHAT_2026 if recipe == "2026" else {})).with_execution(**execution)


def rotary(positions, head_dim, base=ROPE_BASE):
    """Rotation tables for integer positions (B|1, T): (cos, sin) of shape (B|1, T, 1, head_dim), fp32 angles,
    laid out for custom_grads.apply_rotary: cos = [cos θ, cos θ], sin = [sin θ, −sin θ] over the two halves."""
    inv_freq = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, -sin], -1)


def _param(init, key, shape, axes):
    # Logical names `axes`, which Flax resolves to mesh axes with the rules the parameter carries (the optimizer's
    # buffers inherit both). eager_sharding=False: Flax would shard at creation and refuse to build without a mesh;
    # sharding.create_sharded places the arrays instead, so a model can also be built on one device.
    return nnx.Param(init(key, shape, jnp.float32), out_sharding=axes, sharding_rules=sharding.RULES,
                     eager_sharding=False)


def _uniform(low, high):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, low, high)


def _inits(config):
    """Initialisers by role; None = Linear's fan-in normal. "2025": nanochat's October init (the default).
    "2026": embedding N(0, 0.8), head N(0, 0.001), q/k/v uniform with std 1/√d, c_fc 0.4 times that (the bound
    √3·std gives a uniform that std). Value embeddings are uniform like c_v and the gates U(0, 0.02) (slightly
    above neutral) under either; the output projections start at zero under both."""
    s = math.sqrt(3 / config.n_embd)
    zeros, normal = jax.nn.initializers.zeros, jax.nn.initializers.normal
    shared = dict(proj=zeros, ve=_uniform(-s, s), gate=_uniform(0.0, 0.02))
    if config.init == "2025":
        return dict(shared, wte=normal(1.0), lm_head=zeros, qkv=None, fc=None)
    return dict(shared, wte=normal(0.8), lm_head=normal(0.001), qkv=_uniform(-s, s), fc=_uniform(-0.4 * s, 0.4 * s))


INITS = ("2025", "2026")


class Linear(nnx.Module):
    """Bias-free linear layer, kernel (in, out) ~ `init`, by default N(0, 1/√in · min(1, √(out/in)))
    (arXiv 2310.17813). With `fp8` its matmuls run in fp8 when its shape is one fp8.eligible takes (nanochat's
    filter)."""

    def __init__(self, d_in, d_out, axes, *, dtype, rngs, fp8=False, init=None):
        if init is None:
            init = jax.nn.initializers.normal(d_in**-0.5 * min(1.0, math.sqrt(d_out / d_in)))
        self.kernel = _param(init, rngs.params(), (d_in, d_out), axes)
        self.dtype, self.axes, self.fp8 = dtype, axes, fp8 and fp8_eligible(d_in, d_out)

    def __call__(self, x):
        return (fp8_linear if self.fp8 else linear)(x, self.kernel[...], self.dtype, self.axes)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config, layer, *, dtype, rngs):
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        d, hd, init = config.n_embd, self.head_dim, _inits(config)
        dense = partial(Linear, dtype=dtype, fp8=config.fp8, rngs=rngs)
        self.c_q = dense(d, self.n_head * hd, ("embed", "heads"), init=init["qkv"])
        self.c_k = dense(d, self.n_kv_head * hd, ("embed", "kv_heads"), init=init["qkv"])
        self.c_v = dense(d, self.n_kv_head * hd, ("embed", "kv_heads"), init=init["qkv"])
        self.c_proj = dense(self.n_head * hd, d, ("heads", "embed"), init=init["proj"])
        # the value embedding's gate per kv head, from the first channels of the (normed) input
        self.ve_gate = dense(VE_GATE_CHANNELS, self.n_kv_head, (None, "kv_heads"), init=init["gate"]) \
            if config.has_ve(layer) else None
        self.dtype, self.attn_impl = dtype, config.attn_impl
        self.window, self.qk_scale = config.windows[layer], config.qk_scale

    def __call__(self, x, cos, sin, ve=None, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # v += 3·σ(gate)·ve: a gate in (0, 3) per kv head
            gate = 3 * jax.nn.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]).astype(jnp.float32))
            v = (v + gate[..., None] * ve.reshape(v.shape)).astype(v.dtype)
        q, k = rope_qk_norm(q, cos, sin, self.qk_scale), rope_qk_norm(k, cos, sin, self.qk_scale)
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        if cache is None:
            y = causal_attention(q, k, v, self.dtype, self.attn_impl, self.window)
        else:
            y, cache = cache.attend(layer, q, k, v, self.dtype, self.window)
        y = checkpoint_name(y, "attn_out")
        return checkpoint_name(self.c_proj(y.reshape(B, T, -1)), "attn_proj"), cache


class MLP(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        d, init = config.n_embd, _inits(config)
        dense = partial(Linear, dtype=dtype, fp8=config.fp8, rngs=rngs)
        self.c_fc = dense(d, 4 * d, ("embed", "mlp"), init=init["fc"])
        self.c_proj = dense(4 * d, d, ("mlp", "embed"), init=init["proj"])

    def __call__(self, x):
        h = checkpoint_name(self.c_fc(x), "mlp_hidden")
        p = self.c_proj
        return relu2_proj(h, p.kernel[...], p.dtype, p.axes, p.fp8)


class Block(nnx.Module):
    def __init__(self, config, layer, *, dtype, rngs):
        self.attn = CausalSelfAttention(config, layer, dtype=dtype, rngs=rngs)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x, cos, sin, ve=None, cache=None, layer=0):
        y, cache = self.attn(norm_to(x, self.dtype), cos, sin, ve, cache, layer)
        x = x + y
        x = x + self.mlp(norm_to(x, self.dtype))
        return sharding.constrain(x, ("batch", None, None)), cache


def _scalar_param(values):
    """A replicated fp32 vector with the given initial values (lambdas)."""
    values = jnp.asarray(values, jnp.float32)
    return _param(lambda *_: values, None, values.shape, (None,))


class GPT(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.compute_dtype)
        V, d, L, init = config.padded_vocab, config.n_embd, config.n_layer, _inits(config)
        self.wte = _param(init["wte"], rngs.params(), (V, d), ("vocab", "embed"))
        self.h = nnx.List([Block(config, i, dtype=dtype, rngs=rngs) for i in range(L)])
        self.lm_head = Linear(d, V, ("embed", "vocab"), dtype=dtype, fp8=config.fp8, rngs=rngs, init=init["lm_head"])
        if config.value_embeds:  # one (V, kv width) table per layer that has one, keyed by the layer's index
            kv_dim = config.n_kv_head * (d // config.n_head)
            self.value_embeds = nnx.Dict({str(i): _param(init["ve"], rngs.params(), (V, kv_dim), ("vocab", "embed"))
                                          for i in range(L) if config.has_ve(i)})
        if config.residual_lambdas:  # the early layers keep more of the stream and mix in more of x0
            depth = jnp.arange(L) / max(L - 1, 1)
            self.resid_lambdas = _scalar_param(1.15 - 0.10 * depth)
            self.x0_lambdas = _scalar_param(0.20 - 0.15 * depth)
        if config.smear:
            self.smear_gate = Linear(SMEAR_GATE_CHANNELS, 1, (None, None), dtype=dtype, rngs=rngs, init=init["gate"])
            self.smear_lambda = _scalar_param([0.0])
        if config.backout:
            self.backout_lambda = _scalar_param([0.2])

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
        loss_sum = softcap_cross_entropy_sum(self.hidden(idx), self.head_kernel(), targets, SOFTCAP, head.dtype,
                                             weights, head.fp8)
        if reduction == "sum":
            return loss_sum
        return loss_sum / jnp.maximum(jnp.sum(targets != -1), 1)

    def token_losses(self, idx, targets, weights=None):
        """Each token's cross-entropy, as `loss` sums them: (losses (B, T) fp32, weighted, 0 where the target is
        −1; argmax of each position's logits (B, T) int32, for evaluations that check greedy predictions)."""
        x, kernel, dtype = self.hidden(idx), self.head_kernel(), self.lm_head.dtype
        return softcap_cross_entropy_per_token(x, kernel, targets, SOFTCAP, dtype, weights)

    def decode(self, idx, kv_cache, at=None):
        """Feed idx (B, T) at the cache's next slot (each row's positions continue from `kv_cache.pos`):
        (logits (B, T, V) fp32, the cache holding them); with `at` (an int, may be traced), only column at's
        logits (B, V) — a prefill then never builds (B, T, V) logits. With smear the cache keeps the normed
        embedding of the last column (of column `at`: the last real one, where right-padding follows)."""
        x, kv_cache = self._trunk(idx, kv_cache.pos[:, None] + jnp.arange(idx.shape[1])[None], kv_cache)
        if self.config.smear:
            last = idx[:, -1] if at is None else jax.lax.dynamic_index_in_dim(idx, at, axis=1, keepdims=False)
            kv_cache = kv_cache.replace(embed=norm(jnp.take(self.wte[...], last, axis=0)))
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
        z = jnp.einsum("btd,dv->btv", x.astype(dtype), self.head_kernel().astype(dtype),
                       preferred_element_type=jnp.float32)
        return SOFTCAP * jnp.tanh(z / SOFTCAP)

    def head_kernel(self):
        """lm_head's kernel (D, vocab_size): without the padding columns, which no token has (their logits are
        never formed, so the loss and its gradient ignore them exactly)."""
        kernel = self.lm_head.kernel[...]
        return kernel if self.config.padded_vocab == self.config.vocab_size else kernel[:, :self.config.vocab_size]

    def _trunk(self, idx, positions, kv_cache=None):
        """Embedding, the blocks and the final norm: (hidden states, the cache with this chunk's K/V written)."""
        c = self.config
        cos, sin = rotary(positions, c.n_embd // c.n_head, c.rope_base)
        x = sharding.constrain(norm(jnp.take(self.wte[...], idx, axis=0)), ("batch", None, None))
        if c.smear:
            x = self._smear(x, positions, None if kv_cache is None else kv_cache.embed)
        if c.scan_layers and kv_cache is None:
            return self._scan_blocks(x, cos, sin), None
        policy = REMAT[c.remat]

        def run_block(graphdef, x, block_state, ve):
            return nnx.merge(graphdef, block_state)(x, cos, sin, ve)[0]

        if kv_cache is None and policy is not None:
            run_block = jax.checkpoint(run_block, policy=policy, static_argnums=(0,))
        x0, x_mid = x, None
        for i, block in enumerate(self.h):
            if c.residual_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            # split by rows like x: a lookup in a table split by features would come out split by features
            ve = sharding.constrain(jnp.take(self.value_embeds[str(i)][...], idx, axis=0), ("batch", None, None)) \
                if c.has_ve(i) else None
            if kv_cache is None:
                x = run_block(nnx.graphdef(block), x, nnx.state(block), ve)
            else:  # decoding: no backward pass, one cache per layer
                x, kv_cache = block(x, cos, sin, ve, kv_cache, i)
            if i == c.n_layer // 2:
                x_mid = x
        if c.backout:  # remove the middle layer's (low-level) features before the head
            x = x - self.backout_lambda[...] * x_mid
        return norm(x), kv_cache

    def _smear(self, x, positions, last=None):
        """x[t] += λ·σ(gate(x[t]))·x[t−1] over the normed embeddings x (B, T, D): a cheap bigram feature. A
        sequence's first token (position 0) has no previous one; `last` (B, D), decoding's cached embedding,
        precedes column 0."""
        prev = jnp.zeros_like(x[:, :1]) if last is None else last[:, None]
        prev = jnp.where(positions[..., None] > 0, jnp.concatenate([prev, x[:, :-1]], axis=1), 0.0)
        gate = jax.nn.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_CHANNELS]).astype(jnp.float32))
        return x + self.smear_lambda[...] * gate * prev

    def _scan_blocks(self, x, cos, sin):
        """The blocks under one lax.scan (identical blocks: GPTConfig checks), their parameters stacked."""
        graphdef = nnx.graphdef(self.h[0])

        def run_block(x, block_state):
            return nnx.merge(graphdef, block_state)(x, cos, sin)[0]

        if (policy := REMAT[self.config.remat]) is not None:
            run_block = jax.checkpoint(run_block, policy=policy)
        states = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(block) for block in self.h])
        return norm(jax.lax.scan(lambda x, s: (run_block(x, s), None), x, states)[0])

    def num_params(self):
        return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def num_matmul_params(self):
        """Parameters that multiply the token stream (2 FLOPs each per token forward): the kernels of the Linear
        layers (lm_head and the gates included); embeddings are lookups and lambdas scale."""
        return sum(m.kernel.size for _, m in nnx.iter_modules(self) if isinstance(m, Linear))

    def num_scaling_params(self):
        """nanochat's parameter counts by group (scaling laws use transformer_matrices + lm_head)."""
        params = nnx.to_flat_state(nnx.state(self, nnx.Param))
        size = lambda *names: sum(p.size for path, p in params if path[0] in names)
        counts = dict(wte=size("wte"), value_embeds=size("value_embeds"), lm_head=size("lm_head"),
                      transformer_matrices=size("h"),
                      scalars=size("resid_lambdas", "x0_lambdas", "smear_gate", "smear_lambda", "backout_lambda"))
        return dict(counts, total=sum(counts.values()))

    def estimate_flops(self):
        """FLOPs per token, nanochat/PaLM: 6·(matmul parameters) + Σ_layers 12·H·head_dim·(keys a query sees: T, or
        the layer's window W when shorter; attention counted unmasked)."""
        c = self.config
        T = c.sequence_len
        attention = sum(12 * c.n_embd * (T if w is None else min(w, T)) for w in c.windows)
        return 6 * self.num_matmul_params() + attention

"""nanochat's optimizer from Optax parts, and its schedules.

Groups: Muon for every 2-D block matrix (`h.*`), AdamW for `wte` (embedding_lr) and `lm_head` (unembedding_lr),
both AdamW LRs × (model_dim/768)^−0.5, betas (0.8, 0.95), eps 1e-10. The LR multiplier and Muon momentum are
*extra args* of `tx.update` (traced scalars: changing them never recompiles).

Where Optax's `contrib.muon` differs from nanochat and what is used instead:
- momentum: optax bias-corrects and mixes the corrected terms for Nesterov; nanochat does no bias correction,
  `buf = lerp(buf, g, 1−μ)`, `g = lerp(g, buf, μ)` with μ scheduled -> `nesterov_momentum` below.
- Newton–Schulz: same quintic and coefficients, Frobenius pre-normalisation (eps 1e-7), wide orientation. Not
  optax's `orthogonalize_via_newton_schulz`: in bf16 it rounds the coefficients and does every operation in bf16,
  5-7% (Frobenius) from the exact iteration, vs ~3.5% for nanochat's torch bf16 (fp32 accumulation, exact
  scalars). Here: matmul inputs in `ns_dtype` (bf16 by default, as nanochat's `X = G.bfloat16()` on every
  device), fp32 accumulation and elementwise math, X and the Gram matrices rounded to `ns_dtype`: 1.1-1.6%
  (and faster than optax's bf16 version on CPU).
- scale: √max(1, rows/cols) of torch's (out, in) weight = √max(1, out/in) of our (in, out) kernels.
- Adam branch: optax.contrib.muon's is NAdamW b2=0.999 sharing Muon's eps; here two plain `optax.adamw`.

Newton–Schulz under FSDP: on a sharded matrix, every one of its ~15 small matmuls would need collectives. Instead
the Muon matrices are grouped by shape in the wide orientation (tall ones transposed: c_fc and the MLP c_proj form
one group), each group stacked into (n, rows, cols) in `ns_dtype` (bf16 halves the traffic; the Frobenius norm is
then the rounded matrix's), padded with zero matrices to a multiple of the device count and split on the stack
axis over every mesh axis: each device orthogonalises whole matrices with a vmapped Newton–Schulz, communicating
nothing. The only collectives are the reshards into and out of the stacks, whatever `ns_steps` (nanochat's
DistMuon, done by GSPMD). The updates take their parameters' sharding where they are used (the train step pins
the new state).
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxchat import sharding

NS_COEFFS = (3.4445, -4.7750, 2.0315)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0  # AdamW groups only, as nanochat
    adam_betas: tuple = (0.8, 0.95)
    adam_eps: float = 1e-10
    ns_steps: int = 5
    ns_dtype: str = "bfloat16"  # Newton–Schulz dtype, as nanochat
    grad_clip: float = 1.0  # global-norm clip over all gradients; 0 = off (nanochat OCT base_train: 1.0)


class MomentumState(NamedTuple):
    buf: optax.Updates


def nesterov_momentum():
    """nanochat's Muon momentum (μ = extra arg `muon_momentum`): buf ← lerp(buf, g, 1−μ), g ← lerp(g, buf, μ)."""

    def init(params):
        return MomentumState(jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None, *, muon_momentum, **_):
        buf = jax.tree.map(lambda b, g: b + (1 - muon_momentum) * (g - b), state.buf, grads)
        out = jax.tree.map(lambda g, b: g + muon_momentum * (b - g), grads, buf)
        return out, MomentumState(buf)

    return optax.GradientTransformationExtraArgs(init, update)


def newton_schulz(g, steps=5, dtype=jnp.float32):
    """nanochat's zeropower_via_newtonschulz5 on one matrix: X ≈ U·S'·Vᵀ with S' in ~[0.68, 1.13]."""
    a, b, c = NS_COEFFS
    f32 = lambda t: t.astype(jnp.float32)
    dot = lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32)
    x = g.T if g.shape[0] > g.shape[1] else g  # iterate on the wide orientation: X Xᵀ is the small Gram matrix
    x = (f32(x) / (jnp.linalg.norm(f32(x)) + 1e-7)).astype(dtype)  # fp32 norm even of a bf16 input
    for _ in range(steps):
        A = dot(x, x.T).astype(dtype)
        B = (b * f32(A) + c * dot(A, A)).astype(dtype)
        x = (a * f32(x) + dot(B, x)).astype(dtype)
    x = x.astype(g.dtype)
    return x.T if g.shape[0] > g.shape[1] else x


def stack_axes(mesh):
    """The mesh axes that split parameters (FSDP's), and every mesh axis with those first. A stack is split over the
    former with one all-to-all inside each replica of the parameters, then over all of them by a local slice;
    asked for both at once, GSPMD gathers the whole stack on every device instead."""
    embed = dict(sharding.RULES)["embed"]  # FSDP: parameters are split over the model-width axis's mesh axes
    fsdp = tuple(a for a in mesh.axis_names if a in ((embed,) if isinstance(embed, str) else embed or ()))
    return fsdp, fsdp + tuple(a for a in mesh.axis_names if a not in fsdp)


def orthogonalize_stacked(ns_steps=5, ns_dtype=jnp.bfloat16):
    """Newton–Schulz on every matrix of the tree, in stacks of equal wide shape split over the stack axis (see
    the header). Without a mesh: the same stacks, unpadded and unconstrained."""
    orthogonalize = jax.vmap(lambda x: newton_schulz(x, ns_steps, ns_dtype))

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        tall = [g.shape[0] > g.shape[1] for g in leaves]
        groups = {}  # wide shape -> indices of its leaves
        for i, g in enumerate(leaves):
            groups.setdefault(g.shape[::-1] if tall[i] else g.shape, []).append(i)
        mesh = jax.sharding.get_abstract_mesh()
        fsdp, every = stack_axes(mesh)
        split = lambda x, axes: x if mesh.empty else jax.lax.with_sharding_constraint(x, P(axes))
        out = [None] * len(leaves)
        for idx in groups.values():
            stack = jnp.stack([(leaves[i].T if tall[i] else leaves[i]).astype(ns_dtype) for i in idx])
            pad = 0 if mesh.empty else -len(idx) % mesh.size  # zero matrices: NS gives 0 / (0 + eps) = 0
            stack = split(split(jnp.pad(stack, ((0, pad), (0, 0), (0, 0))), fsdp), every)
            stack = split(split(orthogonalize(stack), every), fsdp)  # back to where the matrices' shards are
            for j, i in enumerate(idx):  # the padding is never read
                x = stack[j].astype(leaves[i].dtype)
                out[i] = x.T if tall[i] else x
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_lr_multiplier():
    """Multiply every update by the extra arg `lr_multiplier` (all groups' LRs scale together, as nanochat)."""

    def update(updates, state, params=None, *, lr_multiplier, **_):
        return jax.tree.map(lambda u: u * lr_multiplier, updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def muon(lr, ns_steps=5, ns_dtype=jnp.bfloat16):
    """nanochat's Muon: momentum, Newton–Schulz, the aspect scale (see the header), then −lr."""
    scale_by_aspect = optax.stateless(lambda updates, _: jax.tree.map(
        lambda g: g * max(1.0, g.shape[1] / g.shape[0]) ** 0.5, updates))
    return optax.chain(nesterov_momentum(), orthogonalize_stacked(ns_steps, ns_dtype), scale_by_aspect,
                       optax.scale(-lr))


def param_labels(params):
    """'embedding' | 'lm_head' | 'matrix' for every parameter, from the top of its path in the GPT state."""
    group = {"wte": "embedding", "lm_head": "lm_head", "h": "matrix"}
    label = lambda path, _: group[str(getattr(path[0], "key", path[0]))]
    return jax.tree_util.tree_map_with_path(label, params, is_leaf=lambda x: hasattr(x, "get_metadata"))


@functools.cache  # same arguments -> same object, so the jitted step (tx is static) is not recompiled
def build_optimizer(model_dim, config: OptimConfig = OptimConfig()):
    """The whole optimizer; call `tx.update(grads, state, params, lr_multiplier=..., muon_momentum=...)`.
    Optimizer state is fp32 whatever the compute dtype; Newton–Schulz runs in config.ns_dtype."""
    adam_scale = (model_dim / 768) ** -0.5
    adamw = lambda lr: optax.adamw(lr * adam_scale, *config.adam_betas, eps=config.adam_eps,
                                   weight_decay=config.weight_decay)
    groups = optax.partition({"embedding": adamw(config.embedding_lr),
                              "lm_head": adamw(config.unembedding_lr),
                              "matrix": muon(config.matrix_lr, config.ns_steps, jnp.dtype(config.ns_dtype))},
                             param_labels)
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    return optax.chain(clip, groups, scale_by_lr_multiplier())


# ---------------------------------------------------------------------------------------------------------------
# Schedules (host-side floats; pass them through `hyperparams`).

def get_lr_multiplier(it, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """nanochat base_train: linear warmup, flat, then linear warmdown over the last `warmdown_ratio` to
    `final_lr_frac`."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(it):
    """0.85 -> 0.95 linearly over the first 300 steps."""
    frac = min(it / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def hyperparams(lr_multiplier=1.0, muon_momentum=0.95):
    """The per-step traced scalars, always float32 arrays so the jitted step sees one signature."""
    return {"lr_multiplier": np.float32(lr_multiplier), "muon_momentum": np.float32(muon_momentum)}

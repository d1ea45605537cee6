"""nanochat's optimizers from Optax parts, and their schedules: October 2025's (the default) and 2026's (`MuonAdamW`).

October 2025 (`OptimConfig()`). Groups: Muon for every 2-D block matrix (`h.*`), AdamW for `wte` (embedding_lr)
and `lm_head` (unembedding_lr), both AdamW LRs × (model_dim/768)^−0.5, betas (0.8, 0.95), eps 1e-10. The LR
multiplier, Muon momentum and (2026) Muon weight decay are *extra args* of `tx.update` (traced scalars: changing them
never recompiles; `hyperparams`).

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

2026 (`OptimConfig.recipe("2026")`), each change a field, so any one can be turned off:
- Muon: momentum, MuonEq (`muon_eq`: each of torch's rows, an output unit = a column of our kernel, scaled to the
  mean row norm), Polar Express (`orthogonalizer`: five coefficient triples, X/(‖X‖·1.01 + 1e-6)), Muon+
  (`muon_plus`: ‖X‖_F snapped to √min(m, n)), NorMuon (`normuon_beta2`: an EMA of the mean square per row of torch's
  weight when rows ≥ cols, else per column, dividing the update, its norm kept), cautious weight decay
  (`cautious_weight_decay`: wd·p added where g·p ≥ 0; wd is the extra arg `muon_weight_decay`), then
  −lr·√max(1, rows/cols), which the decay shares. MuonEq runs on each matrix in its own sharding (fp32), the
  orthogonaliser in the stacks, Muon+, NorMuon and the decay on each matrix again: NorMuon's state is kept per
  matrix, in its layout with the reduced axis of size 1, sharded as the matrix's other axis.
- AdamW (`adamw_groups="2026"`): six groups with their own LRs, betas and weight decays (`ADAMW_GROUPS`); every LR
  but the smear group's × `batch_lr_scale` (√(B/2¹⁹)); no gradient clipping.
Orientation: torch's weight is (out, in), our kernel (in, out): torch's rows are our axis 1, its columns axis 0.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxchat import sharding

NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025) for 5 iterations, as nanochat: one (a, b, c) per iteration
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
B_REF = 2**19  # nanochat's reference batch (tokens) for LR and weight-decay scaling


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0  # the 2025 AdamW groups' (2026: per group, and Muon's is the extra arg)
    adam_betas: tuple = (0.8, 0.95)
    adam_eps: float = 1e-10
    ns_steps: int = 5
    ns_dtype: str = "bfloat16"  # the orthogonaliser's, as nanochat on GPUs (on CPU it runs fp32)
    grad_clip: float = 1.0  # global-norm clip over all gradients; 0 = off (nanochat OCT base_train: 1.0)
    # 2026 (see the header); the defaults are October's
    orthogonalizer: str = "newton_schulz"  # | "polar_express"
    muon_eq: bool = False
    muon_plus: bool = False
    normuon_beta2: float = 0.0  # 0: no NorMuon
    cautious_weight_decay: bool = False  # Muon's decay, rate `muon_weight_decay` (an extra arg of tx.update)
    adamw_groups: str = "2025"  # a key of ADAMW_GROUPS
    scalar_lr: float = 0.5  # resid / x0 lambdas (2026 groups)
    batch_lr_scale: float = 1.0  # every LR but the smear group's (2026 groups and Muon)

    @classmethod
    def recipe(cls, name, **fields):
        """nanochat's optimizer of `name` ("2025" | "2026"), with `fields` (LRs, ...) set."""
        return cls(**{**RECIPES[name], **fields})


# The optimizer fields of each of nanochat's recipes (October 2025 = the field defaults)
RECIPES = {
    "2025": {},
    "2026": dict(orthogonalizer="polar_express", muon_eq=True, muon_plus=True, normuon_beta2=0.9,
                 cautious_weight_decay=True, adamw_groups="2026", grad_clip=0.0),
}


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


def polar_iteration(g, coeffs, norm_scale, eps, dtype=jnp.float32):
    """X ← a·X + (b·A + c·A²)·X, A = X·Xᵀ, for each (a, b, c) of `coeffs`, from X = g / (‖g‖·norm_scale + eps), on
    the wide orientation (X·Xᵀ the small Gram matrix: nanochat's tall branch, XᵀX, is the same map). Matmul
    inputs in `dtype` with fp32 accumulation and elementwise math; X and the Gram matrices rounded to `dtype`."""
    f32 = lambda t: t.astype(jnp.float32)
    dot = lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32)
    x = g.T if g.shape[0] > g.shape[1] else g
    x = (f32(x) / (jnp.linalg.norm(f32(x)) * norm_scale + eps)).astype(dtype)  # fp32 norm even of a bf16 input
    for a, b, c in coeffs:
        A = dot(x, x.T).astype(dtype)
        B = (b * f32(A) + c * dot(A, A)).astype(dtype)
        x = (a * f32(x) + dot(B, x)).astype(dtype)
    x = x.astype(g.dtype)
    return x.T if g.shape[0] > g.shape[1] else x


def newton_schulz(g, steps=5, dtype=jnp.float32):
    """nanochat's zeropower_via_newtonschulz5 on one matrix: X ≈ U·S'·Vᵀ with S' in ~[0.68, 1.13]."""
    return polar_iteration(g, (NS_COEFFS,) * steps, 1.0, 1e-7, dtype)


def polar_express(g, steps=5, dtype=jnp.float32):
    """nanochat's 2026 Polar Express on one matrix: the first `steps` triples, a 1% margin on the norm."""
    return polar_iteration(g, POLAR_EXPRESS_COEFFS[:steps], 1.01, 1e-6, dtype)


ORTHOGONALIZERS = {"newton_schulz": newton_schulz, "polar_express": polar_express}


def stack_axes(mesh):
    """The mesh axes that split parameters (FSDP's), and every mesh axis with those first. A stack is split over the
    former with one all-to-all inside each replica of the parameters, then over all of them by a local slice;
    asked for both at once, GSPMD gathers the whole stack on every device instead."""
    embed = dict(sharding.RULES)["embed"]  # FSDP: parameters are split over the model-width axis's mesh axes
    fsdp = tuple(a for a in mesh.axis_names if a in ((embed,) if isinstance(embed, str) else embed or ()))
    return fsdp, fsdp + tuple(a for a in mesh.axis_names if a not in fsdp)


def orthogonalize_stacked(ns_steps=5, ns_dtype=jnp.bfloat16, orthogonalizer=newton_schulz):
    """`orthogonalizer` on every matrix of the tree, in stacks of equal wide shape split over the stack axis (see
    the header). Without a mesh: the same stacks, unpadded and unconstrained."""
    orthogonalize = jax.vmap(lambda x: orthogonalizer(x, ns_steps, ns_dtype))

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


def per_matrix(fn):
    """A stateless transformation applying fn to every update matrix."""
    return optax.stateless(lambda updates, _: jax.tree.map(fn, updates))


def equilibrate_rows(g):
    """MuonEq: each of torch's rows (a column of our (in, out) kernel) scaled to the mean row norm ‖g‖_F/√rows."""
    target = jnp.linalg.norm(g) / g.shape[1] ** 0.5
    return g * (target / jnp.maximum(jnp.linalg.norm(g, axis=0, keepdims=True), 1e-6))


def snap_norm(g):
    """Muon+: ‖g‖_F set to √min(m, n), a semi-orthogonal matrix's."""
    return g * (min(g.shape) ** 0.5 / jnp.maximum(jnp.linalg.norm(g), 1e-6))


def normuon_axis(shape):
    """The axis NorMuon averages over: torch's columns (our axis 0) when rows ≥ cols, else its rows (axis 1)."""
    return 0 if shape[1] >= shape[0] else 1


def zeros_reduced(p, axis):
    """Zeros shaped as p with `axis` of size 1; a parameter Variable's logical names follow (that axis unnamed)."""
    zeros = jnp.zeros(tuple(1 if i == axis else n for i, n in enumerate(p.shape)), jnp.float32)
    if not hasattr(p, "get_metadata"):
        return zeros
    names = tuple(p.get_metadata().get("out_sharding") or (None,) * p.ndim)
    return p.replace(zeros, out_sharding=tuple(None if i == axis else n for i, n in enumerate(names)))


class NorMuonState(NamedTuple):
    second_moment: optax.Updates


def normuon(beta2):
    """NorMuon: an EMA (β2) of the update's mean square along `normuon_axis`, the update divided by its root, then
    rescaled to the Frobenius norm it had."""
    decay = 1 - np.float32(beta2)  # fp32, as nanochat's 0-D tensor

    def init(params):
        is_param = lambda x: hasattr(x, "get_metadata")
        return NorMuonState(jax.tree.map(lambda p: zeros_reduced(p, normuon_axis(p.shape)), params,
                                         is_leaf=is_param))

    def scale(g, v):
        axis = normuon_axis(g.shape)
        v_mean = jnp.mean(jnp.square(g), axis=axis, keepdims=True)
        v_norm = jnp.sqrt(jnp.sum(v_mean) * g.shape[axis])
        v = v + decay * (v_mean - v)
        step = jax.lax.rsqrt(jnp.maximum(v, 1e-10))
        v_norm_new = jnp.sqrt(jnp.sum(v_mean * g.shape[axis] * jnp.square(step)))
        return g * (step * (v_norm / jnp.maximum(v_norm_new, 1e-10))), v

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        scaled, second = zip(*map(scale, leaves, treedef.flatten_up_to(state.second_moment))) if leaves else ((), ())
        return treedef.unflatten(scaled), NorMuonState(treedef.unflatten(second))

    return optax.GradientTransformation(init, update)


def cautious_decay():
    """g + wd·p where g and p agree in sign (g·p ≥ 0), wd the extra arg `muon_weight_decay`."""

    def update(updates, state, params, *, muon_weight_decay, **_):
        decay = lambda g, p: g + muon_weight_decay * p * (g * p >= 0)
        return jax.tree.map(decay, updates, params), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def muon(lr, ns_steps=5, ns_dtype=jnp.bfloat16, orthogonalizer="newton_schulz", muon_eq=False, muon_plus=False,
         normuon_beta2=0.0, cautious_weight_decay=False):
    """nanochat's Muon: momentum, [MuonEq], the orthogonaliser, [Muon+], [NorMuon], [cautious decay], the aspect
    scale √max(1, out/in) (see the header), then −lr. The defaults are October's."""
    stages = [(True, nesterov_momentum()), (muon_eq, per_matrix(equilibrate_rows)),
              (True, orthogonalize_stacked(ns_steps, ns_dtype, ORTHOGONALIZERS[orthogonalizer])),
              (muon_plus, per_matrix(snap_norm)), (normuon_beta2 > 0, normuon(normuon_beta2)),
              (cautious_weight_decay, cautious_decay()),
              (True, per_matrix(lambda g: g * max(1.0, g.shape[1] / g.shape[0]) ** 0.5)), (True, optax.scale(-lr))]
    return optax.chain(*(stage for on, stage in stages if on))


# Parameter group of each top-level name of the GPT state (the 2026 ones exist only in 2026 models)
GROUPS = {"h": "matrix", "wte": "embedding", "lm_head": "lm_head", "value_embeds": "value_embeds",
          "resid_lambdas": "resid", "x0_lambdas": "x0", "smear_gate": "smear", "smear_lambda": "smear",
          "backout_lambda": "smear"}


def param_labels(params):
    """The group (GROUPS) of every parameter, from the top of its path in the GPT state."""
    label = lambda path, _: GROUPS[str(getattr(path[0], "key", path[0]))]
    return jax.tree_util.tree_map_with_path(label, params, is_leaf=lambda x: hasattr(x, "get_metadata"))


def adamw_groups_2025(c, model_dim):
    s = (model_dim / 768) ** -0.5
    return {"embedding": (c.embedding_lr * s, c.adam_betas, c.weight_decay),
            "lm_head": (c.unembedding_lr * s, c.adam_betas, c.weight_decay)}


def adamw_groups_2026(c, model_dim):
    """nanochat's setup_optimizer (lr, betas, weight decay); embedding and unembedding LRs × (d/768)^−½, every LR
    but the smear group's (smear gate, smear and backout lambdas) × batch_lr_scale."""
    s = (model_dim / 768) ** -0.5
    embedding_lr, scalar_lr = c.embedding_lr * c.batch_lr_scale, c.scalar_lr * c.batch_lr_scale
    return {"lm_head": (c.unembedding_lr * c.batch_lr_scale * s, (0.8, 0.96), 0.01),
            "embedding": (embedding_lr * s, (0.8, 0.995), 0.001),
            "value_embeds": (embedding_lr * s * 0.5, (0.8, 0.995), 0.01),
            "resid": (scalar_lr * 0.01, (0.8, 0.95), 0.05),
            "x0": (scalar_lr, (0.96, 0.95), 0.0),
            "smear": (0.2, (0.8, 0.95), 0.0)}


ADAMW_GROUPS = {"2025": adamw_groups_2025, "2026": adamw_groups_2026}


@functools.cache  # same arguments -> same object, so the jitted step (tx is static) is not recompiled
def build_optimizer(model_dim, config: OptimConfig = OptimConfig()):
    """The whole optimizer; call `tx.update(grads, state, params, **hyperparams(...))`.
    Optimizer state is fp32 whatever the compute dtype; the orthogonaliser runs in config.ns_dtype."""
    adamw = {name: optax.adamw(lr, *betas, eps=config.adam_eps, weight_decay=wd)
             for name, (lr, betas, wd) in ADAMW_GROUPS[config.adamw_groups](config, model_dim).items()}
    matrix = muon(config.matrix_lr * config.batch_lr_scale, config.ns_steps, jnp.dtype(config.ns_dtype),
                  config.orthogonalizer, config.muon_eq, config.muon_plus, config.normuon_beta2,
                  config.cautious_weight_decay)
    groups = optax.partition({**adamw, "matrix": matrix}, param_labels)
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    return optax.chain(clip, groups, scale_by_lr_multiplier())


# ---------------------------------------------------------------------------------------------------------------
# Schedules (host-side floats; pass them through `hyperparams`).

def get_lr_multiplier(it, num_iterations, warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """nanochat base_train: linear warmup over `warmup_steps`, flat, then linear warmdown over the last
    `warmdown_ratio` of the run to `final_lr_frac`."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(it, ramp_steps=300, peak=0.95, final=None, num_iterations=None, warmdown_ratio=0.0):
    """0.85 -> `peak` linearly over the first `ramp_steps`; with `final` (2026), after the ramp, from the LR
    warmdown's start linearly to `final` at the end of the run (a warmdown that starts within the ramp leaves
    the ramp alone, as nanochat). MUON_MOMENTUM holds each recipe's."""
    frac = min(it / ramp_steps, 1.0)
    momentum = (1 - frac) * 0.85 + frac * peak
    if final is None or it < ramp_steps:
        return momentum
    warmdown_iters = round(warmdown_ratio * num_iterations)
    start = num_iterations - warmdown_iters
    if it < start:
        return momentum
    progress = (it - start) / warmdown_iters
    return peak * (1 - progress) + final * progress


MUON_MOMENTUM = {"2025": dict(ramp_steps=300, peak=0.95), "2026": dict(ramp_steps=400, peak=0.97, final=0.90)}


def get_muon_weight_decay(it, num_iterations, weight_decay):
    """2026: Muon's (cautious) weight decay, cosine from `weight_decay` to 0 over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


def batch_lr_scale(total_batch_size):
    """2026: every LR × √(B/B_REF) (AdamW's square-root rule, used for Muon too)."""
    return (total_batch_size / B_REF) ** 0.5


def scaled_weight_decay(weight_decay, total_batch_size, target_tokens, reference_tokens):
    """2026: Muon's weight decay keeping B/(η·λ·D) constant under the √B LR rule: λ·√(B/B_REF)·(D_REF/D), with D
    the run's target tokens (its data:param ratio × scaling parameters) and D_REF the reference model's (d12)."""
    return weight_decay * math.sqrt(total_batch_size / B_REF) * (reference_tokens / target_tokens)


def hyperparams(lr_multiplier=1.0, muon_momentum=0.95, muon_weight_decay=0.0):
    """The per-step traced scalars, always float32 arrays so the jitted step sees one signature."""
    return {"lr_multiplier": np.float32(lr_multiplier), "muon_momentum": np.float32(muon_momentum),
            "muon_weight_decay": np.float32(muon_weight_decay)}

"""The GPT's operations with hand-written backward passes, and the plain RMSNorm and RoPE they are built from.

Each keeps for the backward pass only 16-bit tensors the model holds anyway, and recomputes the rest:
- `linear`: an autocast-style matmul (inputs cast to the compute dtype, fp32 accumulation) whose backward also
  accumulates in fp32 and returns gradients in the inputs' dtypes.
- `norm_to` (a block's pre-norm) and `rope_qk_norm` (RoPE then QK-norm) keep their 16-bit output y and the inverse
  RMS r, not their fp32 input: y is what the next matmul or the attention keeps anyway, and with y = x·r,
  dx = r·(dy − y·mean(y·dy)). So the fp32 residual stream is never saved, and neither are pre-RoPE q and k.
- `relu2_proj` (the MLP's ReLU² and output projection) keeps only its input and recomputes ReLU², 4·d wide.
"""

from functools import partial

import jax
import jax.numpy as jnp

from jaxchat import sharding
from jaxchat.fp8 import linear as fp8_linear

NORM_EPS = float(jnp.finfo(jnp.float32).eps)  # every RMSNorm's: torch's F.rms_norm(eps=None) on fp32, as nanochat


def norm(x):
    """Parameter-free RMSNorm with eps NORM_EPS."""
    return _norm_and_scale(x)[0]


def apply_rotary(x, cos, sin):
    """nanochat's rotate-half pairing on the two halves (x1, x2) -> (x1·cos + x2·sin, x2·cos − x1·sin), written
    as x·cos + roll(x, half)·sin: one fused elementwise pass, no split and concatenate. The tables come from
    `model.rotary`."""
    return x * cos + jnp.roll(x, x.shape[-1] // 2, axis=-1) * sin


def _norm_and_scale(x):
    """(norm(x), the inverse RMS r)."""
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + NORM_EPS)
    return x * r, r


def _norm_grad(y, r, dy, scale=1.0):
    """dx of y = scale·norm(x), from y and r: with ŷ = y/scale, dx = r·scale·(dy − ŷ·mean(ŷ·dy))."""
    y, dy = y.astype(jnp.float32), dy.astype(jnp.float32)
    return r * scale * (dy - y * jnp.mean(y * dy, axis=-1, keepdims=True) / scale**2)


def linear(x, w, dtype, w_axes=None):
    """x (B, T, in) @ w (in, out): inputs cast to `dtype`, fp32 accumulation, result in `dtype` (autocast-style).
    The backward keeps the cast inputs and accumulates in fp32 too (autodiff of a bf16 matmul gives bf16-output
    matmuls, slow on CPU); gradients come back in the inputs' dtypes. `w_axes`: the kernel's logical names, to
    cast it where it is stored: under FSDP the all-gather then moves 16-bit weights, while the gradient's
    reduce-scatter stays fp32. A kernel already in `dtype` (decoding casts them once) keeps the sharding it has:
    pinned to its FSDP split, a kernel the server replicated would be all-gathered again for every token."""
    dtype = jnp.dtype(dtype)
    return _linear(x, w, dtype, x.dtype, w_axes if w.dtype != dtype else None)


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
    if dtype == jnp.float32:  # XLA:CPU then transposes g, not the wider x
        gt_x = jnp.dot(g.reshape(-1, g.shape[-1]).T, x.reshape(-1, x.shape[-1]), preferred_element_type=jnp.float32)
        return dx, jax.lax.optimization_barrier(gt_x).T
    return dx, jnp.einsum("bto,bti->io", g, x, preferred_element_type=jnp.float32)  # the fast form in bf16


_linear.defvjp(_linear_fwd, _linear_bwd)


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


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def rope_qk_norm(x, cos, sin, scale=1.0):
    """RoPE, then QK-norm, then times `scale`, computed in fp32; the result in x's dtype."""
    return _rope_qk_norm_fwd(x, cos, sin, scale)[0]


def _rope_qk_norm_fwd(x, cos, sin, scale):
    y, r = _norm_and_scale(apply_rotary(x.astype(jnp.float32), cos, sin))
    y = (y * scale).astype(x.dtype)
    return y, (y, r, cos, sin)


def _rope_qk_norm_bwd(scale, res, dy):
    y, r, cos, sin = res
    # the rotation is orthogonal: its transpose rotates by −θ (sin negated)
    dx = apply_rotary(_norm_grad(y, r, dy, scale), cos, -sin).astype(y.dtype)
    return dx, jnp.zeros_like(cos), jnp.zeros_like(sin)


rope_qk_norm.defvjp(_rope_qk_norm_fwd, _rope_qk_norm_bwd)


@partial(jax.checkpoint, static_argnums=(2, 3, 4))  # keep only h: relu²(h), 4·d wide, is recomputed for the backward
def relu2_proj(h, kernel, dtype, axes, fp8=False):
    """linear(relu(h)², kernel): the MLP's activation and output projection (in fp8 with `fp8`: fp8.linear)."""
    return (fp8_linear if fp8 else linear)(jnp.square(jax.nn.relu(h)), kernel, dtype, axes)

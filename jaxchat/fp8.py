"""fp8 training matmuls (nanochat's --fp8): tensorwise dynamic scaling.

Each operand of a matmul is quantised with one scale for the whole tensor: scale = fp8_max / amax maps its largest
magnitude onto the format's largest value, the scaled values are clipped (fp8 casts would otherwise overflow to
NaN) and rounded to fp8. The matmul multiplies the fp8 values with fp32 accumulation, and its result times the two
inverse scales is the product of the original operands, up to the rounding. Activations and weights use
float8_e4m3fn (3 mantissa bits, ±448), gradients float8_e5m2 (2 mantissa bits, ±57344: range for their spread).

`linear` is a layer's three matmuls in fp8: forward x·W (e4m3 × e4m3), backward dx = g·Wᵀ and dW = xᵀ·g with the
output gradient g in e5m2. Its backward keeps x (in the compute dtype), the weight and their two scales, and
quantises them again: the same scales give the same fp8 values. (nanochat keeps the fp8 copies; here x is what the
layer before keeps anyway, a norm's or the attention's output, so an fp8 copy would add bytes in every layer.)

The dots take the fp8 arrays themselves and the scales multiply their fp32 results: XLA:GPU (Hopper and newer)
then runs them as fp8 tensor-core GEMMs, Triton GEMM fusions with fp8 operands or cuBLASLt's fp8 GEMM
(`__cublas$lt$matmul$f8`). Written as dequantise-then-dot instead, XLA widens the operands before a bf16 GEMM.
Elsewhere (CPU) the fp8 values are widened exactly and the dot runs in fp32: the same numbers.
"""

from functools import partial

import jax
import jax.numpy as jnp

from jaxchat import sharding

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
AMAX_FLOOR = 1e-12  # an all-zero tensor gets a finite scale, and quantises to zeros


def eligible(d_in, d_out):
    """nanochat's filter: the fp8 GEMMs want dims in multiples of 16, and smaller matmuls gain nothing."""
    return d_in % 16 == 0 and d_out % 16 == 0 and min(d_in, d_out) >= 128


def scale_of(x, fp8_dtype):
    """fp8_max / max(amax, floor), amax = max |x| over the whole tensor, in fp32."""
    return float(jnp.finfo(fp8_dtype).max) / jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32))), AMAX_FLOOR)


def quantize(x, fp8_dtype, scale=None):
    """(q, inverse scale): q = clip(x·scale, ±fp8_max) in `fp8_dtype`, in fp32 arithmetic; scale: scale_of(x)."""
    scale = scale_of(x, fp8_dtype) if scale is None else scale
    fp8_max = float(jnp.finfo(fp8_dtype).max)
    return jnp.clip(x.astype(jnp.float32) * scale, -fp8_max, fp8_max).astype(fp8_dtype), 1.0 / scale


def matmul(spec, a, b):
    """The einsum `spec` of two operands (values, inverse scale) in fp32: the values' dot, then the scales. The
    values are fp8 from `quantize`, or arrays of the compute dtype with scale 1 (the same code without fp8)."""
    return jnp.einsum(spec, a[0], b[0], preferred_element_type=jnp.float32) * (a[1] * b[1])


def linear(x, w, dtype, w_axes=None):
    """x (B, T, in) @ w (in, out) with fp8 operands: x cast to `dtype` (the compute dtype, bf16) and w quantised
    from its fp32 values, result in `dtype`; dx comes back in x's dtype, dw in fp32. `w_axes`: the kernel's logical
    names, to quantise it where it is stored: under FSDP the all-gather then moves 8-bit weights."""
    return _linear(x, w, jnp.dtype(dtype), x.dtype, w_axes)


def _operands(x, x_scale, w, w_scale, w_axes):
    (xq, x_inv), (wq, w_inv) = quantize(x, E4M3, x_scale), quantize(w, E4M3, w_scale)
    return (xq, x_inv), (wq if w_axes is None else sharding.constrain(wq, w_axes), w_inv)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _linear(x, w, dtype, x_dtype, w_axes):
    return _linear_fwd(x, w, dtype, x_dtype, w_axes)[0]


def _linear_fwd(x, w, dtype, x_dtype, w_axes):
    # The barriers keep XLA to the bytes the backward is meant to keep: here, quantise x itself (XLA:GPU, allowed
    # excess precision, would read the fp32 value x was rounded from, and keep that); in the backward, quantise
    # again (XLA would merge the two quantisations and keep the forward's fp8 copy beside x).
    x = jax.lax.optimization_barrier(x.astype(dtype))
    x_scale, w_scale = scale_of(x, E4M3), scale_of(w, E4M3)
    y = matmul("bti,io->bto", *_operands(x, x_scale, w, w_scale, w_axes)).astype(dtype)
    return y, (x, x_scale, w, w_scale)


def _linear_bwd(dtype, x_dtype, w_axes, res, g):
    xq, wq = _operands(*jax.lax.optimization_barrier(res), w_axes)
    gq = quantize(g, E5M2)
    return matmul("bto,io->bti", gq, wq).astype(x_dtype), matmul("bti,bto->io", xq, gq)


_linear.defvjp(_linear_fwd, _linear_bwd)

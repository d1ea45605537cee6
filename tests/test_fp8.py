"""fp8 training (--fp8): the quantisation bit for bit against ml_dtypes, the fp8 matmuls against a
quantise/dequantise reference in float64, the model with fp8 against bf16, nanochat's layer filter, evaluations
without fp8, and the fp8 GEMMs of a program compiled for an H100."""
import dataclasses
import importlib.util
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from _harness import run_python
from jaxchat import aot, fp8
from jaxchat.losses import softcap_cross_entropy_sum
from jaxchat.model import GPT, GPTConfig, Linear
from jaxchat.train import TrainState

HAS_CUDA_COMPILER = importlib.util.find_spec("jax_cuda12_plugin") is not None
FORMATS = [(fp8.E4M3, ml_dtypes.float8_e4m3fn), (fp8.E5M2, ml_dtypes.float8_e5m2)]
# two layers, 128 wide: c_k and c_v (128 -> 64, one KV head) are too small for fp8, every other matmul takes it
SMALL = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=1, n_embd=128,
                  compute_dtype="bfloat16")


def reference_quantize(x, fp8_dtype):
    """nanochat's _to_fp8 in numpy: (fp8 array, inverse scale), all arithmetic in float32."""
    fp8_max = np.float32(ml_dtypes.finfo(fp8_dtype).max)
    x = np.asarray(x, np.float32)
    scale = fp8_max / np.maximum(np.abs(x).max(), np.float32(fp8.AMAX_FLOOR))
    return np.clip(x * scale, -fp8_max, fp8_max).astype(fp8_dtype), np.float32(1) / scale


def dequantize(q, inv_scale):
    return np.asarray(q, np.float64) * np.float64(inv_scale)


def spread(shape, seed):
    """Values over ~8 decades of magnitude, both signs: many round, some underflow to fp8's subnormals or 0."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 2, shape)).astype(np.float32)


@pytest.mark.parametrize("jax_dtype, np_dtype", FORMATS)
@pytest.mark.parametrize("input_dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_is_nanochats_bit_for_bit(jax_dtype, np_dtype, input_dtype):
    x = jnp.asarray(spread((64, 96), 0), input_dtype)
    q, inv = jax.jit(fp8.quantize, static_argnums=1)(x, jax_dtype)
    want_q, want_inv = reference_quantize(np.asarray(x.astype(jnp.float32)), np_dtype)
    assert q.dtype == jax_dtype and inv.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), want_q.view(np.uint8))
    assert np.float32(inv) == want_inv


@pytest.mark.parametrize("jax_dtype, np_dtype", FORMATS)
def test_quantize_saturates_at_the_format_max_and_zeros_stay_zeros(jax_dtype, np_dtype):
    fp8_max = float(ml_dtypes.finfo(np_dtype).max)  # 448 (e4m3fn), 57344 (e5m2)
    x = jnp.asarray([3e38, -3e38, 1.0, -1e-30, 0.0], jnp.float32)  # amax near fp32's largest
    q, inv = fp8.quantize(x, jax_dtype)
    assert np.asarray(q, np.float32).tolist() == [fp8_max, -fp8_max, 0.0, -0.0, 0.0]
    assert np.isfinite(float(inv))
    q, inv = fp8.quantize(jnp.zeros((4, 4)), jax_dtype)  # amax 0: the floor keeps the scale finite
    assert not np.asarray(q, np.float32).any() and np.isfinite(float(inv)) and float(inv) > 0


def test_fp8_linear_and_its_gradients_match_a_quantise_dequantise_reference():
    """Forward: y = deq(q(x)) @ deq(q(W)) (e4m3), in bf16. Backward with g = q(dy) in e5m2: dx = deq(g) @
    deq(q(W))ᵀ (bf16), dW = deq(q(x))ᵀ @ deq(g) (fp32). The products of fp8 values are exact in fp32, so what
    differs from the float64 reference is fp32 accumulation and the final rounding: y and dx within one bf16
    rounding (relative 2⁻⁸) of the reference's magnitude, dW within 1e-5 of its largest entry."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 40, 128)), jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((128, 144)) * 0.05, jnp.float32)
    dy = jnp.asarray(np.random.default_rng(2).standard_normal((3, 40, 144)), jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, w: fp8.linear(x, w, jnp.bfloat16), x, w)
    dx, dw = vjp(dy)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)

    xq, wq = reference_quantize(np.asarray(x, np.float32), ml_dtypes.float8_e4m3fn), \
        reference_quantize(np.asarray(w), ml_dtypes.float8_e4m3fn)
    gq = reference_quantize(np.asarray(dy, np.float32), ml_dtypes.float8_e5m2)
    want_y = np.einsum("bti,io->bto", dequantize(*xq), dequantize(*wq))
    want_dx = np.einsum("bto,io->bti", dequantize(*gq), dequantize(*wq))
    want_dw = np.einsum("bti,bto->io", dequantize(*xq), dequantize(*gq))
    for got, want in ((y, want_y), (dx, want_dx)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, rtol=0, atol=1e-5 * np.abs(want_dw).max())
    # and fp8 is what it computed: the bf16 matmul of the same inputs differs by far more than that
    assert np.abs(np.asarray(x @ w.astype(jnp.bfloat16), np.float64) - want_y).max() > 1e-3 * np.abs(want_y).max()


def test_fp8_linear_of_zeros_is_zeros():
    x, w = jnp.zeros((2, 4, 128), jnp.bfloat16), jnp.zeros((128, 128))
    y, vjp = jax.vjp(lambda x, w: fp8.linear(x, w, jnp.bfloat16), x, w)
    dx, dw = vjp(jnp.ones_like(y))
    for a in (y, dx, dw):
        assert np.all(np.asarray(a, np.float32) == 0)


def test_fp8_head_matches_a_reference_with_per_chunk_gradient_scales():
    """The fused head with fp8: x and W quantised once (e4m3), each chunk's logits gradient with its own scale
    (e5m2). On CPU 2 × 512 positions run as two chunks of 256. Loss within 1e-5 relative; dx and dW within 1e-4 of
    their largest entries (fp32 vs the float64 reference: rare elements may round to a neighbouring fp8 value)."""
    rng = np.random.default_rng(0)
    B, T, D, V, softcap = 2, 512, 128, 256, 15.0
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, V)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(-1, V, (B, T)), jnp.int32)  # some −1: unsupervised
    loss, (dx, dw) = jax.value_and_grad(
        lambda x, w: softcap_cross_entropy_sum(x, w, targets, softcap, jnp.bfloat16, fp8=True), argnums=(0, 1))(x, w)

    xq, wq = reference_quantize(np.asarray(x), ml_dtypes.float8_e4m3fn), \
        reference_quantize(np.asarray(w), ml_dtypes.float8_e4m3fn)
    xd, wd, t = dequantize(*xq), dequantize(*wq), np.asarray(targets)
    want_loss, want_dx, want_dw = 0.0, np.zeros((B, T, D)), np.zeros((D, V))
    for chunk in (slice(0, 256), slice(256, 512)):
        tanh = np.tanh(xd[:, chunk] @ wd / softcap)
        z = softcap * tanh
        lse = np.log(np.exp(z).sum(-1))
        valid, safe = t[:, chunk] != -1, np.maximum(t[:, chunk], 0)
        want_loss += np.where(valid, lse - np.take_along_axis(z, safe[..., None], -1)[..., 0], 0).sum()
        dz = np.exp(z - lse[..., None]) - np.eye(V)[safe]
        gq = reference_quantize(np.where(valid[..., None], dz, 0) * (1 - tanh**2), ml_dtypes.float8_e5m2)
        want_dx[:, chunk] = dequantize(*gq) @ wd.T
        want_dw += np.einsum("bcd,bcv->dv", xd[:, chunk], dequantize(*gq))
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    for got, want in ((dx, want_dx), (dw, want_dw)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_the_filter_takes_nanochats_layers():
    """nanochat's filter: both dims multiples of 16 and the smaller ≥ 128. Here c_k and c_v map 128 -> 64 and
    the vocabulary (500) is no multiple of 16: only c_q, c_proj and the MLP's two take fp8 (with 512, the head too)."""
    config = GPTConfig(sequence_len=64, vocab_size=500, n_layer=2, n_head=2, n_kv_head=1, n_embd=128,
                       compute_dtype="bfloat16", fp8=True)
    def fp8_layers(config):
        model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
        return {"/".join(map(str, path)) for path, m in nnx.iter_graph(model) if isinstance(m, Linear) and m.fp8}

    blocks = {f"h/{i}/{layer}" for i in (0, 1) for layer in ("attn/c_q", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")}
    assert fp8_layers(config) == blocks
    assert fp8_layers(dataclasses.replace(config, vocab_size=512)) == blocks | {"lm_head"}  # the head too, as nanochat
    assert fp8_layers(config.with_execution(fp8=False)) == set()


def randomized(config, seed=0, scale=0.1):
    """A GPT of `config` with every parameter random (c_proj and lm_head start at zero)."""
    model = GPT(config, rngs=nnx.Rngs(0))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape)
                                                  for k, x in zip(keys, leaves)]))
    return model


def loss_and_grads(model, idx):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: nnx.merge(graphdef, p, rest).loss(idx, jnp.roll(idx, -1, 1))
    loss, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(loss), [np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads)]


def cosine(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


@pytest.mark.slow
def test_model_loss_and_gradients_with_fp8_are_close_to_bf16():
    """One step's loss and gradients, fp8 vs bf16 (same weights). Rounding to e4m3 (3 mantissa bits) errs by
    ~2.5% RMS per element and to e5m2 (2 bits) by ~5%, against ~0.2% for bf16. The loss averages over many tokens,
    so it moves by far less (< 2e-3 relative). A gradient passes several quantised matmuls on its way back, each
    adding a few % of noise, so a cosine of 1 − (0.1)²/2 ≈ 0.995 is what 8-bit gradients give: ≥ 0.99 over all
    parameters, ≥ 0.975 for each (the attention's q and k gradients, small differences of large terms, are the
    noisiest). A bug in the scaling (a missing or inverted scale) would be off by orders of magnitude."""
    idx = jax.random.randint(jax.random.key(0), (4, 64), 0, SMALL.vocab_size)
    bf16_loss, bf16_grads = loss_and_grads(randomized(SMALL), idx)
    fp8_loss, fp8_grads = loss_and_grads(randomized(SMALL.with_execution(fp8=True)), idx)
    assert abs(fp8_loss - bf16_loss) < 2e-3 * bf16_loss and fp8_loss != bf16_loss
    assert min(cosine(a, b) for a, b in zip(bf16_grads, fp8_grads)) >= 0.975
    assert cosine(np.concatenate(bf16_grads), np.concatenate(fp8_grads)) >= 0.99


@pytest.mark.slow
def test_evaluation_model_is_the_same_weights_without_fp8():
    """What the stages evaluate, sample from and save the config of (TrainingRun.model): the state's parameters
    under fp8=False, so its loss is the bf16 model's exactly."""
    model = randomized(SMALL.with_execution(fp8=True))
    state = TrainState.create(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param))
    evaluated = state.eval_model
    assert evaluated.config == SMALL and not evaluated.lm_head.fp8
    assert all(a is b for a, b in zip(jax.tree.leaves(nnx.state(evaluated, nnx.Param)), jax.tree.leaves(state.params)))
    idx = jax.random.randint(jax.random.key(0), (2, 64), 0, SMALL.vocab_size)
    assert float(evaluated.loss(idx, idx)) == float(randomized(SMALL).loss(idx, idx))
    assert float(state.model.loss(idx, idx)) != float(evaluated.loss(idx, idx))


def test_fp8_needs_bf16_compute():
    with pytest.raises(ValueError, match="fp8 needs compute_dtype 'bfloat16'"):
        GPTConfig(fp8=True)
    out = run_python(["-m", "jaxchat.memory", "--config=tiny", "--devices=2", "--stages=base_train", "--fp8=1"])
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        "error: --fp8=1 needs --dtype=bfloat16 (fp8 matmuls take bf16 activations), not --dtype=float32"], out.stderr


GEMM_FUSIONS = """HloModule m

%fp8_gemm (p0: f8e4m3fn[32,128], p1: f8e5m2[64,128], s: f32[]) -> bf16[32,64] {
  %p0 = f8e4m3fn[32,128]{1,0} parameter(0)
  %p1 = f8e5m2[64,128]{1,0} parameter(1)
  %t = f8e5m2[128,64]{1,0} transpose(%p1), dimensions={1,0}
  %dot.1 = f32[32,64]{1,0} dot(%p0, %t), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %c = bf16[32,64]{1,0} convert(%dot.1)
}

%bf16_gemm (p0: bf16[32,128], p1: bf16[128,64]) -> f32[32,64] {
  %p0 = bf16[32,128]{1,0} parameter(0)
  %p1 = bf16[128,64]{1,0} parameter(1)
  ROOT %dot.2 = f32[32,64]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f8e4m3fn[32,128], b: f8e5m2[64,128], c: bf16[32,128], d: bf16[128,64]) -> f32[32,64] {
  %a = f8e4m3fn[32,128]{1,0} parameter(0)
  %b = f8e5m2[64,128]{1,0} parameter(1)
  %c = bf16[32,128]{1,0} parameter(2)
  %d = bf16[128,64]{1,0} parameter(3)
  %f = bf16[32,64]{1,0} fusion(%a, %b), kind=kCustom, calls=%fp8_gemm, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  ROOT %g = f32[32,64]{1,0} fusion(%c, %d), kind=kCustom, calls=%bf16_gemm, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
}
"""


def test_program_stats_mark_gemm_fusions_with_fp8_operands():
    assert aot.program_stats(GEMM_FUSIONS)["gemm_fusions"] == {"__triton_nested_gemm_fusion (fp8)": 1,
                                                               "__triton_nested_gemm_fusion": 1}


def fp8_gemms(stdout):
    """fp8 GEMMs per step in `jaxchat.memory`'s report: Triton GEMM fusions with fp8 operands and cuBLASLt fp8 calls."""
    counts = re.findall(r"(\d+) × (__\w+ \(fp8\)|__cublas\$lt\$matmul\$f8)", stdout)
    return sum(int(n) for n, _ in counts)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA_COMPILER, reason="XLA's CUDA compiler is not installed (pip install 'jaxchat[gpu]')")
def test_h100_program_runs_the_matmuls_as_fp8_gemms():
    """tiny (4 layers, 256 wide, vocabulary 4096) on 8 H100s: all 6 matmuls of each block and the head take fp8,
    3 GEMMs each (forward, dx, dW); the head's run once per chunk (128 rows × 256 positions in 4 chunks of 64)."""
    tiny = ["-m", "jaxchat.memory", "--config=tiny", "--total_batch_size=32768", "--stages=base_train",
            "--target=h100", "--dtype=bfloat16"]
    with_fp8 = run_python([*tiny, "--fp8=1"])
    assert with_fp8.returncode == 0, with_fp8.stderr[-3000:]
    assert fp8_gemms(with_fp8.stdout) == 3 * 6 * 4 + 3 * 4
    assert "fits H100 80GB" in with_fp8.stdout
    without = run_python(tiny)
    assert without.returncode == 0, without.stderr[-3000:]
    assert fp8_gemms(without.stdout) == 0 and "GEMM fusions per step" in without.stdout

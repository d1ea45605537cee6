"""The TPU attention kernel (Splash, attention.splash_attention) without a TPU: its numbers in Pallas's interpreter
against jaxchat's XLA kernel, and programs compiled ahead of time for TPU meshes (needs libtpu, the TPU compiler)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jaxchat import aot, sharding
from jaxchat.attention import causal_attention, splash_attention, splash_problem

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the TPU compiler) is not installed: cannot compile for a TPU")


def qkv(B, T, H, K, D, dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(key, (B, T, h, D), jnp.float32).astype(dtype) for key, h in zip(keys, (H, K, K)))


def values_and_grads(attend, q, k, v):
    """attend(q, k, v) and the gradients (dq, dk, dv) of a fixed random projection of it."""
    w = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * w)
    return attend(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("T, kv_heads, dtype, atol", [
    (320, 2, jnp.bfloat16, 1.5e-2),
    pytest.param(320, 2, jnp.float32, 5e-6, marks=pytest.mark.slow),
    pytest.param(256, 4, jnp.bfloat16, 1.5e-2, marks=pytest.mark.slow),
    pytest.param(256, 4, jnp.float32, 5e-6, marks=pytest.mark.slow),
])
def test_splash_matches_the_xla_kernel(T, kv_heads, dtype, atol):
    """Values and dq, dk, dv of Splash (interpreted, per device under a mesh) match the XLA kernel's, relative to
    the largest entry: GQA and MHA, fp32 and bf16 (the same bf16 matmul inputs, fp32 accumulation); T = 320 is
    padded to 384 and runs in three tiles."""
    q, k, v = qkv(2, T, 4, kv_heads, 64, dtype)
    with jax.set_mesh(sharding.make_mesh((1, 1), devices=jax.devices()[:1])):
        splash = lambda *a: splash_attention(*a, dtype, interpret=True)
        got = jax.jit(lambda *a: values_and_grads(splash, *a))(q, k, v)
    want = jax.jit(lambda *a: values_and_grads(lambda *b: causal_attention(*b, dtype, "xla"), *a))(q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=atol * scale, err_msg=name)


def test_windowed_splash_matches_the_windowed_xla_kernel():
    """A sliding window (W = 100: keys i − 100..i) in Splash is a LocalMask; T = 320 runs in three 128-tiles, the
    first of which the last query tile skips; GQA, fp32."""
    q, k, v = qkv(1, 320, 4, 2, 32, jnp.float32)
    with jax.set_mesh(sharding.make_mesh((1, 1), devices=jax.devices()[:1])):
        splash = lambda *a: splash_attention(*a, jnp.float32, 100, interpret=True)
        got = jax.jit(lambda *a: values_and_grads(splash, *a))(q, k, v)
    want = jax.jit(lambda *a: values_and_grads(lambda *b: causal_attention(*b, jnp.float32, "xla", 100), *a))(q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=5e-6 * float(jnp.max(jnp.abs(b))), err_msg=name)


def test_splash_refuses_without_a_tpu():
    q, k, v = qkv(1, 8, 4, 2, 16, jnp.bfloat16)
    platform = jax.default_backend()
    if platform == "tpu":
        pytest.skip("Splash can run here")
    with pytest.raises(ValueError, match=f"splash attention cannot run: it needs a TPU \\(platform: {platform}\\)"):
        causal_attention(q, k, v, jnp.bfloat16, "splash")


def tpu_mesh(target, devices, shape=(1, -1)):
    return sharding.make_mesh(shape, devices=aot.target_devices(target, devices))


def tpu_kernels(compiled):
    """{kernel name: calls} of the Splash (Pallas TPU) kernels in a compiled program."""
    return {k: n for k, n in aot.analyse(compiled)["custom_calls"].items() if k.startswith("splash")}


SPLASH_CALLS = {"splash_mha_fwd_residuals": 1, "splash_mha_dq_no_residuals": 1, "splash_mha_dkv_no_residuals": 1}


@needs_libtpu
def test_auto_attention_compiles_to_splash_for_a_tpu_mesh():
    """On a TPU mesh "auto" attention is Splash, forward and backward (GQA, T no multiple of 128, bf16 and fp32);
    with a batch that does not split over the devices it falls back to the XLA kernel, and says why."""
    mesh = tpu_mesh("tpu-v5p", 4, (2, 2))
    with jax.set_mesh(mesh):
        def compile_grad(B, dtype):
            loss = lambda q, k, v: jnp.sum(causal_attention(q, k, v, dtype).astype(jnp.float32))
            args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, sharding.batch_spec(4)))
                    for x in jax.eval_shape(lambda: qkv(B, 200, 4, 2, 64, dtype))]
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()

        assert tpu_kernels(compile_grad(8, jnp.bfloat16)) == SPLASH_CALLS
        assert tpu_kernels(compile_grad(8, jnp.float32)) == SPLASH_CALLS
        q, k, _ = jax.eval_shape(lambda: qkv(6, 8, 4, 2, 16, jnp.bfloat16))
        assert splash_problem(q, k, jnp.bfloat16) == "batch 6 does not split over 4 devices"


@needs_libtpu
def test_windowed_attention_compiles_to_splash_for_a_tpu_mesh():
    """A sliding window on a TPU mesh is Splash too (its LocalMask), forward and backward."""
    mesh = tpu_mesh("tpu-v5p", 4, (2, 2))
    with jax.set_mesh(mesh):
        loss = lambda q, k, v: jnp.sum(causal_attention(q, k, v, jnp.bfloat16, "auto", 128).astype(jnp.float32))
        args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, sharding.batch_spec(4)))
                for x in jax.eval_shape(lambda: qkv(8, 512, 4, 2, 64, jnp.bfloat16))]
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    assert tpu_kernels(compiled) == SPLASH_CALLS


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("target, devices", [("tpu-v5p", 4), ("tpu-v6e", 8)])
def test_tiny_train_step_compiles_with_splash_for_tpus(target, devices):
    """The tiny config's train step (bf16, 16 rows per device) compiled for a TPU slice runs Splash in every layer,
    forward and backward: the program a TPU run of it would use."""
    from jaxchat.memory import compile_train_step
    from jaxchat.model import config_for_depth
    from jaxchat.optim import OptimConfig

    config = config_for_depth(4, 4096, 256, head_dim=64, compute_dtype="bfloat16")
    compiled, _, compile_s = compile_train_step(config, OptimConfig(), (1, 16 * devices, config.sequence_len, False),
                                                tpu_mesh(target, devices))
    m = compiled.memory_analysis()
    print(f"{target}: compiled in {compile_s:.0f} s; per device: arguments "
          f"{m.argument_size_in_bytes / 2**20:.1f} MiB, temp {m.temp_size_in_bytes / 2**20:.1f} MiB")
    assert tpu_kernels(compiled) == {name: config.n_layer for name in SPLASH_CALLS}

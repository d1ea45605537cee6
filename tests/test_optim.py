"""nanochat's optimizer: Muon against a plain NumPy reference, singular values, groups and LRs, clipping,
schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxchat.model import GPT, GPTConfig
from jaxchat.optim import (OptimConfig, build_optimizer, get_lr_multiplier, get_muon_momentum, muon, newton_schulz,
                           orthogonalize_stacked, param_labels)


def nanochat_muon_reference(kernels_grads, lr, momenta, steps=5):
    """nanochat/muon.py on torch-layout weights (out, in), in float64 NumPy; returns the (in, out) deltas."""
    a, b, c = 3.4445, -4.7750, 2.0315
    buf, deltas = None, []
    for g, mom in zip(kernels_grads, momenta):
        g = np.asarray(g, np.float64).T  # torch weight layout (out, in)
        buf = np.zeros_like(g) if buf is None else buf
        buf = buf + (1 - mom) * (g - buf)  # buf.lerp_(g, 1 - momentum)
        g = g + mom * (buf - g)  # g.lerp_(buf, momentum)
        x = g.T if g.shape[0] > g.shape[1] else g
        x = x / (np.linalg.norm(x) + 1e-7)
        for _ in range(steps):
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        x = x.T if g.shape[0] > g.shape[1] else x
        deltas.append((-lr * max(1, g.shape[0] / g.shape[1]) ** 0.5 * x).T)
    return deltas


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
@pytest.mark.slow
def test_muon_matches_nanochat_reference(shape):
    """4 steps with changing momentum against the float64 reference. NS in fp32: every entry within 3e-5 of the
    largest (measured ≤ 5e-6). NS in bf16 (the default, as nanochat; 8-bit mantissa): ‖Δ‖/‖ref‖ ≤ 3e-2
    (measured 1.1-1.6%; torch's own bf16 NS is ~3.5% off)."""
    grads = [jax.random.normal(jax.random.key(i), shape) for i in range(4)]
    momenta = [0.85, 0.88, 0.9, 0.95]
    reference = nanochat_muon_reference(grads, 0.02, momenta)
    for ns_dtype in (jnp.float32, jnp.bfloat16):
        tx = muon(0.02, ns_dtype=ns_dtype)
        state = tx.init(grads[0])
        for g, mom, ref in zip(grads, momenta, reference):
            ours, state = jax.jit(tx.update)(g, state, muon_momentum=jnp.float32(mom))
            assert ours.dtype == jnp.float32
            if ns_dtype == jnp.float32:
                np.testing.assert_allclose(ours, ref, atol=3e-5 * np.abs(ref).max())
            else:
                assert np.linalg.norm(ours - ref) <= 3e-2 * np.linalg.norm(ref)


@pytest.mark.slow
def test_muon_aspect_scale_orientation():
    """c_fc-like kernel (in=32, out=128): torch weight (128, 32) -> step × √4 = 2; c_proj-like (128, 32) -> ×1."""
    g = jax.random.normal(jax.random.key(0), (32, 128))
    tx = muon(1.0, ns_dtype=jnp.float32)
    up = tx.update(g, tx.init(g), muon_momentum=0.0)[0]
    down = tx.update(g.T, tx.init(g.T), muon_momentum=0.0)[0]
    np.testing.assert_allclose(up, -2.0 * newton_schulz(g), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(down, -newton_schulz(g.T), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 512)])
@pytest.mark.slow
def test_newton_schulz_singular_values_in_band(shape):
    """NS5 with (3.4445, −4.7750, 2.0315) maps a well-conditioned matrix's singular values into ~[0.68, 1.14]
    (measured: 0.682–1.135 in fp32); not exactly 1 by design (nanochat/muon.py docstring)."""
    g = jax.random.normal(jax.random.key(0), shape)
    for dtype, lo, hi in ((jnp.float32, 0.67, 1.15), (jnp.bfloat16, 0.64, 1.17)):
        s = np.linalg.svd(np.asarray(newton_schulz(g, dtype=dtype)), compute_uv=False)
        assert lo <= s.min() and s.max() <= hi, (dtype, s.min(), s.max())


@pytest.mark.slow
def test_stacked_equals_per_matrix():
    """Stacked Newton–Schulz (three stacks here: 48×48 with a zero matrix, 32×96 with the tall 96×32 ones
    transposed, GQA-like 16×48 with 48×16 transposed) equals newton_schulz per matrix. fp32: within 1e-5 of the
    largest entry (measured 2e-6: only the batching of the matmuls differs). bf16: the stack is cast to bf16 before
    the normalisation (half the traffic), so it is per-matrix NS of the bf16-rounded matrix (≤ 1e-2, measured:
    bitwise under jit) and as close to the fp32 result as per-matrix bf16 NS (≤ 3e-2, measured ≤ 1.7%). The zero
    matrix (what pads a stack to the device count) stays exactly zero."""
    shapes = {"q": (48, 48), "proj": (48, 48), "fc": (32, 96), "down": (96, 32), "down2": (96, 32), "k": (48, 16),
              "v": (48, 16), "kT": (16, 48)}
    tree = {name: jax.random.normal(jax.random.key(i), s) for i, (name, s) in enumerate(shapes.items())}
    tree["zero"] = jnp.zeros((48, 48))
    norm = np.linalg.norm
    per_matrix = lambda f: jax.device_get(jax.jit(lambda t: jax.tree.map(f, t))(tree))
    exact = per_matrix(newton_schulz)
    rounded = per_matrix(lambda g: newton_schulz(g.astype(jnp.bfloat16), 5, jnp.bfloat16))
    for dtype in (jnp.float32, jnp.bfloat16):
        tx = orthogonalize_stacked(5, dtype)
        orthogonalize = lambda t: tx.update(t, tx.init(t))[0]
        assert str(jax.make_jaxpr(orthogonalize)(tree)).count("dot_general") == 3 * 3 * 5  # stacks·matmuls·steps
        stacked = jax.device_get(jax.jit(orthogonalize)(tree))
        for name, got in stacked.items():
            assert got.shape == tree[name].shape and got.dtype == np.float32 and np.isfinite(got).all(), name
            if dtype == jnp.float32:
                atol = 1e-5 * np.abs(exact[name]).max()
                np.testing.assert_allclose(got, exact[name], rtol=0, atol=atol, err_msg=name)
            else:
                assert norm(got - rounded[name]) <= 1e-2 * norm(rounded[name]), name
                assert norm(got - exact[name]) <= 3e-2 * norm(exact[name]), name
        assert not np.asarray(stacked["zero"]).any()


@pytest.mark.slow
def test_stacked_muon_singular_values_in_band():
    """Through the whole Muon (momentum 0, lr 1), every update of a stack (wide with tall transposed, GQA-like,
    square with condition number 5) over its aspect scale has its singular values in NS5's band, as per matrix."""
    def conditioned(key, n=96):  # a random square Gaussian's smallest singular values are ~0: out of NS5's reach
        q1, q2 = (jnp.linalg.qr(jax.random.normal(k, (n, n)))[0] for k in jax.random.split(jax.random.key(key)))
        return (q1 * jnp.linspace(0.2, 1.0, n)) @ q2.T

    tree = {"fc": (64, 256), "down": (256, 64), "fc2": (64, 256), "k": (128, 32), "kT": (32, 128)}
    tree = {name: jax.random.normal(jax.random.key(i), s) for i, (name, s) in enumerate(tree.items())}
    tree.update(q=conditioned(5), proj=conditioned(6))
    for dtype, lo, hi in ((jnp.float32, 0.67, 1.15), (jnp.bfloat16, 0.64, 1.17)):
        tx = muon(1.0, ns_dtype=dtype)
        updates = jax.jit(lambda t: tx.update(t, tx.init(t), muon_momentum=0.0)[0])(tree)
        for name, u in updates.items():
            s = np.linalg.svd(np.asarray(u) / max(1.0, u.shape[1] / u.shape[0]) ** 0.5, compute_uv=False)
            assert lo <= s.min() and s.max() <= hi, (dtype, name, s.min(), s.max())


@pytest.mark.slow
def test_param_groups_and_learning_rates():
    """First step, no clipping: AdamW moves every touched entry by lr·lrm (m̂/√v̂ = ±1 at step 1), with
    wte lr 0.2·s and lm_head lr 0.004·s, s = (d/768)^−½; blocks get Muon updates."""
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    labels = param_labels(params)
    assert labels["wte"] == "embedding" and labels["lm_head"]["kernel"] == "lm_head"
    assert set(jax.tree.leaves(labels["h"])) == {"matrix"}
    tx = build_optimizer(config.n_embd, OptimConfig(grad_clip=0.0, ns_dtype="float32"))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    pure = lambda t: nnx.to_pure_dict(t)
    updates, _ = tx.update(pure(grads), tx.init(pure(params)), pure(params), lr_multiplier=0.5, muon_momentum=0.9)
    s = (32 / 768) ** -0.5
    np.testing.assert_allclose(np.abs(updates["wte"]), 0.5 * 0.2 * s, rtol=1e-5)
    np.testing.assert_allclose(np.abs(updates["lm_head"]["kernel"]), 0.5 * 0.004 * s, rtol=1e-5)
    g_fc = pure(grads)["h"][0]["mlp"]["c_fc"]["kernel"]  # (32, 128): √4 aspect scale
    want = -0.5 * 0.02 * 2.0 * newton_schulz(g_fc)  # step 1: momentum only rescales g; NS is scale-free
    np.testing.assert_allclose(updates["h"][0]["mlp"]["c_fc"]["kernel"], want, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_global_norm_clipping():
    """grad_clip applies to the global norm of all gradients before the groups (nanochat clip_grad_norm_)."""
    params = {"wte": jnp.ones((4, 8)), "lm_head": jnp.ones((8, 4))}
    tx = build_optimizer(768, OptimConfig(grad_clip=1.0))
    ref = optax.adamw(0.2, 0.8, 0.95, eps=1e-10, weight_decay=0.0)
    g1 = {"wte": 30.0 * jnp.ones((4, 8)), "lm_head": jnp.zeros((8, 4))}  # global norm 169.7 -> clipped to 1
    g2 = {"wte": 0.01 * jnp.ones((4, 8)), "lm_head": jnp.zeros((8, 4))}  # norm 0.057: untouched
    s, r = tx.init(params), ref.init(params["wte"])
    for g in (g1, g2):
        u, s = tx.update(g, s, params, lr_multiplier=1.0, muon_momentum=0.95)
        scale = min(1.0, 1.0 / float(optax.tree.norm(g)))
        ur, r = ref.update(g["wte"] * scale, r, params["wte"])
    np.testing.assert_allclose(u["wte"], ur, rtol=1e-5)


def test_lr_multiplier_schedule():
    n = 100
    assert [get_lr_multiplier(i, n) for i in (0, 50, 80)] == [1.0, 1.0, 1.0]
    assert get_lr_multiplier(90, n) == pytest.approx(0.5)
    assert get_lr_multiplier(100, n) == pytest.approx(0.0)
    assert get_lr_multiplier(90, n, final_lr_frac=0.1) == pytest.approx(0.55)
    assert get_lr_multiplier(0, n, warmup_steps=10) == pytest.approx(0.1)
    assert get_lr_multiplier(9, n, warmup_steps=10) == pytest.approx(1.0)


def test_muon_momentum_schedule():
    assert get_muon_momentum(0) == pytest.approx(0.85)
    assert get_muon_momentum(150) == pytest.approx(0.90)
    assert get_muon_momentum(300) == pytest.approx(0.95)
    assert get_muon_momentum(10_000) == pytest.approx(0.95)

"""The GPT: sizes, initial loss, GQA, the fused loss, attention, the KV-cache forward."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat import attention as A
from jaxchat import losses as L
from jaxchat import custom_grads as G
from jaxchat import model as M
from jaxchat.kv_cache import KVCache
from jaxchat.model import GPT, GPTConfig, config_for_depth

TINY = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def randomize(model, seed=0, scale=0.3):
    """Non-zero everywhere (lm_head and c_proj start at zero), so comparisons exercise every path."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in
                                                  zip(keys, leaves)]))
    return model


def tokens(shape, vocab=512, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.mark.parametrize("depth, params, flops", [(20, 560_988_160, 3_491_758_080), (32, 1_879_048_192, None)])
def test_sizes_on_abstract_shapes(depth, params, flops):
    model = nnx.eval_shape(lambda: GPT(config_for_depth(depth, 65536, 2048), rngs=nnx.Rngs(0)))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model)))  # nothing allocated
    assert model.num_params() == params
    if flops is not None:
        assert model.estimate_flops() == flops


def test_width_rule():
    c = config_for_depth(20, 65536, 2048)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.n_layer) == (1280, 10, 10, 20)
    assert config_for_depth(1, 100, 8).n_head == 1
    assert config_for_depth(26, 100, 8, n_kv_head=1).n_head == 13


def test_initial_loss_is_ln_vocab():
    model = GPT(TINY, rngs=nnx.Rngs(0))
    idx = tokens((4, 64))
    assert abs(float(model(idx, jnp.roll(idx, -1, axis=1))) - math.log(TINY.vocab_size)) < 1e-3
    assert float(jnp.abs(model.lm_head.kernel[...]).max()) == 0.0
    assert model.h[0].mlp.c_proj.kernel[...].std() == 0 and model.h[0].attn.c_q.kernel[...].std() > 0


@pytest.mark.slow
def test_init_scales():
    model = GPT(GPTConfig(sequence_len=8, vocab_size=4096, n_layer=1, n_head=2, n_kv_head=2, n_embd=256),
                rngs=nnx.Rngs(0))
    assert abs(float(model.wte[...].std()) - 1.0) < 0.01
    assert abs(float(model.h[0].attn.c_q.kernel[...].std()) - 256**-0.5) < 0.002
    assert abs(float(model.h[0].mlp.c_fc.kernel[...].std()) - 256**-0.5) < 0.002  # min(1, √(1024/256)) = 1


@pytest.mark.slow
def test_logits_and_softcap():
    model = randomize(GPT(TINY, rngs=nnx.Rngs(0)), scale=3.0)
    logits = model(tokens((2, 16)))
    assert logits.shape == (2, 16, TINY.vocab_size) and logits.dtype == jnp.float32
    assert float(jnp.abs(logits).max()) <= 15.0


@pytest.mark.slow
def test_gqa_equals_full_attention_with_repeated_kv():
    gqa = randomize(GPT(TINY, rngs=nnx.Rngs(0)))
    full = GPT(GPTConfig(**{**TINY.__dict__, "n_kv_head": TINY.n_head}), rngs=nnx.Rngs(1))
    group, hd = TINY.n_head // TINY.n_kv_head, TINY.n_embd // TINY.n_head
    full.wte[...], full.lm_head.kernel[...] = gqa.wte[...], gqa.lm_head.kernel[...]
    for src, dst in zip(gqa.h, full.h):
        for name in ("c_q", "c_proj"):
            getattr(dst.attn, name).kernel[...] = getattr(src.attn, name).kernel[...]
        for name in ("c_fc", "c_proj"):
            getattr(dst.mlp, name).kernel[...] = getattr(src.mlp, name).kernel[...]
        for name in ("c_k", "c_v"):  # kv head j serves query heads j·group .. (j+1)·group − 1
            w = getattr(src.attn, name).kernel[...].reshape(TINY.n_embd, TINY.n_kv_head, hd)
            getattr(dst.attn, name).kernel[...] = jnp.repeat(w, group, axis=1).reshape(TINY.n_embd, -1)
    idx = tokens((2, 64))
    np.testing.assert_allclose(gqa(idx), full(idx), atol=2e-5)


def reference_losses(model, idx, targets, weights=None):
    """Plain cross-entropy per token from the full logits of model(idx): 0 where the target is −1."""
    logp = jax.nn.log_softmax(model(idx), axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.where(targets == -1, 0, targets)[..., None], -1)[..., 0]
    return jnp.where(targets == -1, 0.0, ce if weights is None else weights * ce)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.slow
def test_loss_forms_match_reference_cross_entropy(weighted, monkeypatch):
    """model.loss's mean and sum and model.token_losses (the fused and the per-token chunked paths), with ignored
    targets and optional weights, equal a plain cross-entropy over full logits: values and gradients, the
    per-token cotangents all different. The per-token argmax is the logits' argmax, and no (B, T, V) array
    exists in the per-token backward."""
    monkeypatch.setattr(L, "CHUNK_ROWS", {jax.default_backend(): 48})  # 3 rows × 16 positions: 4 chunks of T
    model = randomize(GPT(TINY, rngs=nnx.Rngs(0)))
    idx = tokens((3, 64))
    targets = jnp.where(tokens((3, 64), seed=1) % 4 == 0, -1, jnp.roll(idx, -1, axis=1))
    weights = jax.random.uniform(jax.random.key(2), idx.shape, minval=0.5, maxval=2.0) if weighted else None
    probe = jax.random.normal(jax.random.key(3), idx.shape)  # a different cotangent for every token
    count = jnp.sum(targets != -1)
    forms = {  # name: (the model's form, reference), each reduced to a scalar to differentiate
        "mean": (lambda m: m.loss(idx, targets, weights), lambda m: reference_losses(m, idx, targets, weights).sum()
                 / count),
        "sum": (lambda m: m.loss(idx, targets, weights, reduction="sum"),
                lambda m: reference_losses(m, idx, targets, weights).sum()),
        "per token": (lambda m: jnp.sum(probe * m.token_losses(idx, targets, weights)[0]),
                 lambda m: jnp.sum(probe * reference_losses(m, idx, targets, weights))),
    }
    for name, (ours, ref) in forms.items():
        (lo, go), (lr, gr) = (nnx.jit(nnx.value_and_grad(f))(model) for f in (ours, ref))
        np.testing.assert_allclose(lo, lr, rtol=1e-5, err_msg=name)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name), go, gr)
    losses, argmax = nnx.jit(lambda m: m.token_losses(idx, targets, weights))(model)
    np.testing.assert_allclose(losses, reference_losses(model, idx, targets, weights), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(jnp.where(targets == -1, losses, 0.0)).max()) == 0.0
    np.testing.assert_array_equal(argmax, jnp.argmax(model(idx), -1))
    if not weighted:
        np.testing.assert_allclose(model(idx, targets), forms["sum"][0](model) / count, rtol=1e-6)
        assert float(model(idx, jnp.full_like(idx, -1))) == 0.0  # nothing supervised: 0, not NaN
        with pytest.raises(ValueError, match="reduction 'none': one of 'mean', 'sum' \\(per token: token_losses\\)"):
            model.loss(idx, targets, reduction="none")
    graphdef, params = nnx.split(model)
    per_token = lambda p: forms["per token"][0](nnx.merge(graphdef, p))
    hlo = jax.jit(jax.grad(per_token)).lower(params).compile().as_text()
    sizes = [math.prod(map(int, dims.split(","))) for dims in re.findall(r"f32\[(\d+(?:,\d+)+)\]", hlo)]
    assert "f32[3,16,512]" in hlo and max(sizes) < 3 * 64 * 512  # a chunk's logits, never all of them


@pytest.mark.slow
def test_block_causal_attention_matches_dense():
    """The CPU kernel (query blocks, custom VJP, sequences in chunks; T not a multiple of the block, GQA) equals
    one masked softmax attention and jax.nn.dot_product_attention, values and gradients."""
    B, T, H, K, D = 4, 200, 4, 2, 16
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, n, D)) for i, n in enumerate((H, K, K)))
    mask = jnp.tril(jnp.ones((T, T), bool))
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    for f in (lambda q, k, v: A.causal_attention(q, k, v, jnp.float32),
              lambda q, k, v: A.cached_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask, jnp.float32)):
        np.testing.assert_allclose(f(q, k, v), ref(q, k, v), atol=1e-5)
        loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
        grads = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
        for g, r in zip(grads, jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.slow
def test_mixed_precision_linear_grads():
    a, b = jax.random.normal(jax.random.key(0), (3, 5, 8)), jax.random.normal(jax.random.key(1), (8, 6))
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
        f = lambda a, b: jnp.sum(jnp.sin(G.linear(a, b, dtype)))
        g = lambda a, b: jnp.sum(jnp.sin(jnp.einsum("bti,io->bto", a, b)))
        out = jax.grad(f, argnums=(0, 1))(a, b)
        assert all(x.dtype == jnp.float32 for x in out)
        for x, y in zip(out, jax.grad(g, argnums=(0, 1))(a, b)):
            np.testing.assert_allclose(x, y, atol=tol * 10, rtol=tol)


@pytest.mark.slow
def test_bf16_compute_close_to_fp32():
    idx = tokens((2, 64))
    m32 = randomize(GPT(TINY, rngs=nnx.Rngs(0)), scale=0.1)
    m16 = GPT(GPTConfig(**{**TINY.__dict__, "compute_dtype": "bfloat16"}), rngs=nnx.Rngs(0))
    nnx.update(m16, nnx.state(m32, nnx.Param))
    l32, l16 = m32(idx, jnp.roll(idx, -1, 1)), m16(idx, jnp.roll(idx, -1, 1))
    assert abs(float(l32) - float(l16)) < 2e-2 and jnp.isfinite(l16)


@pytest.mark.slow
def test_kv_cache_prefill_and_decode_match_full_forward():
    model = randomize(GPT(TINY, rngs=nnx.Rngs(0)))
    idx = tokens((2, 24))
    full = model(idx)
    step = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
    cache = KVCache.create(TINY, batch_size=2, max_len=32)
    logits, cache = step(model, idx[:, :16], cache)  # prefill
    np.testing.assert_allclose(logits, full[:, :16], atol=1e-4)
    for t in range(16, 24):  # decode one token at a time
        logits, cache = step(model, idx[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4)
    assert cache.pos.tolist() == [24, 24]


@pytest.mark.slow
def test_kv_cache_left_padded_rows_match_unpadded():
    """Rows of different lengths share the write slot: a left-padded row (start > 0) gives the logits of the same
    tokens alone, in prefill and in decode; padding slots are never attended to."""
    model = randomize(GPT(TINY, rngs=nnx.Rngs(0)))
    idx = tokens((2, 20))
    full = model(idx)
    pad = 5  # row 1 holds only idx[1, 5:]; its slots 0..4 hold junk
    chunk = idx.at[1, :pad].set(7)
    step = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
    cache = KVCache.create(TINY, batch_size=2, max_len=24, start=jnp.array([0, pad]))
    logits, cache = step(model, chunk[:, :16], cache)
    alone = model(idx[1:, pad:])
    np.testing.assert_allclose(logits[0], full[0, :16], atol=1e-4)
    np.testing.assert_allclose(logits[1, pad:], alone[0, :16 - pad], atol=1e-4)
    for t in range(16, 20):
        logits, cache = step(model, idx[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[0, 0], full[0, t], atol=1e-4)
        np.testing.assert_allclose(logits[1, 0], alone[0, t - pad], atol=1e-4)
    assert cache.pos.tolist() == [20, 20 - pad]


def test_rotary_is_nanochat_rotate_half():
    """nanochat: inv_freq = 1/10000^(2i/hd), halves (x1, x2) -> (x1·cos + x2·sin, −x1·sin + x2·cos)."""
    T, hd = 12, 16
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, T, 3, hd)), np.float64)
    freqs = np.outer(np.arange(T), 1.0 / 10000 ** (np.arange(0, hd, 2) / hd))[None, :, None, :]
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    want = np.concatenate([x1 * np.cos(freqs) + x2 * np.sin(freqs), -x1 * np.sin(freqs) + x2 * np.cos(freqs)], -1)
    got = G.apply_rotary(jnp.asarray(x, jnp.float32), *M.rotary(jnp.arange(T)[None], hd))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_positions_shift_rope_only():
    """Explicit positions 0..T−1 are the default; shifting all positions leaves causal attention unchanged
    (RoPE is relative), so the logits stay the same."""
    model = randomize(GPT(TINY, rngs=nnx.Rngs(0)))
    idx = tokens((2, 32))
    base = model(idx)
    logits = lambda positions: model.logits(model.hidden(idx, positions=positions))
    np.testing.assert_allclose(logits(jnp.arange(32)[None]), base, atol=1e-6)
    np.testing.assert_allclose(logits(jnp.arange(32)[None] + 100), base, atol=2e-4)


@pytest.mark.slow
def test_norms_keep_their_output_and_match_autodiff():
    """norm_to and rope_qk_norm differentiate from their saved output and inverse RMS: the same gradients as
    autodiff through the plain fp32 formulas."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 4, 32))
    dy = jax.random.normal(jax.random.key(1), x.shape)
    cos, sin = M.rotary(jnp.arange(16)[None], 32)
    plain = {"norm_to": lambda x: G.norm(x), "rope_qk_norm": lambda x: G.norm(G.apply_rotary(x, cos, sin))}
    fused = {"norm_to": lambda x: G.norm_to(x, jnp.float32), "rope_qk_norm": lambda x: G.rope_qk_norm(x, cos, sin)}
    for name in plain:
        want_y, want_vjp = jax.vjp(plain[name], x)
        got_y, got_vjp = jax.vjp(fused[name], x)
        np.testing.assert_allclose(got_y, want_y, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got_vjp(dy)[0], want_vjp(dy)[0], atol=1e-5, err_msg=name)


@pytest.mark.parametrize("options", [dict(remat="block"), dict(remat="matmuls"), dict(remat="attention"),
                                     dict(scan_layers=True), dict(scan_layers=True, remat="block")])
@pytest.mark.slow
def test_remat_and_scan_compute_the_same_loss_and_gradients(options):
    """Execution options change what is kept or how the blocks are compiled, never the numbers."""
    model = randomize(GPT(TINY, rngs=nnx.Rngs(0)))
    other = GPT(TINY.with_execution(**options), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model, nnx.Param))
    idx = tokens((2, 32))

    def loss_and_grads(m):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        f = lambda p: nnx.merge(graphdef, p, rest).loss(idx, jnp.roll(idx, -1, 1))
        return jax.jit(jax.value_and_grad(f))(params)

    (l0, g0), (l1, g1) = loss_and_grads(model), loss_and_grads(other)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, atol=1e-6)


@pytest.mark.slow
def test_bf16_activations_and_attention_choice():
    """In bf16 the matmuls return bf16 (what the backward keeps is 16-bit); cuDNN attention is refused with the
    reason where it cannot run, and "auto" falls back to the XLA kernel."""
    from jaxchat.attention import causal_attention, cudnn_problem
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    assert G.linear(x, jnp.ones((16, 4)), jnp.bfloat16).dtype == jnp.bfloat16
    assert G.linear(x, jnp.ones((16, 4)), jnp.float32).dtype == jnp.float32
    q = jax.random.normal(jax.random.key(1), (1, 8, 4, 16), jnp.bfloat16)
    k = q[:, :, :2]
    if jax.default_backend() != "gpu":
        assert "needs a GPU" in cudnn_problem(q, k, jnp.bfloat16)
        with pytest.raises(ValueError, match="cudnn attention cannot run: it needs a GPU"):
            causal_attention(q, k, k, jnp.bfloat16, "cudnn")
    np.testing.assert_array_equal(causal_attention(q, k, k, jnp.bfloat16, "auto") if cudnn_problem(q, k, jnp.bfloat16)
                                  else causal_attention(q, k, k, jnp.bfloat16, "xla"),
                                  causal_attention(q, k, k, jnp.bfloat16, "xla"))
    with pytest.raises(ValueError, match="remat 'sometimes'"):
        TINY.with_execution(remat="sometimes")

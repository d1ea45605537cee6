"""nanochat's 2026 architecture (GPTConfig's 2026 options) against nanochat's own code, and its pieces: windowed
attention against a dense mask, the configs, the init, the FLOPs.

The reference, tests/fixtures/nanochat2026/model.npz, is what nanochat's torch code computes in fp32 from perturbed
weights (tests/fixtures/make_nanochat2026_model.py, which says what the file holds).
"""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxchat import attention as A
from jaxchat.kv_cache import KVCache
from jaxchat.model import GPT, NANOCHAT_2026, GPTConfig, config_for_depth

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "nanochat2026", "model.npz")
REFERENCE = GPTConfig(sequence_len=256, vocab_size=500, n_layer=4, n_head=2, n_kv_head=1, n_embd=128,
                      **NANOCHAT_2026)


def nanochat_name(path):
    """nanochat's state-dict name of the parameter at `path` in nnx.state(GPT) (a kernel is its weight,
    transposed)."""
    name = ".".join(map(str, path))
    name = "transformer." + name if name.startswith(("h.", "wte")) else name
    if name.endswith(".kernel"):
        return name[:-len(".kernel")] + ".weight"
    return name + ".weight" if "wte" in name or "value_embeds" in name else name


@pytest.fixture(scope="module")
def reference():
    data = np.load(FIXTURE)
    model = GPT(REFERENCE, rngs=nnx.Rngs(0))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, p in flat:
        name = nanochat_name(path)
        w = data[name].astype(np.float32) * np.float32(2.0) ** int(data[name + ".exp"])
        w = w.T if path[-1] == "kernel" else w
        assert w.shape == p.shape, (name, w.shape, p.shape)
        p.set_value(jnp.asarray(w))
    nnx.update(model, nnx.from_flat_state(flat))
    assert len(flat) == len([k for k in data.files if k.endswith(".exp")])  # every tensor nanochat has
    return model, data


def test_logits_match_nanochat(reference):
    model, data = reference
    logit_stride = int(data["strides"][1])
    logits = np.asarray(model(jnp.asarray(data["idx"])))[:, ::logit_stride]
    assert logits.shape == data["logits"].shape  # sliced back to vocab_size (500 of 512)
    assert np.abs(logits - data["logits"]).max() <= 1e-5


def test_loss_and_gradients_match_nanochat(reference):
    model, data = reference
    grad_stride, _, small = (int(s) for s in data["strides"])
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = lambda p: nnx.merge(graphdef, p)(jnp.asarray(data["idx"]), jnp.asarray(data["targets"]))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert abs(float(loss) - float(data["loss"])) <= 1e-5 * float(data["loss"])
    errors = {}
    for path, g in nnx.to_flat_state(grads):
        name = nanochat_name(path)
        g = np.asarray(g[...])
        g = g.T if path[-1] == "kernel" else g
        g = g if g.size <= small else g.ravel()[::grad_stride]
        ref = data["grad." + name]
        errors[name] = np.linalg.norm(g.ravel() - ref.ravel()) / np.linalg.norm(ref)
    assert len(errors) == len([k for k in data.files if k.startswith("grad.")])
    for name, err in errors.items():
        assert err <= (1e-3 if data["grad." + name].size <= 24 else 1e-4), (name, err)


def dense_attention(q, k, v, window):
    """Softmax attention under an explicit (T, T) mask: causal, keys at most `window` back."""
    T, H, D = q.shape[1:]
    k, v = (jnp.repeat(t, H // t.shape[2], axis=2) for t in (k, v))
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None]
    mask = (j <= i) & (i - j <= (T if window is None else window))
    scores = jnp.where(mask, jnp.einsum("bthd,bshd->bhts", q, k) * D**-0.5, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("T, window", [(300, 100), (300, 128), (200, 0), (256, None)])
def test_windowed_attention_kernel_matches_dense_mask(T, window):
    """Values and gradients, GQA (4 query heads, 2 kv heads), T not a multiple of the block, windows that do not
    align with it; the kernel visits only the key blocks a query block's window reaches."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, T, h, 16)) for i, h in enumerate((4, 2, 2)))
    cot = jax.random.normal(jax.random.key(3), q.shape)
    kernel = lambda q, k, v: jnp.sum(A.causal_attention(q, k, v, jnp.float32, "xla", window) * cot)
    dense = lambda q, k, v: jnp.sum(dense_attention(q, k, v, window) * cot)
    (out, grads), (ref, ref_grads) = (jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v) for f in (kernel, dense))
    assert abs(float(out) - float(ref)) <= 1e-4 * abs(float(ref))
    for g, r in zip(grads, ref_grads):
        assert float(jnp.abs(g - r).max()) <= 1e-5 * max(1.0, float(jnp.abs(r).max()))  # W = 0: dq = dk = 0
    if window is not None:
        assert all(lo == max(0, s - window) for s, _, lo in A._blocks(T, window))


def test_windows_and_value_embedding_layers():
    c = config_for_depth(12, 32768, 2048, recipe="2026")
    assert c.windows == (512, 512, 512, 2048) * 2 + (512, 512, 512, 2048)
    assert GPTConfig(n_layer=3, sequence_len=2048, window_pattern="SL").windows == (512, 2048, 2048)
    assert GPTConfig(n_layer=2).windows == (None, None)  # October: no windows
    assert [REFERENCE.has_ve(i) for i in range(4)] == [False, True, False, True]
    assert [c.has_ve(i) for i in range(12)] == [i % 2 == 1 for i in range(12)]


def test_width_rule_2026():
    assert (config_for_depth(1, 100, 8, recipe="2026").n_embd, config_for_depth(3, 100, 8, recipe="2026").n_embd) \
        == (128, 256)
    c = config_for_depth(24, 32768, 2048, recipe="2026")
    assert (c.n_embd, c.n_head, c.padded_vocab) == (1536, 12, 32768)
    assert GPTConfig(vocab_size=500, vocab_multiple=64).padded_vocab == 512


def test_old_configs_load_unchanged():
    meta = {"sequence_len": 64, "vocab_size": 330, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32}
    c = GPTConfig(**meta)
    assert (c.window_pattern, c.value_embeds, c.smear, c.init, c.padded_vocab) == (None, False, False, "2025", 330)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(GPT(c, rngs=nnx.Rngs(0)), nnx.Param))}
    assert paths == {"wte", "lm_head.kernel"} | {f"h.0.{m}.kernel" for m in
                                                 ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc",
                                                  "mlp.c_proj")}


def test_init_2026():
    c = GPTConfig(sequence_len=64, vocab_size=4000, n_layer=3, n_head=2, n_kv_head=2, n_embd=256, **NANOCHAT_2026)
    model = GPT(c, rngs=nnx.Rngs(0))
    s = math.sqrt(3 / 256)
    assert abs(float(model.wte[...].std()) - 0.8) < 0.01 and model.wte.shape == (4032, 256)
    assert abs(float(model.lm_head.kernel[...].std()) - 0.001) < 2e-5
    for w, bound in ((model.h[0].attn.c_q, s), (model.h[1].attn.c_v, s), (model.h[0].mlp.c_fc, 0.4 * s)):
        w = w.kernel[...]
        assert float(w.max()) <= bound and float(w.min()) >= -bound and float(w.max()) > 0.99 * bound
    assert float(jnp.abs(model.h[0].attn.c_proj.kernel[...]).max()) == 0 == float(model.h[2].mlp.c_proj.kernel.std())
    ve = model.value_embeds["0"][...]
    assert ve.shape == (4032, 256) and float(jnp.abs(ve).max()) <= s and set(model.value_embeds) == {"0", "2"}
    assert model.h[1].attn.ve_gate is None and model.h[2].attn.ve_gate.kernel.shape == (12, 2)
    for gate in (model.h[0].attn.ve_gate.kernel[...], model.smear_gate.kernel[...]):
        assert 0 <= float(gate.min()) and float(gate.max()) <= 0.02
    np.testing.assert_allclose(model.resid_lambdas[...], [1.15, 1.10, 1.05], rtol=1e-6)
    np.testing.assert_allclose(model.x0_lambdas[...], [0.20, 0.125, 0.05], rtol=1e-6)
    assert (float(model.smear_lambda[0]), float(model.backout_lambda[0])) == (0.0, np.float32(0.2))


def test_flops_and_scaling_params_2026():
    """nanochat's estimate_flops and num_scaling_params of the reference model (the numbers its code gives)."""
    model = nnx.eval_shape(lambda: GPT(REFERENCE, rngs=nnx.Rngs(0)))
    d, V, kv = 128, 512, 64
    block = d * d + 2 * d * kv + d * d + 2 * 4 * d * d
    matmuls = 4 * block + 2 * 12 * 1 + d * V + 24
    assert model.num_matmul_params() == matmuls
    assert model.estimate_flops() == 6 * matmuls + 12 * d * (3 * 128 + 256)
    counts = model.num_scaling_params()
    assert counts == dict(wte=V * d, value_embeds=2 * V * kv, lm_head=d * V, transformer_matrices=4 * block + 24,
                          scalars=4 + 4 + 24 + 1 + 1, total=model.num_params())


def test_decoding_matches_full_forward(reference):
    """Prefill, a second chunk and single tokens through the cache give the full forward's logits: smear reads the
    cached last embedding, windows (128 of 256 here) drop the keys a query has left behind. Row 1 is left-padded
    (start 5): it gives the logits of its tokens alone."""
    model, data = reference
    idx, pad = jnp.asarray(data["idx"])[:, :170], 5
    full, alone = model(idx), model(idx[1:, pad:])
    step = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
    cache = KVCache.create(REFERENCE, batch_size=2, max_len=176, start=jnp.array([0, pad]))
    chunk = idx.at[1, :pad].set(3)  # junk in row 1's padding slots
    logits, cache = step(model, chunk[:, :100], cache)
    logits2, cache = step(model, idx[:, 100:140], cache)
    logits = jnp.concatenate([logits, logits2], axis=1)
    for t in range(140, 170):
        logits_t, cache = step(model, idx[:, t:t + 1], cache)
        logits = jnp.concatenate([logits, logits_t], axis=1)
    np.testing.assert_allclose(logits[0], full[0], atol=1e-4)
    np.testing.assert_allclose(logits[1, pad:], alone[0], atol=1e-4)


def test_decoding_with_a_shared_prefix_matches_full_forward(reference):
    """Two rows continue one 140-token prompt held once as the cache's shared prefix: the window also masks the
    prompt's keys that a query has left behind."""
    model, data = reference
    prompt, rest = jnp.asarray(data["idx"])[:1, :140], jnp.asarray(data["idx"])[:, 140:160]
    cache = KVCache.create(REFERENCE, batch_size=1, max_len=140)
    _, cache = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))(model, prompt, cache)
    cache = cache.as_prefix(2, 24)
    step = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
    for t in range(rest.shape[1]):
        logits, cache = step(model, rest[:, t:t + 1], cache)
    full = model(jnp.concatenate([jnp.repeat(prompt, 2, axis=0), rest], axis=1))
    np.testing.assert_allclose(logits[:, 0], full[:, -1], atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                    reason="XLA's CUDA compiler is not installed (pip install 'jaxchat[gpu]'): cannot compile for a GPU")
def test_cudnn_attention_compiles_with_the_window_for_an_h100():
    """cuDNN's flash attention, forward and backward, takes the window itself: W + 1 keys per query (nanochat's
    (W, 0)), no mask tensor."""
    from jaxchat import aot, sharding

    mesh = sharding.make_mesh((1, 1), devices=aot.target_devices("h100", 1))
    with jax.set_mesh(mesh):
        args = [jax.ShapeDtypeStruct((2, 512, h, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
                for h in (4, 2, 2)]
        loss = lambda q, k, v: jnp.sum(A.causal_attention(q, k, v, jnp.bfloat16, "cudnn", 128).astype(jnp.float32))
        hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="__cudnn$fmha' in line]
    assert len(calls) == 2 and all('"sliding_window_length": 129' in line and '"mask_type": "CAUSAL"' in line
                                   for line in calls)


def test_parameters_fall_in_nanochats_optimizer_groups():
    """The 2026 optimizer groups parameters by the top of their path (optim.GROUPS): nanochat's setup_optimizer
    groups, the value embeddings' gates inside the blocks (Muon)."""
    from jaxchat.optim import GROUPS

    model = nnx.eval_shape(lambda: GPT(REFERENCE, rngs=nnx.Rngs(0)))
    groups = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        groups.setdefault(GROUPS[path[0]], set()).add(".".join(map(str, path)))
    assert groups["value_embeds"] == {"value_embeds.1", "value_embeds.3"}
    assert groups["smear"] == {"smear_gate.kernel", "smear_lambda", "backout_lambda"}
    assert (groups["resid"], groups["x0"], groups["embedding"], groups["lm_head"]) == (
        {"resid_lambdas"}, {"x0_lambdas"}, {"wte"}, {"lm_head.kernel"})
    assert {"h.1.attn.ve_gate.kernel", "h.3.attn.ve_gate.kernel"} < groups["matrix"] and len(groups["matrix"]) == 26

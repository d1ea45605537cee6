"""The jitted train step: accumulation, token-weighted loss, no recompiles, donation, NaN guard."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat.model import GPTConfig
from jaxchat.optim import OptimConfig, hyperparams
from jaxchat.train import TrainState, check_finite, init_train_state, train_step

pytestmark = pytest.mark.slow  # every test compiles and runs train steps

TINY = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


def make_batch(accum, rows, seed=0, T=32):
    tok = np.random.default_rng(seed).integers(0, TINY.vocab_size, (accum * rows, T + 1), np.int32)
    split = lambda x: x.reshape(accum, rows, T)
    return {"inputs": split(tok[:, :-1]), "targets": split(tok[:, 1:])}


def params_of(state):
    return jax.device_get(nnx.to_pure_dict(nnx.state(state.model, nnx.Param)))


def run(batch, steps=1, config=TINY, hyper=None):
    state = init_train_state(config, OptimConfig(ns_dtype="float32"))  # fp32 NS: compare steps, not bf16 rounding
    for _ in range(steps):
        state, metrics = train_step(state, batch, hyper or hyperparams(1.0, 0.9))
    return state, metrics


def assert_same_step(batch_a, batch_b, steps=2):
    """Same tokens split differently into micro-batches: same loss and parameters (fp32 summation order only).
    Tolerances: loss 1e-5 relative; Muon matrices 2e-5 absolute; the AdamW groups (wte, lm_head: lr 0.69 and
    0.014 at this width, eps 1e-10) turn the rounding of gradient entries that are zero up to rounding (~1e-10
    once divided by the token count, as large as eps) into part of an lr step, so there: < 0.1% of entries off
    by more than 1e-5 (see test_sharding)."""
    sa, ma = run(batch_a, steps)
    sb, mb = run(batch_b, steps)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
    assert int(ma["num_tokens"]) == int(mb["num_tokens"])
    pa, pb = params_of(sa), params_of(sb)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(pa)[0], jax.tree.leaves(pb)):
        if "wte" in jax.tree_util.keystr(path) or "lm_head" in jax.tree_util.keystr(path):
            assert np.mean(np.abs(a - b) > 1e-5) < 1e-3
        else:
            np.testing.assert_allclose(a, b, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_grad_accumulation_4x2_equals_1x8():
    one = make_batch(1, 8)
    four = jax.tree.map(lambda x: x.reshape(4, 2, -1), one)
    assert_same_step(four, one)


def test_micro_batch_without_supervised_tokens():
    """Loss is summed over tokens and divided once by the step's supervised tokens: a micro-batch with none adds
    exactly nothing (no NaN), and uneven micro-batches weigh by their token counts."""
    one = make_batch(1, 8)
    one["targets"][0, 2:4] = -1  # rows 2-3 (= micro-batch 1 below) unsupervised
    one["targets"][0, 5, :20] = -1  # and a partly supervised row
    four = jax.tree.map(lambda x: x.reshape(4, 2, -1), one)
    _, metrics = run(four, steps=1)
    assert math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["num_tokens"]) == 6 * 32 - 20
    assert_same_step(four, one)


def test_all_unsupervised_step_is_finite():
    batch = make_batch(4, 2)
    batch["targets"][:] = -1
    _, metrics = run(batch)
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0


def test_changing_hyperparameters_does_not_recompile():
    batch = make_batch(1, 8)
    state = init_train_state(TINY, OptimConfig())
    state, _ = train_step(state, batch, hyperparams(1.0, 0.85))
    compiled = train_step._cache_size()
    losses = []
    for lrm, mom in ((0.5, 0.9), (0.0, 0.95), (0.25, 0.87)):
        state, metrics = train_step(state, batch, hyperparams(lrm, mom))
        losses.append(float(metrics["loss"]))
    assert train_step._cache_size() == compiled
    assert losses[1] < losses[0] and losses[2] == pytest.approx(losses[1], abs=1e-6)  # lrm 0 froze the params


def test_state_is_donated_and_metrics_are_device_arrays():
    batch = make_batch(1, 8)
    state = init_train_state(TINY, OptimConfig())
    old = jax.tree.leaves(state)
    state, metrics = train_step(state, batch, hyperparams())
    assert all(x.is_deleted() for x in old)
    assert all(isinstance(v, jax.Array) for v in metrics.values())
    assert int(state.optimizer.step[...]) == 1


def test_loss_decreases_and_bf16_compute_trains():
    batch = make_batch(1, 8)
    for dtype in ("float32", "bfloat16"):
        config = GPTConfig(**{**TINY.__dict__, "compute_dtype": dtype})
        state = init_train_state(config, OptimConfig())
        losses = []
        for _ in range(8):
            state, metrics = train_step(state, batch, hyperparams())
            losses.append(check_finite(metrics["loss"], len(losses)))
        assert losses[0] == pytest.approx(math.log(TINY.vocab_size), abs=1e-3)
        assert losses[-1] < losses[0] - 1.0, (dtype, losses)


def test_non_finite_loss_stops_with_the_step():
    assert check_finite(jnp.float32(2.5), 3) == 2.5
    state = init_train_state(TINY, OptimConfig())
    model, opt = state.model, state.optimizer
    model.wte[...] = jnp.full_like(model.wte[...], jnp.nan)
    state = TrainState.create(model, opt)
    _, metrics = train_step(state, make_batch(1, 8), hyperparams())
    with pytest.raises(FloatingPointError, match="step 17"):
        check_finite(metrics["loss"], 17)

"""RL's policy-gradient loss: per-token weights in the fused loss, advantages, rollout batches, the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat.losses import softcap_cross_entropy_sum
from jaxchat.model import GPT, GPTConfig
from jaxchat.optim import OptimConfig, hyperparams
from jaxchat.chat_rl import advantages, rollout_batch
from jaxchat.train import TrainState, init_train_state, train_step
from test_model import randomize  # non-zero everywhere, so logits are not uniform

TINY = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
PAD = 63


def reference_loss(x, w, targets, weights, softcap=15.0):
    """Full logits at once: Σ over targets ≠ −1 of weight·CE."""
    z = softcap * jnp.tanh(x @ w / softcap)
    logp = jax.nn.log_softmax(z, -1)
    ce = -jnp.take_along_axis(logp, jnp.where(targets == -1, 0, targets)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(targets == -1, 0.0, weights * ce))


@pytest.mark.parametrize("B, T", [(4, 300), (2, 13), (3, 1)])  # several chunks; prime T; one position
@pytest.mark.slow
def test_weighted_fused_loss_matches_reference(B, T):
    D, V = 16, 40
    kx, kw, kt, km, ka = jax.random.split(jax.random.key(B * T), 5)
    x, w = jax.random.normal(kx, (B, T, D)), 0.5 * jax.random.normal(kw, (D, V))
    targets = jnp.where(jax.random.uniform(km, (B, T)) < 0.3, -1, jax.random.randint(kt, (B, T), 0, V))
    weights = jnp.round(jax.random.normal(ka, (B, T)), 1)  # negatives, and some exact zeros
    fused = lambda x, w, a: softcap_cross_entropy_sum(x, w, targets, 15.0, jnp.float32, weights=a)
    ref = lambda x, w, a: reference_loss(x, w, targets, a)
    (lf, gf), (lr, gr) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w, weights) for f in (fused, ref))
    scale = reference_loss(x, w, targets, jnp.abs(weights))  # signed terms cancel: compare to their size
    np.testing.assert_allclose(lf, lr, atol=1e-6 * scale)
    for name, a, b in zip(("x", "w", "weights"), gf, gr):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_gpt_without_weights_is_unchanged():
    model = randomize(GPT(TINY, rngs=nnx.Rngs(0)))
    idx = jax.random.randint(jax.random.key(1), (3, 24), 0, TINY.vocab_size)
    targets = jnp.where(jnp.arange(24) % 5 == 0, -1, jnp.roll(idx, -1, axis=1))
    losses = nnx.jit(lambda m, w: [m.loss(idx, targets, w, reduction=r) for r in ("sum", "mean")])
    plain = losses(model, None)  # the pre-RL path: the graph holds no weights
    ones = jnp.ones(idx.shape, jnp.float32)
    np.testing.assert_allclose(losses(model, ones), plain, rtol=1e-6)
    np.testing.assert_allclose(losses(model, 0.5 * ones), 0.5 * np.float32(plain), rtol=1e-6)  # mean counts tokens


def test_advantages_subtract_the_group_mean():
    adv = advantages([1, 0, 0, 1, 0, 0, 0, 0], num_samples=4)
    assert adv.dtype == np.float32
    np.testing.assert_array_equal(adv, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    np.testing.assert_allclose(advantages([1.0, 0.0, 0.0], 3), [2 / 3, -1 / 3, -1 / 3], rtol=1e-6)


# Toy engine output: a 4-token prompt (mask 0), sampled tokens (1) and a forced tool-output run (0, 0).
SEQS = [[1, 2, 3, 4, 10, 11, 12, 13, 14, 15], [1, 2, 3, 4, 20]]
MASKS = [[0, 0, 0, 0, 1, 1, 1, 0, 0, 1], [0, 0, 0, 0, 1]]


def test_rollout_batch_masks_prompt_tool_output_and_padding():
    batch = rollout_batch(SEQS, MASKS, np.float32([0.5, -0.5]), pad_id=PAD)
    assert {k: v.dtype for k, v in batch.items()} == {"inputs": np.int32, "targets": np.int32, "weights": np.float32}
    P, N = PAD, -1
    np.testing.assert_array_equal(batch["inputs"], [[1, 2, 3, 4, 10, 11, 12, 13, 14] + [P] * 7,
                                                    [1, 2, 3, 4] + [P] * 12])
    np.testing.assert_array_equal(batch["targets"], [[N, N, N, 10, 11, 12, N, N, 15] + [N] * 7,
                                                     [N, N, N, 20] + [N] * 12])
    np.testing.assert_array_equal(batch["weights"], [[0.5] * 16, [-0.5] * 16])
    # Widths: the next power of two ≥ 16 of the longest − 1; an explicit width pads further or refuses.
    long = [list(range(18))]
    assert rollout_batch(long, [[1] * 18], [0.0], PAD)["inputs"].shape == (1, 32)
    assert rollout_batch([list(range(17))], [[1] * 17], [0.0], PAD)["inputs"].shape == (1, 16)
    assert rollout_batch(SEQS, MASKS, [0.0, 0.0], PAD, width=40)["targets"].shape == (2, 40)
    with pytest.raises(ValueError):
        rollout_batch(long, [[1] * 18], [0.0], PAD, width=16)


def randomized_state(config=TINY):
    state = init_train_state(config, OptimConfig(ns_dtype="float32"))
    model, opt = state.model, state.optimizer
    randomize(model)
    return TrainState.create(model, opt)


def toy_rollouts(rows=4, seed=0):
    """Prompt-major rollouts of 2 prompts × 2 samples with masked prompts, tool runs and ragged lengths."""
    rng = np.random.default_rng(seed)
    seqs, masks = [], []
    for r in range(rows):
        n = int(rng.integers(8, 20))
        seqs.append(rng.integers(0, TINY.vocab_size - 1, n).tolist())
        mask = (rng.random(n) < 0.7).astype(int)
        mask[:3] = 0
        masks.append(mask.tolist())
    adv = advantages(rng.random(rows).round(1), num_samples=2)
    return seqs, masks, adv


@pytest.mark.slow
def test_train_step_loss_is_minus_the_pg_objective():
    seqs, masks, adv = toy_rollouts()
    batch = rollout_batch(seqs, masks, adv, PAD)
    state = randomized_state()
    # The objective by hand, from the model's own per-token log-probs (the per-token path), before the step.
    per_token = nnx.jit(lambda m: m.token_losses(batch["inputs"], batch["targets"])[0])
    logp = -np.asarray(per_token(state.model))
    valid = batch["targets"] != -1
    objective = np.sum(logp * adv[:, None] * valid) / valid.sum()
    accum = jax.tree.map(lambda a: a.reshape(2, 2, -1), batch)  # two micro-batches: one prompt each
    _, metrics = train_step(state, accum, hyperparams())
    np.testing.assert_allclose(metrics["loss"], -objective, rtol=1e-5, atol=1e-7)
    assert int(metrics["num_tokens"]) == valid.sum()
    # All advantages zero (every sample of a prompt got the same reward): no signal at all.
    zero = dict(accum, weights=np.zeros_like(accum["weights"]))
    _, metrics = train_step(randomized_state(), zero, hyperparams())
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0


@pytest.mark.slow
def test_masked_tokens_carry_no_gradient():
    """Prompt and forced tool-output tokens (targets −1) add nothing: the gradient equals the one where those
    positions are given any other target ids but weight 0, and the per-token reference Σ adv·mask·CE."""
    seqs, masks, adv = toy_rollouts(seed=1)
    batch = rollout_batch(seqs, masks, adv, PAD)
    model = randomized_state().model
    rng = np.random.default_rng(2)
    masked = np.zeros_like(batch["targets"], bool)
    for r, (s, m) in enumerate(zip(seqs, masks)):
        masked[r, :len(s) - 1] = np.asarray(m[1:]) == 0
    other = np.where(masked, rng.integers(0, TINY.vocab_size, masked.shape), batch["targets"]).astype(np.int32)
    zeroed = np.where(masked, 0.0, batch["weights"]).astype(np.float32)

    @nnx.jit(static_argnums=3)
    def grads(model, targets, weights, per_token=False):
        def loss(m):
            if per_token:
                return jnp.sum(m.token_losses(batch["inputs"], targets, weights)[0])
            return m.loss(batch["inputs"], targets, weights, reduction="sum")

        return nnx.state(nnx.grad(loss)(model), nnx.Param)

    g = grads(model, batch["targets"], batch["weights"])
    for other_g in (grads(model, other, zeroed), grads(model, other, zeroed, True)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, other_g)
    assert np.abs(np.asarray(g["wte"][...])).sum() > 0  # and the sampled tokens do move the embeddings

"""Engine rollouts -> a policy-gradient batch for `train.train_step` (nanochat's chat_rl, spec §8.4).

Only tokens the model sampled are supervised: the engine's mask is 0 on the prompt and on forced tool-output
tokens, and padding is never supervised. Every supervised token of a row carries the row's advantage as its
loss weight, so the step's loss Σ adv·CE / N is −(the token-level policy-gradient objective).
"""

import numpy as np

from jaxchat.common import pad_bucket


def advantages(rewards, num_samples):
    """reward − mean reward of its group; `rewards` flat, prompt-major groups of `num_samples` (no σ-scaling,
    as nanochat). float32 (rows,)."""
    r = np.asarray(rewards, np.float32).reshape(-1, num_samples)
    return (r - r.mean(axis=1, keepdims=True)).reshape(-1)


def rollout_batch(sequences, masks, advantages, pad_id, width=None):
    """{"inputs", "targets", "weights"}: int32, int32, float32 (rows, W). `sequences`/`masks` as from
    `Engine.generate_batch` (prompt + sampled tokens; mask 0 on prompt and forced tokens). Targets are −1 where
    the target token's mask is 0 and on padding. W = `width`, else the longest sequence − 1 rounded up to a
    power of two (≥ 16), so that few shapes compile."""
    longest = max(len(s) for s in sequences) - 1
    W = width or pad_bucket(longest)
    if longest > W:
        raise ValueError(f"a sequence needs {longest} positions, more than width {W}")
    rows = len(sequences)
    inputs = np.full((rows, W), pad_id, np.int32)
    targets = np.full((rows, W), -1, np.int32)
    for r, (seq, mask) in enumerate(zip(sequences, masks)):
        assert len(seq) == len(mask), (len(seq), len(mask))
        seq, mask = np.asarray(seq, np.int32), np.asarray(mask)
        n = len(seq) - 1
        inputs[r, :n] = seq[:-1]
        targets[r, :n] = np.where(mask[1:] == 1, seq[1:], -1)  # position t predicts token t+1
    # The whole row carries its advantage; only supervised positions reach the loss.
    weights = np.repeat(np.asarray(advantages, np.float32)[:, None], W, axis=1)
    return {"inputs": inputs, "targets": targets, "weights": weights}

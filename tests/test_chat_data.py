"""Chat-stage batches: supervised positions, packing rules, cropping counts, exact resume, all-masked steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.chat_data import PackedLoader, PaddedLoader
from jaxchat.model import GPTConfig
from jaxchat.optim import hyperparams
from jaxchat.tokenizer import RustBPETokenizer
from jaxchat.train import init_train_state, train_step


@pytest.fixture(scope="module")
def tok():
    text = " ".join(f"hello {i}, how are you? fine, {i * 3} + {i} = {i * 4} thanks" for i in range(400))
    return RustBPETokenizer.train_from_iterator([text], 300)


class Conversations:
    """A toy task: conversation i has i % 5 + 1 exchanges, one with a python tool call."""

    def __init__(self, n=23):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        messages = []
        for j in range(i % 5 + 1):
            messages.append({"role": "user", "content": f"hello {i} {j}"})
            messages.append({"role": "assistant", "content": f"fine {j}" if j else [
                {"type": "text", "text": "so "}, {"type": "python", "text": f"{i}+{j}"},
                {"type": "python_output", "text": str(i + j)}, {"type": "text", "text": "thanks"}]})
        return {"messages": messages}


def test_padded_rows_supervise_exactly_the_assistant(tok):
    task = Conversations()
    loader = PaddedLoader(tok, task, B=3, T=64)
    batch = loader.next_stacked(2)
    assert batch["inputs"].shape[:2] == (2, 3) and batch["inputs"].shape[2] in (16, 32, 64)
    for r in range(6):
        ids, mask = tok.render_conversation(task[r], max_tokens=1 << 30)
        ids, mask = ids[:65], mask[:65]
        inputs, targets = batch["inputs"].reshape(6, -1)[r], batch["targets"].reshape(6, -1)[r]
        n = len(ids) - 1
        assert inputs[:n].tolist() == ids[:-1]
        want = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert targets[:n].tolist() == want and (targets[n:] == -1).all()
        supervised = {tok.decode([t]) for t in targets[targets != -1]}
        assert "<|assistant_end|>" in supervised and "<|python_start|>" in supervised
        assert not supervised & {"<|user_start|>", "<|output_start|>", "<|output_end|>", "<|bos|>"}


def test_cropping_is_counted(tok):
    loader = PaddedLoader(tok, Conversations(), B=5, T=16)
    loader.next_stacked(1)
    assert loader.cropped >= 1 and loader.seen == 5
    assert loader.next_stacked(1)["inputs"].shape == (1, 5, 16)


def test_packed_rows_follow_best_fit(tok):
    """Against a plain re-statement of the rule: each row (T+1 slots) takes the largest buffered conversation that
    fits (earliest on ties) until none does, then pads; conversations stay whole; BOS starts every row; targets are
    the next tokens except at padding and where the next token is a conversation's BOS."""
    task, T, B, size = Conversations(), 96, 4, 8
    loader = PackedLoader(tok, task, B=B, T=T, buffer_size=size)
    convs = [tok.render_conversation(task[i % len(task)], max_tokens=T + 1)[0] for i in range(200)]  # cropped
    buffer, nxt = [], 0
    bos = tok.get_bos_token_id()
    for _ in range(5):
        batch = next(loader)
        for r in range(B):
            row, room = [], T + 1
            while True:
                while len(buffer) < size:
                    buffer.append(nxt)
                    nxt += 1
                fits = [p for p in buffer if len(convs[p]) <= room]
                if not fits:
                    break
                pick = max(fits, key=lambda p: (len(convs[p]), -p))
                buffer.remove(pick)
                row.append(convs[pick])
                room -= len(convs[pick])
            flat = [t for c in row for t in c]
            assert batch["inputs"][r].tolist() == (flat[:-1] + [bos] * (T + 1))[:T]  # the last token predicts nothing
            want = [t if t != bos else -1 for t in flat[1:]] + [-1] * (T + 1 - len(flat))
            assert batch["targets"][r].tolist() == want[:T]
            assert flat[0] == bos


def test_packed_resume_is_exact(tok):
    task = Conversations()
    straight = PackedLoader(tok, task, B=2, T=64, buffer_size=6)
    for _ in range(7):
        next(straight)
    state = straight.get_state()
    resumed = PackedLoader(tok, task, B=2, T=64, buffer_size=6, state=state)
    for _ in range(30):  # across epochs too
        a, b = next(straight), next(resumed)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert straight.get_state() == resumed.get_state() and straight.epoch >= 1


def test_padded_resume_is_exact(tok):
    straight = PaddedLoader(tok, Conversations(), B=2, T=64)
    straight.next_stacked(3)
    resumed = PaddedLoader(tok, Conversations(), B=2, T=64, state=straight.get_state())
    for _ in range(10):
        a, b = straight.next_stacked(2), resumed.next_stacked(2)
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_all_masked_step_is_zero_not_nan():
    """A step whose targets are all −1 has loss 0 and zero gradients (the update is weight decay only)."""
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    state = init_train_state(config)
    batch = {"inputs": jnp.ones((2, 2, 16), jnp.int32), "targets": jnp.full((2, 2, 16), -1, jnp.int32)}
    _, metrics = train_step(state, batch, hyperparams(1.0, 0.95))
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0 and int(metrics["num_tokens"]) == 0
    assert np.isfinite(float(metrics["loss"]))
    jax.block_until_ready(metrics)

"""The engine: jitted prefill + on-device decode equal naive generation; seeds, limits, tools, buckets, chat reuse;
the server's slots decode the same tokens (one step body)."""

import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat import engine as E
from jaxchat.engine import Engine, use_calculator
from jaxchat.model import GPT, GPTConfig
from jaxchat.sampling import sample_next_token
from jaxchat.serving import Request, SlotServer
from jaxchat.tokenizer import RustBPETokenizer

from test_model import randomize

VOCAB = 300


@pytest.fixture(scope="module")
def tok():
    text = " ".join(f"hello world {i} the cat sat on the mat, number {i * 7} + {i % 13} = {i * 7 + i % 13}"
                    for i in range(400))
    return RustBPETokenizer.train_from_iterator([text], VOCAB)


def make_model(n_kv_head=2, seed=0, seq=128):
    config = GPTConfig(sequence_len=seq, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)
    return randomize(GPT(config, rngs=nnx.Rngs(0)), seed=seed, scale=0.3)


def naive_greedy(model, prompt, max_tokens, stop):
    """Repeated full forward passes (no cache), argmax at the last token. The sequence sits in a fixed-length
    buffer so one compiled forward serves every step; causal attention never sees the unused tail."""
    forward = nnx.jit(lambda model, x: model(x))
    seq, buffer = list(prompt), np.zeros((1, len(prompt) + max_tokens), np.int32)
    for _ in range(max_tokens):
        buffer[0, :len(seq)] = seq
        nxt = int(jnp.argmax(forward(model, jnp.asarray(buffer))[0, len(seq) - 1]))
        if nxt in stop:
            break
        seq.append(nxt)
    return seq


@pytest.mark.parametrize("n_kv_head", [4, 2])
@pytest.mark.slow
def test_greedy_equals_naive_generation(tok, n_kv_head):
    model = make_model(n_kv_head)
    engine = Engine(model, tok)
    stop = (engine.ids.bos, engine.ids.assistant_end)
    prompts = [tok.encode(t, prepend="<|bos|>") for t in ("hello world", "the cat sat on the mat, number 42 + 3 =")]
    results, masks = engine.generate_batch(prompts, max_tokens=64, temperature=0.0)  # two lengths: left padding
    for prompt, result, mask in zip(prompts, results, masks):
        assert result == naive_greedy(model, prompt, 64, stop)
        assert mask == [0] * len(prompt) + [1] * (len(result) - len(prompt))
    # one prompt, streamed token by token, gives the same tokens
    columns = [col[0] for col, _ in engine.generate(prompts[0], max_tokens=64, temperature=0.0)]
    assert prompts[0] + columns[:len(results[0]) - len(prompts[0])] == results[0]


@pytest.mark.slow
def test_decode_logits_match_full_forward(tok):
    """Teacher forcing through the engine's prefill and cache: logits at every decoded position equal the
    full-sequence forward, GQA model, within 1e-4."""
    model = make_model(n_kv_head=2)
    seq = jax.random.randint(jax.random.key(1), (1, 40), 0, VOCAB)
    full = model(seq)
    engine = Engine(model, tok)
    logits, cache = E._prefill(engine.graphdef, engine.state, seq[:, :16], jnp.zeros((1,), jnp.int32), 2, 24)
    np.testing.assert_allclose(logits, jnp.repeat(full[:, 15], 2, axis=0), atol=1e-4)  # one prompt, two rows
    for t in range(16, 40):
        logits, cache = model.decode(jnp.repeat(seq[:, t:t + 1], 2, axis=0), cache)
        np.testing.assert_allclose(logits[:, 0], jnp.repeat(full[:, t], 2, axis=0), atol=1e-4)


@pytest.mark.slow
def test_seeds_samples_and_limits(tok):
    engine = Engine(make_model(), tok)
    prompt = tok.encode("hello", prepend="<|bos|>")
    run = lambda **kw: engine.generate_batch(prompt, **{"num_samples": 4, "max_tokens": 24, **kw})[0]
    assert run(seed=1) == run(seed=1)  # same seed, same output
    assert run(temperature=0.0, seed=1) == run(temperature=0.0, seed=7)  # greedy ignores the seed
    assert len({tuple(r) for s in range(10) for r in run(seed=s, num_samples=1)}) > 1  # T=1 seeds differ
    for n in (1, 4, 16):
        rows = run(num_samples=n, max_tokens=n)
        assert len(rows) == n and all(len(prompt) <= len(r) <= len(prompt) + n for r in rows)
    first = [col for col, _ in engine.generate(prompt, num_samples=16, max_tokens=1, temperature=1.0)]
    assert len(first) == 1 and len(set(first[0])) > 1  # every row samples its own first token
    streamed = [col for col, _ in engine.generate(prompt, num_samples=4, max_tokens=24, seed=3, stream_every=5)]
    assert streamed == [col for col, _ in engine.generate(prompt, num_samples=4, max_tokens=24, seed=3)]


@pytest.mark.slow
def test_top_k_restricts_choices(tok):
    model = make_model()
    engine = Engine(model, tok)
    prompt = tok.encode("the cat", prepend="<|bos|>")
    col = next(engine.generate(prompt, num_samples=64, max_tokens=1, temperature=2.0, top_k=3))[0]
    top3 = set(np.argsort(np.asarray(model(jnp.asarray([prompt]))[0, -1]))[-3:].tolist())
    assert set(col) <= top3 and len(set(col)) > 1


class Scripted(nnx.Module):
    """A model that 'predicts' script[p + 1] at position p, whatever it is fed; it only advances the cache."""

    def __init__(self, config, script):
        self.config = config
        self.script = nnx.Variable(jnp.asarray(script, jnp.int32))

    def decode(self, idx, kv_cache, at=None):
        B, T = idx.shape
        positions = kv_cache.pos[:, None] + jnp.arange(T)[None]
        nxt = self.script[...][jnp.minimum(positions + 1, self.script.shape[0] - 1)]
        logits = jnp.where(jax.nn.one_hot(nxt, self.config.vocab_size) > 0, 10.0, -10.0)
        logits = logits if at is None else jax.lax.dynamic_index_in_dim(logits, at, axis=1, keepdims=False)
        return logits, kv_cache.replace(index=kv_cache.index + T)


@pytest.mark.slow
def test_tool_output_is_forced_with_mask_zero(tok):
    special = tok.encode_special
    start, end, out_s, out_e, a_end = (special(f"<|{s}|>") for s in
                                       ("python_start", "python_end", "output_start", "output_end", "assistant_end"))
    prompt = tok.encode("what is 12+30?", prepend="<|bos|>")
    expr, junk, after = tok.encode("12+30"), tok.encode("hello"), tok.encode(" done")
    forced = [out_s, *tok.encode("42"), out_e]
    # the script predicts junk where the tool output goes: the engine must force the real output over it
    script = prompt + [start, *expr, end] + (junk * 10)[:len(forced)] + after + [a_end] + [0] * 8
    config = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
    engine = Engine(Scripted(config, script), tok)
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=40, temperature=0.0)
    want = prompt + [start, *expr, end] + forced + after
    for result, mask in zip(results, masks):
        assert result == want
        assert mask == [0] * len(prompt) + [1] * (len(expr) + 2) + [0] * len(forced) + [1] * len(after)
    # forced tokens count toward max_tokens
    short, _ = engine.generate_batch(prompt, max_tokens=len(expr) + 4, temperature=0.0)
    assert short[0] == want[:len(prompt) + len(expr) + 4]
    # a calculation the tool refuses forces nothing
    bad = prompt + [start, *tok.encode("2**9"), end] + after + [a_end] + [0] * 8
    results, masks = Engine(Scripted(config, bad), tok).generate_batch(prompt, max_tokens=40, temperature=0.0)
    assert results[0] == bad[:bad.index(a_end)] and 0 not in masks[0][len(prompt):]


@pytest.mark.slow
def test_finished_rows_stay_finished(tok):
    a_end = tok.encode_special("<|assistant_end|>")
    prompt = tok.encode("hi", prepend="<|bos|>")
    config = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
    script = prompt + tok.encode(" ok") + [a_end] + tok.encode(" more text after the end") * 3
    engine = Engine(Scripted(config, script), tok)
    columns = list(engine.generate(prompt, num_samples=2, max_tokens=30, temperature=0.0))
    tokens = [c[0][0] for c in columns]
    assert tokens == tok.encode(" ok") + [a_end]  # the stream ends when every row is done
    results, _ = engine.generate_batch(prompt, max_tokens=30, temperature=0.0)
    assert results[0] == prompt + tok.encode(" ok")


def served_greedily(model, tok, prompts, max_tokens):
    """Each prompt's tokens from the web server's slots (2 rows, so the prompts also wait and share a call)."""
    server, done = SlotServer(model, tok, slots=2, chunk=4), threading.Semaphore(0)
    outs = [[] for _ in prompts]
    server.start()
    for i, prompt in enumerate(prompts):
        emit = lambda t, finish, i=i: (outs[i].extend(t), finish and done.release())
        server.submit(Request(prompt=prompt, max_tokens=max_tokens, emit=emit, temperature=0.0))
    assert all(done.acquire(timeout=300) for _ in prompts)
    server.stop()
    return outs


def test_the_server_decodes_what_the_engine_decodes(tok):
    """The engine's rows and the server's slots run one decode step: the same greedy tokens for the same prompts
    (the server's include the <|assistant_end|>/<|bos|> that ends a reply), tool output included."""
    model = make_model(seed=2)
    prompts = [tok.encode(t, prepend="<|bos|>") for t in ("hello world", "the cat sat on the mat, number 4", "7")]
    engine_rows, _ = Engine(model, tok).generate_batch(prompts, max_tokens=40, temperature=0.0)
    ends = (tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>"))
    for prompt, ours, theirs in zip(prompts, engine_rows, served_greedily(model, tok, prompts, 40)):
        assert ours[len(prompt):] == (theirs[:-1] if theirs[-1] in ends else theirs)
    special = tok.encode_special
    prompt = tok.encode("what is 2+3?", prepend="<|bos|>")
    call = [special("<|python_start|>"), *tok.encode("2+3"), special("<|python_end|>")]
    script = prompt + call + tok.encode("hello") * 3 + tok.encode(" done") + [special("<|assistant_end|>")] + [0] * 8
    config = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
    scripted = Scripted(config, script)
    (result,), _ = Engine(scripted, tok).generate_batch(prompt, max_tokens=40, temperature=0.0)
    assert result[len(prompt):len(prompt) + len(call) + 1] == call + [special("<|output_start|>")]
    assert served_greedily(scripted, tok, [prompt], 40)[0] == result[len(prompt):] + [special("<|assistant_end|>")]


@pytest.mark.slow
def test_prefill_compiles_once_per_bucket(tok):
    engine = Engine(make_model(seed=3), tok)
    before = E._prefill._cache_size()
    for n in (3, 9, 14, 16):  # all in the 16 bucket
        engine.generate_batch(list(range(1, n + 1)), max_tokens=4, temperature=0.0)
    assert E._prefill._cache_size() == before + 1
    for n in (17, 30):  # the 32 bucket
        engine.generate_batch(list(range(1, n + 1)), max_tokens=4, temperature=0.0)
    assert E._prefill._cache_size() == before + 2


@pytest.mark.slow
def test_shared_prefix_rows_match_full_forward(tok):
    """2 prompts of different lengths × 4 samples: the rows share each prompt's K/V (a prefix read by one matmul
    per prompt), yet every row's logits, at the prompt's end and over 6 teacher-forced steps of its own tokens,
    equal the full forward of its own sequence within 1e-4."""
    model = make_model(n_kv_head=2, seed=7)
    engine = Engine(model, tok)
    prompts = [tok.encode(t, prepend="<|bos|>") for t in ("the cat", "hello world 12 the cat sat on the mat")]
    ds, _ = engine._start(prompts, 4, 16, 0)
    assert ds.cache.prefix_k[0].shape[0] == 2 and ds.cache.k[0].shape[:3] == (8, 2, 16)
    cont = np.asarray(jax.random.randint(jax.random.key(2), (8, 6), 0, VOCAB))
    step = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
    logits, cache = [ds.logits], ds.cache
    for t in range(6):
        out, cache = step(model, jnp.asarray(cont[:, t:t + 1]), cache)
        logits.append(out[:, 0])
    logits = np.stack(logits, 1)  # (8, 7, V)
    for p, prompt in enumerate(prompts):
        rows = slice(4 * p, 4 * p + 4)
        full = model(jnp.asarray([prompt + cont[r].tolist() for r in range(rows.start, rows.stop)]))
        np.testing.assert_allclose(logits[rows], full[:, len(prompt) - 1:], atol=1e-4)


@pytest.mark.slow
def test_decode_loop_updates_cache_in_place(tok):
    """The compiled decode loop writes K/V with dynamic-update-slice and never copies or transposes a whole
    cache array, the rows' own slots or the shared prompt prefix (checked on the optimized HLO)."""
    engine = Engine(make_model(), tok)
    prompt = tok.encode("hello", prepend="<|bos|>")
    for n_prompts, rows in ((1, 1), (1, 4), (2, 2)):  # one row or prompt is held twice (XLA:CPU copies a batch of 1)
        ds, _ = engine._start([prompt] * n_prompts, rows, 64, 0)
        hlo = E._decode.lower(engine.graphdef, engine.ids, engine.state, ds, 64).compile().as_text()
        B, K, S, D = ds.cache.k[0].shape
        P, _, Tp, _ = ds.cache.prefix_k[0].shape
        assert B == max(n_prompts * rows, E.MIN_ROWS) and P == max(n_prompts, E.MIN_ROWS)
        cache_types = [f"f32[{B},{K},{S},{D}]", f"f32[{B},{K},{D},{S}]", f"f32[{K},{S},{D}]", f"f32[{K},{D},{S}]"]
        cache_types += [f"f32[{P},{K},{Tp},{D}]", f"f32[{P},{K},{D},{Tp}]", f"f32[{K},{Tp},{D}]", f"f32[{K},{D},{Tp}]"]
        defs = [line for line in hlo.splitlines() if any(f"= {t}" in line for t in cache_types)]
        assert any("dynamic-update-slice" in line for line in defs)
        bad = [line.strip()[:120] for line in defs if re.search(r"\b(copy|transpose)", line.split("=", 1)[1])]
        assert not bad, (n_prompts, rows, bad)


@pytest.mark.slow
def test_chat_turns_reuse_the_cache(tok):
    """A prompt that extends the previous prompt + reply prefills only the new tokens, and decodes what a fresh
    engine decodes from the whole history."""
    model = make_model(seed=5)
    engine, fresh = Engine(model, tok), Engine(model, tok)
    history = tok.encode("hello", prepend="<|bos|>")
    for turn in (" the cat", " sat on the mat"):
        reply = [c[0] for c, _ in engine.generate(history, max_tokens=12, temperature=0.0)]
        assert reply == [c[0] for c, _ in fresh.generate(history, max_tokens=12, temperature=0.0)]
        history = history + reply + tok.encode(turn)
        held_tokens, _ = engine._held
        assert history[:len(held_tokens)] == held_tokens and len(held_tokens) > 0
    before = E._extend._cache_size()
    reply = [c[0] for c, _ in engine.generate(history, max_tokens=12, temperature=0.0)]
    assert E._extend._cache_size() >= max(before, 1)
    fresh._held = None
    assert reply == [c[0] for c, _ in fresh.generate(history, max_tokens=12, temperature=0.0)]


def test_prompt_errors(tok):
    engine = Engine(make_model(seq=32), tok)
    with pytest.raises(ValueError, match="longer than the model's context"):
        engine.generate_batch(list(range(1, 40)), max_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate_batch([], max_tokens=4)


def test_sampling_follows_the_distribution():
    """Inverse-CDF sampling (blocks of 128 over a 300-token vocab, with top-k, top-p and temperature): frequencies
    over 4,096 rows match softmax(logits / T) (restricted to the top k or top p) within 5 standard errors;
    zero-probability tokens never appear; T=0 is the argmax (first one on ties)."""
    logits = jnp.log(jnp.zeros((VOCAB,)).at[jnp.array([3, 130, 131, 299])].set(jnp.array([0.1, 0.2, 0.3, 0.4])))
    logits = jnp.broadcast_to(logits, (4096, VOCAB))
    keys = jax.random.split(jax.random.key(0), 4096)
    per_row = lambda x: jnp.full((4096,), x)
    for temperature, top_k, top_p, want in [(1.0, 0, 1.0, {3: .1, 130: .2, 131: .3, 299: .4}),
                                            (1.0, 2, 1.0, {131: 3 / 7, 299: 4 / 7}),
                                            (1.0, 0, 0.65, {131: 3 / 7, 299: 4 / 7}),
                                            (0.5, 0, 1.0, {3: 1 / 30, 130: 4 / 30, 131: 9 / 30, 299: 16 / 30})]:
        settings = per_row(temperature), per_row(top_k), per_row(top_p)
        picks = np.asarray(jax.jit(sample_next_token)(logits, keys, *settings))
        assert set(picks.tolist()) == set(want)
        for token, p in want.items():
            assert abs(np.mean(picks == token) - p) < 5 * np.sqrt(p * (1 - p) / 4096), (temperature, top_k, token)
    tie = jnp.zeros((2, VOCAB)).at[:, 7].set(1.0).at[:, 9].set(1.0)
    assert sample_next_token(tie, keys[:2], jnp.zeros(2), jnp.zeros(2, int), jnp.ones(2)).tolist() == [7, 7]


@pytest.mark.parametrize("expr, value", [
    ("2+3", 5), ("1,000 * 3", 3000), ("10/4", 2.5), ("7//2", 3), ("-(4 - 10)", 6), ("(1.5+2.5)*2", 8.0),
    ("'strawberry'.count('r')", 3), ('"Mississippi".lower().count("s")', 4),
    ("2**10", None), ("1/0", None), ("2+", None), ("__import__('os')", None), ("open('x').read().count('a')", None),
    ("'a'.zfill(999999999).count('a')", None), ("len('abc')", None), ("'ab'.count('a') + 1", None), ("x", None),
])
def test_calculator(expr, value):
    assert use_calculator(expr) == value and type(use_calculator(expr)) is type(value)


@pytest.mark.slow
def test_bf16_engine_holds_kernels_in_bf16(tok):
    """A 16-bit compute dtype: the engine keeps its matrices in bf16 (half the bytes read per token; the
    embedding stays fp32) and its first-step logits stay close to fp32's."""
    model = make_model()
    m16 = GPT(GPTConfig(**{**model.config.__dict__, "compute_dtype": "bfloat16"}), rngs=nnx.Rngs(0))
    nnx.update(m16, nnx.state(model, nnx.Param))
    e32, e16 = Engine(model, tok), Engine(m16, tok)
    dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(e16.state)}
    assert all(d == jnp.bfloat16 for k, d in dtypes.items() if "kernel" in k) and dtypes["['wte'].value"] == jnp.float32
    prompt = tok.encode("the cat sat", prepend="<|bos|>")
    l32, l16 = (e._start([prompt], 1, 8, 0)[0].logits[0] for e in (e32, e16))
    assert float(jnp.abs(l32 - l16).max()) < 0.1 * float(jnp.abs(l32).max())

"""The inference engine: a jitted prefill and an on-device `lax.while_loop` decode over a preallocated KV cache.

One path serves sampling during training, evaluation, RL rollouts, the CLI and the web server.

- Prefill: one jitted call over the prompts, left-padded to a power-of-two bucket (one compile per bucket), so all
  rows end at the same slot and decode in lockstep. Each prompt is prefilled once, and its K/V stay a read-only
  shared prefix of the cache (see `KVCache`): the `num_samples` rows that continue it hold only the slots they
  write after it (max_tokens, or the rest of the context for the single-row chat cache), and a decode step reads
  each prompt's K/V once per group of rows (one matmul per prompt and kv head) instead of once per row.
- Decode: the step and loop of `jaxchat.decoding`, the server's too, over these fixed rows: every row has the same
  temperature and top-k, the key fold_in(seed, row) and the budget max_tokens; tool calls exit the loop, the host
  runs the tool and queues its output as the row's forced tokens (mask 0, counted toward `max_tokens`), and the
  loop is entered again. Rows without tool calls wait only for that round trip.
- Streaming: `generate` runs the same loop for `stream_every` steps per call and yields token columns;
  `generate_batch` runs it to the end. A single-row `generate` keeps its cache, and a later prompt that extends the
  previous prompt + reply (the next chat turn) prefills only the new tokens.
"""

import ast
import operator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxchat import sharding
from jaxchat.common import pad_bucket
from jaxchat.decoding import (MIN_BUCKET, MIN_ROWS, decode_loop, decoding_weights, empty_rows, queue_tool_outputs,
                              special_tokens)
from jaxchat.kv_cache import KVCache
from jaxchat.sampling import MAX_TOP_K


@partial(jax.jit, static_argnames=("graphdef", "rows", "max_len"))
def _prefill(graphdef, state, tokens, start, rows, max_len):
    """Left-padded prompts (P, T) into a fresh cache (attention over the T prompt slots only), which becomes the
    shared prefix of `rows` rows (rows / P per prompt, prompt-major; with P = 1, a multiple of MIN_ROWS) with
    max_len empty slots each. Returns the rows' last logits and the cache."""
    model = nnx.merge(graphdef.value, state)
    P, T = tokens.shape
    cache = KVCache.create(model.config, P, T, jnp.dtype(model.config.compute_dtype), start)
    logits, cache = model.decode(tokens, cache, at=T - 1)
    if P == 1:  # as with rows, a prefix of one prompt makes XLA:CPU copy it every step: hold it twice
        twice = lambda t: tuple(jnp.repeat(x, MIN_ROWS, axis=0) for x in t)
        cache = cache.replace(k=twice(cache.k), v=twice(cache.v), start=twice((cache.start,))[0],
                              embed=None if cache.embed is None else twice((cache.embed,))[0])
    logits = jnp.repeat(logits, rows // P, axis=0)
    return jax.tree.map(sharding.constrain_rows, (logits, cache.as_prefix(rows, max_len)))


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _extend(graphdef, state, cache, tokens, n_real):
    """Feed tokens (B, T) at the cache's next slot; the first n_real columns are real, the rest right-padding
    (written, but overwritten before anything reads them)."""
    last, cache = nnx.merge(graphdef.value, state).decode(tokens, cache, at=n_real - 1)
    return last, cache.replace(index=cache.index - tokens.shape[1] + n_real)


@partial(jax.jit, static_argnames=("rows",))
def _row_keys(key, rows):
    """Each row's key data: fold_in(key, row)."""
    return jax.random.key_data(jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(rows)))


@partial(jax.jit, static_argnames=("graphdef", "ids"), donate_argnames=("rows",))
def _decode(graphdef, ids, state, rows, stop):
    """`decoding.decode_loop` over every row until column `stop`."""
    return decode_loop(nnx.merge(graphdef.value, state), ids, rows, stop)


def prefill_shape(n_prompts, num_samples, longest):
    """(prompts P, their bucket length T, decode rows) of a prefill of n_prompts prompts of up to `longest` tokens,
    num_samples rows each, under the active mesh: P and the rows padded to whole rows per device."""
    P, T = sharding.round_up_to_shards(n_prompts), pad_bucket(longest, minimum=MIN_BUCKET)
    rows = max(P * num_samples, sharding.round_up_to_shards(MIN_ROWS))
    rows += -rows % (P * (MIN_ROWS if P == 1 else 1))  # whole groups of rows per prefix copy
    return P, T, rows


class Engine:
    def __init__(self, model, tokenizer, tool=None, replicate_weights=True):
        """tool(code: str) -> str | None runs a closed python block (default: nanochat's calculator).
        Calls run under the caller's mesh (`jax.set_mesh`), if any: rows are sharded over its batch axes; the
        weights (16-bit kernels in a 16-bit model) are replicated on every device of the mesh set when the engine is
        built, or with replicate_weights=False stay as the model holds them (FSDP). Replicated, they are gathered
        once; sharded, every decode step gathers them all again (a d20 on 8 GPUs: 0.9 GiB per device per token, a
        rollout's whole time), which only a model too large to hold whole on each device should pay."""
        self.model, self.tokenizer = model, tokenizer
        self.tool = tool or use_calculator
        self.graphdef, self.state = decoding_weights(model, replicate_weights)
        self.ids = special_tokens(tokenizer)
        self._held = None  # (tokens in the cache, Rows) of the last single-row generate, for the next turn

    def _start(self, prompts, num_samples, max_tokens, seed, temperature=1.0, top_k=None, keep_cache=False):
        """Prefill and build the decode rows of len(prompts)·num_samples rows (padded to the mesh; the padding rows
        are not live). Returns (rows, columns to decode)."""
        config = self.model.config
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: a prompt starts with <|bos|>")
        longest = max(map(len, prompts))
        if longest > config.sequence_len:
            raise ValueError(f"prompt of {longest} tokens is longer than the model's context ({config.sequence_len})")
        if not 0 <= (top_k or 0) <= MAX_TOP_K:
            raise ValueError(f"top_k must be between 0 (off) and {MAX_TOP_K}; got {top_k}")
        if max_tokens is None:
            max_tokens = max(1, config.sequence_len - longest)
        held = self._reusable(prompts[0]) if keep_cache else None
        if held is not None:  # the next chat turn: prefill only the new tokens
            tail, cache = prompts[0][len(held[0]):], held[1].cache
            width = pad_bucket(len(tail), cache.max_len - int(cache.index), MIN_BUCKET)
            tokens = np.full((cache.start.shape[0], width), self.ids.bos, np.int32)
            tokens[:, :len(tail)] = tail  # row 0 is the chat; the others are padding rows, already done
            logits, cache = _extend(self.graphdef, self.state, cache, jnp.asarray(tokens), len(tail))
        else:
            P, T, rows = prefill_shape(len(prompts), num_samples, longest)
            tokens = np.full((P, T), self.ids.bos, np.int32)
            for i, p in enumerate(prompts):
                tokens[i, T - len(p):] = p  # left-pad: every row's last prompt token sits at slot T−1
            start = np.array([T - len(p) for p in prompts] + [0] * (P - len(prompts)), np.int32)
            max_len = max(max_tokens, config.sequence_len - T if keep_cache else 0)  # slots after the prompt
            logits, cache = _prefill(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(start), rows, max_len)
        B, n_cols = logits.shape[0], min(max_tokens, cache.max_len - int(cache.index))
        per_row = lambda x, dtype=np.int32: np.full((B,), x, dtype)
        rows = empty_rows(cache, logits, max(n_cols, 1), live=np.arange(B) < len(prompts) * num_samples,
                          temperature=per_row(temperature, np.float32), top_k=per_row(top_k or 0),
                          key=_row_keys(jax.random.key(seed), B), budget=per_row(n_cols))
        return rows, n_cols

    def _reusable(self, prompt):
        """The held single-row cache, if this prompt extends the tokens it holds and there is room to reply."""
        if self._held is None:
            return None
        held_tokens, rows = self._held
        extends = len(prompt) > len(held_tokens) and prompt[:len(held_tokens)] == held_tokens
        fits = int(rows.cache.index) + len(prompt) - len(held_tokens) < rows.cache.max_len
        return self._held if extends and fits else None

    def _run(self, rows, stop):
        """Decode up to column `stop`, serving tool calls on the way."""
        while True:
            rows = _decode(self.graphdef, self.ids, self.state, rows, stop)
            needs, n = sharding.to_host((rows.needs_tool, rows.n))
            if needs.any():
                out = sharding.to_host(rows.out)
                generated = {b: out[b, :n].tolist() for b in np.flatnonzero(needs)}
                rows = queue_tool_outputs(rows, generated, self.tool, self.tokenizer, self.ids)
            if not needs.any() or n >= stop:
                return rows

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, stream_every=1):
        """Stream (token_column, token_masks), lists of num_samples ints (mask 1 sampled, 0 forced or finished);
        finished rows repeat <|assistant_end|>. Ends when every row is done or after max_tokens columns.
        stream_every: decode steps per device call (1 = token by token)."""
        single = num_samples == 1
        rows, n_cols = self._start([list(tokens)], num_samples, max_tokens, seed, temperature, top_k, keep_cache=single)
        self._held, shown = None, 0  # a reused cache now lives in rows
        done, out = False, None
        while shown < n_cols and not done:
            rows = self._run(rows, min(shown + stream_every, n_cols))
            out, mask, n, live = sharding.to_host((rows.out, rows.out_mask, rows.n, rows.live))
            for t in range(shown, n):
                column = out[:num_samples, t]
                yield np.where(column < 0, self.ids.assistant_end, column).tolist(), mask[:num_samples, t].tolist()
            shown, done = n, not live[:num_samples].any()
        if single:  # runs only when the caller drained the stream
            self._held = (list(tokens) + (out[0, :shown].tolist() if shown else []), rows)

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Whole sequences: (results, masks), one per row: the prompt plus its generated tokens up to (not
        including) <|assistant_end|>/<|bos|>; masks are 0 on the prompt and on forced tokens. `tokens` is one
        prompt (num_samples rows) or a list of prompts (num_samples rows each, prompt-major)."""
        several = len(tokens) > 0 and not isinstance(tokens[0], (int, np.integer))
        prompts = [list(p) for p in tokens] if several else [list(tokens)]
        rows, n_cols = self._start(prompts, num_samples, max_tokens, seed, temperature, top_k)
        rows = self._run(rows, n_cols)
        out, mask, n = sharding.to_host((rows.out, rows.out_mask, rows.n))
        results, masks = [], []
        for row in range(len(prompts) * num_samples):
            prompt, gen = prompts[row // num_samples], out[row, :n].tolist()
            stop = next((i for i, t in enumerate(gen) if t in (self.ids.bos, self.ids.assistant_end, -1)), len(gen))
            results.append(prompt + gen[:stop])
            masks.append([0] * len(prompt) + mask[row, :stop].tolist())
        return results, masks


SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then "
                  "tomorrow will be", "The opposite of hot is", "My lord, I", "To be, or not to be"]


def sample_greedy(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=16):
    """Each prompt continued greedily in one batch (base_train and base_eval print them): prompt + continuation."""
    ids = [tokenizer.encode(p, prepend=tokenizer.get_bos_token_id()) for p in prompts]
    results, _ = Engine(model, tokenizer).generate_batch(ids, max_tokens=max_tokens, temperature=0.0)
    return [tokenizer.decode(r[1:]) for r in results]


# ------------------------------------------------------------------------------------------- the calculator
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_STRING_METHODS = {"count", "lower", "upper", "strip", "lstrip", "rstrip", "startswith", "endswith", "find"}
_DANGEROUS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals", "locals",
              "vars", "dir", "getattr", "setattr", "delattr", "hasattr")


def use_calculator(expr):
    """nanochat's calculator: arithmetic on numbers (+ − × / // and parentheses, no **), or string expressions
    with `.count(` (e.g. 'strawberry'.count('r')); commas are dropped first. Returns the value, or None when the
    expression is not allowed or fails. nanochat screens the text and then calls eval(); jaxchat keeps its string
    screen but walks the syntax tree itself, so only literals, these operators (** is not one of them) and a few
    size-preserving str methods can run — nothing can loop, allocate without bound, or reach a builtin."""
    expr = expr.replace(",", "")
    if not all(c in "0123456789*+-/.() " for c in expr):  # not arithmetic: a string expression
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
        if not set(expr) <= allowed or any(p in expr.lower() for p in _DANGEROUS) or ".count(" not in expr:
            return None
    try:
        return _evaluate(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def _evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(left, str) or isinstance(right, str):
            raise TypeError("no string arithmetic")
        return _ARITHMETIC[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _STRING_METHODS
            and not node.keywords):
        target = _evaluate(node.func.value)
        if not isinstance(target, str):
            raise TypeError("methods only on strings")
        return getattr(target, node.func.attr)(*[_evaluate(a) for a in node.args])
    raise ValueError(f"not allowed: {type(node).__name__}")

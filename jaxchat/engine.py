"""The inference engine: a jitted prefill and an on-device `lax.while_loop` decode over a preallocated KV cache.

One path serves sampling during training, evaluation, RL rollouts, the CLI and the web server.

- Prefill: one jitted call over the prompts, left-padded to a power-of-two bucket (one compile per bucket), so all
  rows end at the same slot and decode in lockstep. Each prompt is prefilled once, and its K/V stay a read-only
  shared prefix of the cache (see `KVCache`): the `num_samples` rows that continue it hold only the slots they
  write after it (max_tokens, or the rest of the context for the single-row chat cache), and a decode step reads
  each prompt's K/V once per group of rows (one matmul per prompt and kv head) instead of once per row.
- Decode: one jitted `lax.while_loop`. Each iteration picks every row's next token (a forced tool-output token if
  one is queued, else a sample from the row's logits with a key folded from (seed, row, step)), writes it to the
  output buffer, updates the row's state (done on `<|assistant_end|>`/`<|bos|>`, inside a python block or not),
  and feeds the token through the model, writing K/V in place at the shared cache slot.
- Tools: the device knows where each row's `<|python_start|>` was. When a row emits `<|python_end|>` inside a
  block, the loop exits: only then does the host run the tool on the decoded block, queue
  `<|output_start|> result <|output_end|>` into that row's forced-token buffer (mask 0, counted toward
  `max_tokens`), and re-enter the loop. Rows without tool calls wait only for that round trip.
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
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from jaxchat import sharding
from jaxchat.common import pad_bucket
from jaxchat.kv_cache import KVCache
from jaxchat.sampling import sample_next_token

MIN_BUCKET = 16  # shortest prefill length; prompts pad up to the next power of two
MIN_ROWS = 2  # with a single row XLA:CPU drops the batch dim and then copies the whole cache every step
MAX_FORCED = 64  # tool output tokens queued per call (longer results are cut)


@struct.dataclass
class DecodeState:
    cache: KVCache
    logits: jax.Array  # (B, V) fp32: next-token logits of each row
    out: jax.Array  # (B, N) int32: tokens picked so far
    out_mask: jax.Array  # (B, N) int32: 1 sampled, 0 forced or finished
    n: jax.Array  # () columns of `out` filled
    done: jax.Array  # (B,) bool
    py_start: jax.Array  # (B,) column of the open <|python_start|>, −1 outside a block
    needs_tool: jax.Array  # (B,) bool: block closed, the host must run the tool
    forced: jax.Array  # (B, MAX_FORCED) int32 tool-output tokens to feed
    forced_len: jax.Array  # (B,)
    forced_pos: jax.Array  # (B,)
    key: jax.Array


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
        cache = cache.replace(k=twice(cache.k), v=twice(cache.v), start=twice((cache.start,))[0])
    logits = jnp.repeat(logits, rows // P, axis=0)
    return jax.tree.map(sharding.constrain_rows, (logits, cache.as_prefix(rows, max_len)))


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _extend(graphdef, state, cache, tokens, n_real):
    """Feed tokens (B, T) at the cache's next slot; the first n_real columns are real, the rest right-padding
    (written, but overwritten before anything reads them)."""
    last, cache = nnx.merge(graphdef.value, state).decode(tokens, cache, at=n_real - 1)
    return last, cache.replace(index=cache.index - tokens.shape[1] + n_real)


@partial(jax.jit, static_argnames=("graphdef", "ids", "top_k"), donate_argnames=("ds",))
def _decode(graphdef, ids, state, ds, stop_n, temperature, top_k):
    """Decode until column stop_n, every row done, or a row needs the tool.
    ids: (bos, assistant_end, python_start, python_end); finished rows emit assistant_end."""
    bos, end, py_open, py_close = ids
    model = nnx.merge(graphdef.value, state)
    rows = jnp.arange(ds.done.shape[0])

    def step(s):
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(s.key, r), s.n))(rows)
        sampled = sample_next_token(s.logits, keys, temperature, top_k)
        is_forced = s.forced_pos < s.forced_len
        forced_tok = jnp.take_along_axis(s.forced, jnp.minimum(s.forced_pos, MAX_FORCED - 1)[:, None], 1)[:, 0]
        live = ~s.done
        tok = jnp.where(live, jnp.where(is_forced, forced_tok, sampled), end)
        logits, cache = model.decode(tok[:, None], s.cache)
        column = lambda buf, x: jax.lax.dynamic_update_slice(buf, x.astype(jnp.int32)[:, None], (0, s.n))
        return jax.tree.map(sharding.constrain_rows, s.replace(
            cache=cache, logits=logits[:, 0], out=column(s.out, tok), out_mask=column(s.out_mask, live & ~is_forced),
            n=s.n + 1, done=s.done | (live & ((tok == end) | (tok == bos))),
            py_start=jnp.where(live & (tok == py_open), s.n, s.py_start),
            needs_tool=live & (tok == py_close) & (s.py_start >= 0),
            forced_pos=s.forced_pos + (live & is_forced)))

    keep_going = lambda s: (s.n < stop_n) & ~jnp.all(s.done) & ~jnp.any(s.needs_tool)
    return jax.lax.while_loop(keep_going, step, ds)


class _HashedOnce:
    """A jit static argument whose hash is computed once (an NNX GraphDef re-hashes its whole tree on every call)."""

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _HashedOnce) and (self.value is other.value or self.value == other.value)


def tool_output_tokens(tool, tokenizer, code, output_ids):
    """The tokens a closed python block's row is fed next: <|output_start|> the tool's result <|output_end|> (cut
    to MAX_FORCED), or none when there is no code or the tool returns None. A tool that raises never stops the
    decoding: the model sees the error as the result."""
    if not code:
        return []
    try:
        result = tool(tokenizer.decode(code))
    except Exception as e:
        result = f"Error: {type(e).__name__}: {e}"
    return [] if result is None else [output_ids[0], *tokenizer.encode(str(result))[:MAX_FORCED - 2], output_ids[1]]


def decoding_weights(model, replicate=False):
    """(graphdef, state) to decode with: kernels in the 16-bit compute dtype when there is one (decoding reads every
    matrix per token); with `replicate`, every weight on every device of the caller's mesh (no per-token
    all-gathers; fits models up to a few B), else as the model holds them (FSDP)."""
    graphdef, state = nnx.split(model)
    dtype = jnp.dtype(model.config.compute_dtype)
    if dtype.itemsize < 4:
        cast = lambda path, x: x.astype(dtype) if "kernel" in jax.tree_util.keystr(path) else x
        state = jax.tree_util.tree_map_with_path(cast, state)
    if replicate and not (mesh := jax.sharding.get_mesh()).empty:
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return _HashedOnce(graphdef), state


class Engine:
    def __init__(self, model, tokenizer, tool=None, replicate_weights=False):
        """tool(code: str) -> str | None runs a closed python block (default: nanochat's calculator).
        Calls run under the caller's mesh (`jax.set_mesh`), if any: rows are sharded over its batch axes; weights
        stay as the model holds them (FSDP), or, with replicate_weights, are replicated on every device of the mesh
        set when the engine is built (no per-token all-gathers; fits models up to a few B)."""
        self.model, self.tokenizer = model, tokenizer
        self.tool = tool or use_calculator
        self.graphdef, self.state = decoding_weights(model, replicate_weights)
        special = tokenizer.encode_special
        self.bos, self.assistant_end = tokenizer.get_bos_token_id(), special("<|assistant_end|>")
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_ids = (special("<|output_start|>"), special("<|output_end|>"))
        self._held = None  # (tokens in the cache, DecodeState) of the last single-row generate, for the next turn

    def _start(self, prompts, num_samples, max_tokens, seed, keep_cache=False):
        """Prefill and build the decode state of len(prompts)·num_samples rows (padded to the mesh).
        Returns (state, columns to decode)."""
        config = self.model.config
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: a prompt starts with <|bos|>")
        longest = max(map(len, prompts))
        if longest > config.sequence_len:
            raise ValueError(f"prompt of {longest} tokens is longer than the model's context ({config.sequence_len})")
        if max_tokens is None:
            max_tokens = max(1, config.sequence_len - longest)
        held = self._reusable(prompts[0]) if keep_cache else None
        if held is not None:  # the next chat turn: prefill only the new tokens
            tail, cache = prompts[0][len(held[0]):], held[1].cache
            width = pad_bucket(len(tail), cache.max_len - int(cache.index), MIN_BUCKET)
            tokens = np.full((cache.start.shape[0], width), self.bos, np.int32)
            tokens[:, :len(tail)] = tail  # row 0 is the chat; the others are padding rows, already done
            logits, cache = _extend(self.graphdef, self.state, cache, jnp.asarray(tokens), len(tail))
        else:
            P, T = sharding.round_up_to_shards(len(prompts)), pad_bucket(longest, minimum=MIN_BUCKET)
            rows = max(P * num_samples, sharding.round_up_to_shards(MIN_ROWS))
            rows += -rows % (P * (MIN_ROWS if P == 1 else 1))  # whole groups of rows per prefix copy
            tokens = np.full((P, T), self.bos, np.int32)
            for i, p in enumerate(prompts):
                tokens[i, T - len(p):] = p  # left-pad: every row's last prompt token sits at slot T−1
            start = np.array([T - len(p) for p in prompts] + [0] * (P - len(prompts)), np.int32)
            max_len = max(max_tokens, config.sequence_len - T if keep_cache else 0)  # slots after the prompt
            logits, cache = _prefill(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(start), rows, max_len)
        B, n_cols = logits.shape[0], min(max_tokens, cache.max_len - int(cache.index))
        zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
        ds = DecodeState(cache=cache, logits=logits, out=zeros(B, max(n_cols, 1)), out_mask=zeros(B, max(n_cols, 1)),
                         n=jnp.zeros((), jnp.int32), done=jnp.arange(B) >= len(prompts) * num_samples,
                         py_start=jnp.full((B,), -1, jnp.int32), needs_tool=jnp.zeros((B,), bool),
                         forced=zeros(B, MAX_FORCED), forced_len=zeros(B), forced_pos=zeros(B),
                         key=jax.random.key(seed))
        return ds, n_cols

    def _reusable(self, prompt):
        """The held single-row cache, if this prompt extends the tokens it holds and there is room to reply."""
        if self._held is None:
            return None
        held_tokens, ds = self._held
        extends = len(prompt) > len(held_tokens) and prompt[:len(held_tokens)] == held_tokens
        fits = int(ds.cache.index) + len(prompt) - len(held_tokens) < ds.cache.max_len
        return self._held if extends and fits else None

    def _run(self, ds, stop_n, temperature, top_k):
        """Decode up to column stop_n, serving tool calls on the way."""
        ids = (self.bos, self.assistant_end, self.python_start, self.python_end)
        while True:
            ds = _decode(self.graphdef, ids, self.state, ds, stop_n, float(temperature), top_k or None)
            needs, n = sharding.to_host((ds.needs_tool, ds.n))
            if needs.any():
                ds = self._serve_tools(ds, needs)
            if not needs.any() or n >= stop_n:
                return ds

    def _serve_tools(self, ds, needs):
        """Run the tool on every closed python block; queue its output as forced tokens of that row."""
        out, py_start, forced, forced_len, forced_pos = map(np.array, sharding.to_host(  # writable copies
            (ds.out, ds.py_start, ds.forced, ds.forced_len, ds.forced_pos)))
        n = int(ds.n)
        for b in np.flatnonzero(needs):
            toks = tool_output_tokens(self.tool, self.tokenizer, out[b, py_start[b] + 1:n - 1].tolist(),
                                      self.output_ids)
            if toks:
                forced[b, :len(toks)], forced_len[b], forced_pos[b] = toks, len(toks), 0
            py_start[b] = -1
        return ds.replace(forced=jnp.asarray(forced), forced_len=jnp.asarray(forced_len),
                          forced_pos=jnp.asarray(forced_pos), py_start=jnp.asarray(py_start),
                          needs_tool=jnp.zeros_like(ds.needs_tool))

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, stream_every=1):
        """Stream (token_column, token_masks), lists of num_samples ints (mask 1 sampled, 0 forced or finished);
        finished rows repeat <|assistant_end|>. Ends when every row is done or after max_tokens columns.
        stream_every: decode steps per device call (1 = token by token)."""
        single = num_samples == 1
        ds, n_cols = self._start([list(tokens)], num_samples, max_tokens, seed, keep_cache=single)
        self._held, shown = None, 0  # a reused cache now lives in ds
        done, out = False, None
        while shown < n_cols and not done:
            ds = self._run(ds, min(shown + stream_every, n_cols), temperature, top_k)
            out, mask, n, done_rows = sharding.to_host((ds.out, ds.out_mask, ds.n, ds.done))
            for t in range(shown, n):
                yield out[:num_samples, t].tolist(), mask[:num_samples, t].tolist()
            shown, done = n, done_rows[:num_samples].all()
        if single:  # runs only when the caller drained the stream
            self._held = (list(tokens) + (out[0, :shown].tolist() if shown else []), ds)

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Whole sequences: (results, masks), one per row: the prompt plus its generated tokens up to (not
        including) <|assistant_end|>/<|bos|>; masks are 0 on the prompt and on forced tokens. `tokens` is one
        prompt (num_samples rows) or a list of prompts (num_samples rows each, prompt-major)."""
        several = len(tokens) > 0 and not isinstance(tokens[0], (int, np.integer))
        prompts = [list(p) for p in tokens] if several else [list(tokens)]
        ds, n_cols = self._start(prompts, num_samples, max_tokens, seed)
        ds = self._run(ds, n_cols, temperature, top_k)
        out, mask, n = sharding.to_host((ds.out, ds.out_mask, ds.n))
        results, masks = [], []
        for row in range(len(prompts) * num_samples):
            prompt, gen = prompts[row // num_samples], out[row, :n].tolist()
            stop = next((i for i, t in enumerate(gen) if t in (self.bos, self.assistant_end)), len(gen))
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

"""One decode step for the engine and the server: the rows' state, the special tokens, the step body and its loop,
and the host's half of a tool call.

`Engine` runs the loop over a fixed set of rows (the samples of its prompts); `SlotServer` over rows that requests
enter and leave between calls. Each row carries its own sampling settings, key, token budget and tool state, so
the step is the same for both:
- pick every live row's next token: a queued tool-output token if there is one, else a sample from its logits
  with its own temperature, top-k and top-p and the key fold_in(row key, tokens generated);
- write it to the output buffer (−1 for a row that is not live) and whether it was sampled;
- end the row on <|assistant_end|>/<|bos|> or its budget, track whether it is inside a python block;
- feed every row's token through the model (a row that is not live feeds <|assistant_end|>), K/V in place.
The loop stops at column `stop`, when no row is live, or when a row closes a python block: the host then runs the
tool on the block, queues `<|output_start|> result <|output_end|>` as that row's forced tokens and calls again.
"""
from collections import namedtuple
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from jaxchat import sharding
from jaxchat.kv_cache import KVCache
from jaxchat.sampling import sample_next_token

MIN_BUCKET = 16  # shortest prefill length; prompts pad up to the next power of two
MIN_ROWS = 2  # with a single row XLA:CPU drops the batch dim and then copies the whole cache every step
MAX_FORCED = 64  # tool output tokens queued per call (longer results are cut)

SpecialTokens = namedtuple("SpecialTokens", "bos assistant_end python_start python_end output_start output_end")


def special_tokens(tokenizer):
    """The ids the decode step and the tool calls need (hashable: a static argument of the jitted loops)."""
    special = tokenizer.encode_special
    return SpecialTokens(tokenizer.get_bos_token_id(), special("<|assistant_end|>"), special("<|python_start|>"),
                         special("<|python_end|>"), special("<|output_start|>"), special("<|output_end|>"))


@struct.dataclass
class Rows:
    cache: KVCache
    logits: jax.Array  # (B, V) fp32: next-token logits of each row
    live: jax.Array  # (B,) bool: the row is generating
    temperature: jax.Array  # (B,) fp32, 0 = greedy
    top_k: jax.Array  # (B,) int32, 0 = all
    top_p: jax.Array  # (B,) fp32, 1 = all
    key: jax.Array  # (B, 2) uint32 key data: the row's token t is sampled with fold_in(key, t)
    count: jax.Array  # (B,) int32: tokens generated so far (tool output included)
    budget: jax.Array  # (B,) int32: max tokens
    py_open: jax.Array  # (B,) bool: inside a <|python_start|> block
    needs_tool: jax.Array  # (B,) bool: the block just closed, the host must run the tool
    forced: jax.Array  # (B, MAX_FORCED) int32 tool-output tokens to feed
    forced_len: jax.Array  # (B,)
    forced_pos: jax.Array  # (B,)
    out: jax.Array  # (B, N) int32: the tokens, −1 where the row produced none
    out_mask: jax.Array  # (B, N) int32: 1 sampled, 0 forced or none
    n: jax.Array  # () columns of `out` filled


def empty_rows(cache, logits, out_len, **settings):
    """Rows over `cache` with these next-token logits, on the devices: none live, greedy, no budget, empty buffers,
    except for what `settings` gives (per-row numpy arrays by field name: live, temperature, top_k, key, budget…)."""
    B = logits.shape[0]
    zeros = lambda *shape, dtype=np.int32: np.zeros(shape, dtype)
    rows = Rows(cache=cache, logits=logits, live=zeros(B, dtype=bool), temperature=zeros(B, dtype=np.float32),
                top_k=zeros(B), top_p=np.ones((B,), np.float32), key=zeros(B, 2, dtype=np.uint32),
                count=zeros(B), budget=zeros(B), py_open=zeros(B, dtype=bool), needs_tool=zeros(B, dtype=bool),
                forced=zeros(B, MAX_FORCED), forced_len=zeros(B), forced_pos=zeros(B),
                out=np.full((B, out_len), -1, np.int32), out_mask=zeros(B, out_len), n=zeros())
    return _placed(rows.replace(**settings))


@partial(jax.jit, donate_argnums=0)
def _placed(rows):
    """Every row array with dim 0 over the mesh's batch axes, in one call: the numpy arrays are sent, the cache and
    logits (on several processes they span devices a plain device_put cannot take) keep their buffers (donated)."""
    return jax.tree.map(sharding.constrain_rows, rows)


def decode_loop(model, ids, rows, stop):
    """Decode steps (traced inside the caller's jit) until column `stop`, no row live, or a row needs the tool."""

    def step(s):
        keys = jax.vmap(lambda k, c: jax.random.fold_in(jax.random.wrap_key_data(k), c))(s.key, s.count)
        sampled = sample_next_token(s.logits, keys, s.temperature, s.top_k, s.top_p)
        is_forced = s.forced_pos < s.forced_len
        forced_tok = jnp.take_along_axis(s.forced, jnp.minimum(s.forced_pos, MAX_FORCED - 1)[:, None], 1)[:, 0]
        tok = jnp.where(s.live, jnp.where(is_forced, forced_tok, sampled), ids.assistant_end)
        logits, cache = model.decode(tok[:, None], s.cache)
        count = s.count + s.live
        ended = s.live & ((tok == ids.assistant_end) | (tok == ids.bos) | (count >= s.budget))
        opened = s.live & ~is_forced & (tok == ids.python_start)
        closed = s.live & ~is_forced & (tok == ids.python_end)
        column = lambda buf, x: jax.lax.dynamic_update_slice(buf, x.astype(jnp.int32)[:, None], (0, s.n))
        return jax.tree.map(sharding.constrain_rows, s.replace(
            cache=cache, logits=logits[:, 0], live=s.live & ~ended, count=count,
            py_open=(s.py_open | opened) & ~closed, needs_tool=closed & s.py_open & ~ended,
            forced_pos=s.forced_pos + (s.live & is_forced), out=column(s.out, jnp.where(s.live, tok, -1)),
            out_mask=column(s.out_mask, s.live & ~is_forced), n=s.n + 1))

    keep_going = lambda s: (s.n < stop) & jnp.any(s.live) & ~jnp.any(s.needs_tool)
    return jax.lax.while_loop(keep_going, step, rows)


def queue_tool_outputs(rows, generated, tool, tokenizer, ids):
    """Run the tool on each row's closed python block and queue its output as the row's next tokens.
    generated: {row: the tokens it generated so far, the last one the block's <|python_end|>}."""
    which = np.array(list(generated), np.int32)
    forced, forced_len = np.zeros((len(which), MAX_FORCED), np.int32), np.zeros(len(which), np.int32)
    for i, tokens in enumerate(generated.values()):
        start = len(tokens) - 1 - tokens[::-1].index(ids.python_start)  # the last <|python_start|>
        toks = tool_output_tokens(tool, tokenizer, tokens[start + 1:-1], (ids.output_start, ids.output_end))
        forced[i, :len(toks)], forced_len[i] = toks, len(toks)
    return rows.replace(forced=rows.forced.at[which].set(forced), forced_len=rows.forced_len.at[which].set(forced_len),
                        forced_pos=rows.forced_pos.at[which].set(0), needs_tool=rows.needs_tool.at[which].set(False))


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


class _HashedOnce:
    """A jit static argument whose hash is computed once (an NNX GraphDef re-hashes its whole tree on every call)."""

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _HashedOnce) and (self.value is other.value or self.value == other.value)


def decoding_weights(model, replicate=False):
    """(graphdef, state) to decode with: kernels in the 16-bit compute dtype when there is one (decoding reads every
    matrix per token); with `replicate`, every weight on every device of the caller's mesh (no per-token
    all-gathers; fits models up to a few B), else as the model holds them (FSDP)."""
    graphdef, state = nnx.split(model)
    state = decoding_dtypes(state, model.config.compute_dtype)
    if replicate and not (mesh := jax.sharding.get_mesh()).empty:
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return _HashedOnce(graphdef), state


def decoding_dtypes(state, compute_dtype):
    """A model state with its kernels in `compute_dtype` when that is 16-bit (the embedding stays as it is)."""
    dtype = jnp.dtype(compute_dtype)
    if dtype.itemsize == 4:
        return state
    cast = lambda path, x: x.astype(dtype) if "kernel" in jax.tree_util.keystr(path) else x
    return jax.tree_util.tree_map_with_path(cast, state)

"""Continuous batching for the web server: `slots` rows of one KV cache decoded together; a request is admitted into
a free row between device calls and leaves it the moment it ends.

- Cache: B rows × L = 1.25·sequence_len slots of one `KVCache` (kv_cache.py), written at one shared `index`. Row b
  holds its conversation in slots start[b]..index−1, and its RoPE positions are slot − start[b], so every row can be
  at a different length and its tokens can sit anywhere.
- Admission: a prompt is prefilled alone in a fresh one-row cache (left-padded to its power-of-two bucket: one
  compile per bucket) and its K/V copied into its row just below `index`. `index` ≥ sequence_len whenever the
  cache is in use, so any prompt fits below it.
- Decode: the step and loop of `jaxchat.decoding`, the engine's too, for up to `chunk` steps of all rows (several
  tokens per device call), each row with its request's temperature, top-k, top-p, seed and budget. The loop stops
  early when a row closes a python block (the host runs the tool and queues its output) or no row is live.
- Only what is used: a request takes the lowest free row, and a call decodes only the rows up to the last live one
  and attends only over the last slots the longest live conversation needs (power-of-two sizes of both, each
  compiled at start-up): a lightly loaded server, or one of short conversations, computes little.
- Room: when index + chunk would pass L, the rows in use move left by index − sequence_len slots; a live row holds
  at most sequence_len tokens, so none is lost.
- Host: one worker thread owns the device. Requests come in through `submit`, their tokens go back through each
  request's `emit` callback, and `cancel` (a closed connection, a stop string) frees the row before the next call.
"""
import dataclasses
import threading
import time
from collections import deque
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxchat import sharding
from jaxchat.common import pad_bucket
from jaxchat.decoding import (MIN_BUCKET, MIN_ROWS, decode_loop, decoding_weights, empty_rows, queue_tool_outputs,
                              special_tokens)
from jaxchat.engine import use_calculator
from jaxchat.kv_cache import KVCache

STOPPED = "the server is shutting down"  # SlotServer.failure after stop(); anything else is a failed decode loop


@partial(jax.jit, static_argnames=("graphdef",))
def _prefill_one(graphdef, state, tokens, start):
    """A left-padded prompt (1, T) alone: its last logits (V,), K/V per layer (n_kv_head, T, head_dim) and last
    embedding (n_embd,) for smear (None without)."""
    model = nnx.merge(graphdef.value, state)
    cache = KVCache.create(model.config, 1, tokens.shape[1], jnp.dtype(model.config.compute_dtype), start)
    logits, cache = model.decode(tokens, cache, at=tokens.shape[1] - 1)
    embed = None if cache.embed is None else cache.embed[0]
    return logits[0], tuple(k[0] for k in cache.k), tuple(v[0] for v in cache.v), embed


@partial(jax.jit, donate_argnames=("rows",))
def _admit(rows, row, logits, k, v, embed, prompt_len, temperature, top_k, top_p, seed, budget):
    """Copy a prefilled prompt's K/V (and last embedding) into `row` just below the shared index and make the row
    live."""
    T = k[0].shape[1]
    put = lambda cache, x: jax.lax.dynamic_update_slice(cache, x[None].astype(cache.dtype),
                                                         (row, 0, rows.cache.index - T, 0))
    cache = rows.cache.replace(k=tuple(map(put, rows.cache.k, k)), v=tuple(map(put, rows.cache.v, v)),
                               start=rows.cache.start.at[row].set(rows.cache.index - prompt_len),
                               embed=None if embed is None else rows.cache.embed.at[row].set(embed))
    at = lambda x, value: x.at[row].set(value)
    return rows.replace(cache=cache, logits=at(rows.logits, logits), live=at(rows.live, True),
                        temperature=at(rows.temperature, temperature), top_k=at(rows.top_k, top_k),
                        top_p=at(rows.top_p, top_p), key=at(rows.key, jax.random.key_data(jax.random.key(seed))),
                        count=at(rows.count, 0), budget=at(rows.budget, budget), py_open=at(rows.py_open, False),
                        needs_tool=at(rows.needs_tool, False), forced_len=at(rows.forced_len, 0),
                        forced_pos=at(rows.forced_pos, 0))


@partial(jax.jit, static_argnames=("active", "context"), donate_argnames=("rows",))
def _shift_left(rows, shift, active, context):
    """Move the first `active` rows' slots shift..shift+context−1 to the front (positions are relative to start, so
    they do not change; the rows past `active` are free, and nothing is read there before it is written again)."""
    c = rows.cache
    move = lambda x: jax.lax.dynamic_update_slice(
        x, jax.lax.dynamic_slice(x, (0, 0, shift, 0), (active, x.shape[1], context, x.shape[3])), (0, 0, 0, 0))
    return rows.replace(cache=c.replace(k=tuple(map(move, c.k)), v=tuple(map(move, c.v)), start=c.start - shift,
                                        index=c.index - shift))


@partial(jax.jit, static_argnames=("graphdef", "ids", "active", "window"), donate_argnames=("rows",))
def _decode_rows(graphdef, ids, state, rows, active, window):
    """Up to `chunk` = rows.out.shape[1] steps of the first `active` rows (the rest are free) over the last
    `window` − chunk slots and this call's chunk (every live row's tokens fit there): a lightly loaded server, or
    one with short conversations, computes only what it serves. Stops early when a row needs the tool or none is
    live. ids: the `SpecialTokens`."""
    model = nnx.merge(graphdef.value, state)
    c, lo = rows.cache, rows.cache.index + rows.out.shape[1] - window
    cut = lambda x: jax.lax.dynamic_slice(x, (0, 0, lo, 0), (active, x.shape[1], window, x.shape[3]))
    head = jax.tree.map(lambda x: x[:active] if x.ndim else x, rows.replace(cache=None))  # the rest is per row
    window_cache = c.replace(k=tuple(map(cut, c.k)), v=tuple(map(cut, c.v)), start=c.start[:active] - lo,
                             index=c.index - lo, embed=None if c.embed is None else c.embed[:active])
    head = head.replace(cache=window_cache, out=jnp.full_like(head.out, -1), out_mask=jnp.zeros_like(head.out_mask),
                        n=jnp.zeros((), jnp.int32))
    head = decode_loop(model, ids, head, head.out.shape[1])
    paste = lambda x, w: jax.lax.dynamic_update_slice(x, w, (0, 0, lo, 0))
    h = head.cache
    cache = c.replace(k=tuple(map(paste, c.k, h.k)), v=tuple(map(paste, c.v, h.v)),
                      start=c.start.at[:active].set(h.start + lo), index=h.index + lo,
                      embed=None if c.embed is None else c.embed.at[:active].set(h.embed))
    rest = jax.tree.map(lambda x, y: x.at[:active].set(y) if x.ndim else y, rows.replace(cache=None),
                        head.replace(cache=None))
    return rest.replace(cache=cache)


@dataclasses.dataclass(eq=False)
class Request:
    """One generation. `emit(tokens, finish)` is called from the worker thread with each piece of new tokens (tool
    output included) and, once, with finish "stop" (end of turn), "length" (max_tokens or the context), or
    "cancelled"."""
    prompt: list
    max_tokens: int
    emit: callable
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    tokens: list = dataclasses.field(default_factory=list)  # generated so far
    first_token_at: float | None = None
    cancelled: bool = False


def _tell(request, tokens, finish):
    """Hand tokens to a request's callback; one that fails (its client's event loop gone) cancels only its request,
    never the worker."""
    try:
        request.emit(tokens, finish)
    except Exception:
        request.cancelled = True


class QueueFull(Exception):
    """More requests are waiting than the server takes."""


class Stopped(Exception):
    """The server's worker has ended (stopped, or failed): nothing more will be served."""


def cache_shape(slots, chunk, context):
    """(rows, slots per row) of the server's cache under the active mesh. Rows: at least MIN_ROWS (XLA:CPU copies
    a one-row cache every step) and whole rows per device. Slots: the context and room past it, so that the rows
    shift left at most every context/4 steps (and never in mid-chunk)."""
    return sharding.round_up_to_shards(max(slots, MIN_ROWS)), context + max(chunk, context // 4)


class SlotServer:
    def __init__(self, model, tokenizer, slots=8, chunk=16, tool=None, max_waiting=64):
        """tool(code) -> str | None runs a closed python block (default: the calculator)."""
        self.model, self.tokenizer, self.tool = model, tokenizer, tool or use_calculator
        self.slots, self.chunk, self.max_waiting = slots, chunk, max_waiting
        self.context = model.config.sequence_len
        # Built under the caller's mesh (if any): rows split over its batch axes, every weight on every device.
        # The worker thread enters the same mesh (a mesh context belongs to its thread).
        self.mesh = jax.sharding.get_mesh()
        self.graphdef, self.state = decoding_weights(model, replicate=True)
        self.ids = special_tokens(tokenizer)
        shards = sharding.batch_shards()
        self.held, cache_len = cache_shape(slots, chunk, self.context)
        powers = [1 << i for i in range(self.held.bit_length()) if MIN_ROWS <= 1 << i < self.held]
        self.buckets = (powers if shards == 1 else []) + [self.held]  # rows decoded: the first bucket > the last live
        self.room = cache_len - self.context
        # Slots a call attends to: the longest live conversation plus the chunk, in a few sizes (one compile each).
        self.windows = [w for w in (1 << i for i in range(self.context.bit_length())) if 4 * chunk <= w < self.context]
        self.windows.append(self.context + chunk)
        self.index = self.context  # the cache's write index, as the host tracks it (no device round trip)
        self.rows = self._empty_rows()
        self.requests = [None] * self.held  # the request each row serves (rows past `slots` stay free)
        self.waiting = deque()
        self.lock = threading.Condition()
        self.generated_tokens = self.served = 0
        self._stop = False
        self._thread = None
        self.failure = None  # why the worker ended, when it did

    def _empty_rows(self):
        B, config = self.held, self.model.config
        cache = KVCache.create(config, B, self.context + self.room, jnp.dtype(config.compute_dtype))
        return empty_rows(cache.replace(index=jnp.asarray(self.context, jnp.int32)),
                          jnp.zeros((B, config.vocab_size), jnp.float32), self.chunk)

    # ---- the HTTP side's view (any thread) ----------------------------------------------------------------
    def submit(self, request):
        if not 0 < len(request.prompt) < self.context:
            raise ValueError(f"a prompt of {len(request.prompt)} tokens does not fit the context of {self.context}")
        with self.lock:
            if self.failure:
                raise Stopped(self.failure)
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self.lock.notify()

    def cancel(self, request):
        """Stop a request (its row is freed before the next device call); it gets no more tokens."""
        with self.lock:
            request.cancelled = True
            if request in self.waiting:
                self.waiting.remove(request)

    def stats(self):
        with self.lock:
            busy = sum(r is not None for r in self.requests)
            return {"slots": self.slots, "busy_slots": busy, "free_slots": self.slots - busy,
                    "queued_requests": len(self.waiting), "generated_tokens_total": self.generated_tokens,
                    "requests_served_total": self.served}

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="jaxchat-decode", daemon=True)
        self._thread.start()

    def stop(self):
        """End the worker: every request in flight or waiting is finished as "cancelled"."""
        with self.lock:
            self._stop = True
            self.lock.notify()
        if self._thread is not None:
            self._thread.join()

    def warm_up(self):
        """Before `start`: compile every call a request can need (each prompt bucket's prefill and admission, the
        decode of each row bucket and window, the shift), so no request waits for a compile."""
        lengths = sorted({min(pad_bucket(1 << i, self.context, MIN_BUCKET), self.context - 1)
                          for i in range(self.context.bit_length())})
        decodes = [(a, w) for a in self.buckets for w in self.windows]
        with jax.set_mesh(self.mesh), tqdm(total=len(lengths) + len(decodes), desc="compiling", leave=False) as bar:
            for n in lengths:
                finished = []
                self.submit(Request(prompt=[self.ids.bos] * n, max_tokens=1, emit=lambda t, f: f and finished.append(f)))
                while not finished:
                    self._step()
                bar.update()
            for active, window in decodes:  # no row is live: each call compiles and returns at once
                self.rows = _decode_rows(self.graphdef, self.ids, self.state, self.rows, active, window)
                bar.update()
            for active in self.buckets:
                self.rows = _shift_left(self.rows, jnp.zeros((), jnp.int32), active, self.context)
        self.generated_tokens = self.served = 0

    # ---- the worker ------------------------------------------------------------------------------------------
    def _loop(self):
        reason = "the decode loop failed"
        try:
            with jax.set_mesh(self.mesh):
                self._serve()
            reason = STOPPED
        except Exception as e:  # a device error: every request and /health say so, none hangs
            reason = f"the decode loop failed: {type(e).__name__}: {e}"
            raise
        finally:
            with self.lock:
                self.failure = reason
                pending = [r for r in self.requests if r is not None] + list(self.waiting)
                self.waiting.clear()
                self.requests = [None] * self.held
            for r in pending:
                _tell(r, [], "cancelled")

    def _serve(self):
        while True:
            with self.lock:
                while not self._stop and not self.waiting and all(r is None for r in self.requests):
                    self.lock.wait()
                if self._stop:
                    return
            self._step()

    def _step(self):
        """Free cancelled rows, admit waiting requests, make room, decode one chunk, hand out its tokens."""
        live = np.zeros(self.held, bool)
        with self.lock:
            for b, r in enumerate(self.requests):
                if r is not None and r.cancelled:
                    self.requests[b] = None
                    _tell(r, [], "cancelled")
            admit = []
            for b in range(self.slots):
                if self.requests[b] is None and self.waiting:
                    self.requests[b] = self.waiting.popleft()
                    admit.append(b)
            live[:] = [r is not None for r in self.requests]
        self.rows = self.rows.replace(live=self.rows.live & jnp.asarray(live))
        prefilled = {}  # prompt -> its prefill: the n choices of one request (or equal prompts) prefill once
        for b in admit:
            self._admit(b, self.requests[b], prefilled)
        if not live.any():
            return
        active = next(b for b in self.buckets if b > np.flatnonzero(live)[-1])
        if self.index + self.chunk > self.context + self.room:
            shift = jnp.asarray(self.index - self.context, jnp.int32)
            self.rows = _shift_left(self.rows, shift, active, self.context)
            self.index = self.context
        longest = max(len(r.prompt) + len(r.tokens) for r in self.requests if r is not None)
        window = next(w for w in self.windows if w >= longest + self.chunk)
        self.rows = _decode_rows(self.graphdef, self.ids, self.state, self.rows, active, window)
        out, n, still, needs = jax.device_get((self.rows.out, self.rows.n, self.rows.live, self.rows.needs_tool))
        self.index += int(n)
        generated = {}  # the rows whose python block just closed: their tokens, for the tool
        for b, r in enumerate(self.requests):
            if r is None:
                continue
            new = [int(t) for t in out[b, :n] if t >= 0]
            r.tokens += new
            if new and r.first_token_at is None:
                r.first_token_at = time.monotonic()
            finish = None if still[b] else ("stop" if new and new[-1] in self.ids[:2] else "length")
            if needs[b] and not r.cancelled:
                generated[b] = r.tokens
            with self.lock:
                self.generated_tokens += len(new)
                if finish:
                    self.requests[b] = None
                    self.served += 1
            if not r.cancelled:
                _tell(r, new, finish)
        if generated:
            self.rows = queue_tool_outputs(self.rows, generated, self.tool, self.tokenizer, self.ids)

    def _admit(self, b, r, prefilled):
        key = tuple(r.prompt)
        if key not in prefilled:
            T = pad_bucket(len(r.prompt), self.context, MIN_BUCKET)
            tokens = np.full((1, T), self.ids.bos, np.int32)
            tokens[0, T - len(r.prompt):] = r.prompt
            prefilled[key] = _prefill_one(self.graphdef, self.state, jnp.asarray(tokens),
                                          jnp.asarray([T - len(r.prompt)], jnp.int32))
        logits, k, v, embed = prefilled[key]
        budget = min(r.max_tokens, self.context - len(r.prompt))
        self.rows = _admit(self.rows, b, logits, k, v, embed, len(r.prompt), float(r.temperature), int(r.top_k),
                           float(r.top_p), int(r.seed) & 0x7FFFFFFF, budget)

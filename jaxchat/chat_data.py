"""Batches of conversations for the chat stages, with an exact resume state.

A source is any Task (or TaskMixture): conversations addressed by index, already in a seeded order. The loaders walk
it in index order, epoch after epoch, so their whole state is a few integers (and, when packing, the indices in the
packing buffer): a resumed run sees exactly the batches the uninterrupted run would have seen.

- `PackedLoader` (midtraining): rows of T+1 tokens, BOS-aligned best-fit packing of whole conversations (nanochat
  HEAD's SFT packing): each row takes the largest buffered conversation that still fits, and is padded when none
  does (a conversation is never split across rows); one longer than a row is cropped (counted).
- `PaddedLoader` (SFT): one conversation per row (nanochat OCT's SFT), rows padded to the longest conversation of
  the step rounded up to a power of two (few compiled shapes).

Targets are the next tokens, −1 where not supervised: padding always; with `supervise="assistant"` also every token
the mask of `render_conversation` leaves out (user turns, tool outputs); with "all" (nanochat's midtraining) every
real token.
"""
import numpy as np

from jaxchat.common import pad_bucket


class _Loader:
    """Walks the source by stream position (position p is conversation p mod len, in epoch p // len)."""

    def __init__(self, tokenizer, task, B, T, supervise, state):
        if supervise not in ("all", "assistant"):
            raise ValueError(f"supervise must be 'all' or 'assistant', got {supervise!r}")
        if len(task) == 0:
            raise ValueError("the conversation source is empty")
        self.tokenizer, self.task, self.B, self.T, self.supervise = tokenizer, task, B, T, supervise
        self.pad = tokenizer.get_bos_token_id()
        state = state or {}
        self.position, self.cropped, self.seen = state.get("position", 0), state.get("cropped", 0), state.get("seen", 0)

    @property
    def epoch(self):
        return self.position // len(self.task)

    def next_position(self):
        self.position += 1
        return self.position - 1

    def render(self, position):
        """(ids, supervised) of the conversation at a stream position, cropped to T+1 tokens (counted)."""
        ids, mask = self.tokenizer.render_conversation(self.task[position % len(self.task)], max_tokens=1 << 30)
        self.seen += 1
        if len(ids) > self.T + 1:
            self.cropped += 1
            ids, mask = ids[:self.T + 1], mask[:self.T + 1]
        supervised = [1] * len(ids) if self.supervise == "all" else mask
        return ids, supervised

    def rows_to_batch(self, rows, width):
        """rows: [(ids, supervised)] packed or single -> {"inputs", "targets"} (len(rows), width)."""
        inputs = np.full((len(rows), width), self.pad, np.int32)
        targets = np.full((len(rows), width), -1, np.int32)
        for r, (ids, supervised) in enumerate(rows):
            n = min(len(ids), width + 1)
            inputs[r, :n - 1] = ids[:n - 1]
            targets[r, :n - 1] = np.where(np.asarray(supervised[1:n]) == 1, ids[1:n], -1)
        return {"inputs": inputs, "targets": targets}

    def get_state(self):
        return {"position": self.position, "cropped": self.cropped, "seen": self.seen}


class PackedLoader(_Loader):
    def __init__(self, tokenizer, task, B, T, supervise="all", buffer_size=100, state=None):
        super().__init__(tokenizer, task, B, T, supervise, state)
        self.buffer_size = buffer_size
        self.buffer = {}  # stream position -> rendered conversation
        for position in (state or {}).get("buffer", []):
            self.buffer[position] = self.render(position)
        if state:
            self.cropped, self.seen = state["cropped"], state["seen"]  # re-rendering the buffer counted them again

    def _refill(self):
        while len(self.buffer) < self.buffer_size:
            position = self.next_position()
            self.buffer[position] = self.render(position)

    def _row(self):
        row, room = [], self.T + 1
        while True:
            self._refill()
            fits = [(len(ids), -p) for p, (ids, _) in self.buffer.items() if len(ids) <= room]
            if not fits:
                break
            _, neg = max(fits)  # the largest that fits; the earliest in stream order on ties
            ids, supervised = self.buffer.pop(-neg)
            row.append((ids, supervised))
            room -= len(ids)
        ids = [t for part, _ in row for t in part]
        supervised = []
        for part, sup in row:
            supervised += [0] + list(sup[1:])  # a row's first token is never a target; nor is a BOS after padding
        return ids, supervised

    def __next__(self):
        return self.rows_to_batch([self._row() for _ in range(self.B)], self.T)

    def next_stacked(self, accum):
        batches = [next(self) for _ in range(accum)]
        return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return {**super().get_state(), "buffer": sorted(self.buffer)}


class PaddedLoader(_Loader):
    def __init__(self, tokenizer, task, B, T, supervise="assistant", state=None):
        super().__init__(tokenizer, task, B, T, supervise, state)

    def next_stacked(self, accum):
        """(accum, B, W) with W the step's longest conversation rounded up to a power of two (at most T)."""
        rows = [self.render(self.next_position()) for _ in range(accum * self.B)]
        longest = max(len(ids) for ids, _ in rows) - 1
        width = pad_bucket(longest, self.T)
        batch = self.rows_to_batch(rows, width)
        return {k: v.reshape(accum, self.B, width) for k, v in batch.items()}

    def __next__(self):
        """One batch (B, W), as a step of one micro-batch (a val loss's)."""
        return {k: v[0] for k, v in self.next_stacked(1).items()}

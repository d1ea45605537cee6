"""The tokenizer: byte-level BPE trained in Rust (`tokenizer_rs/`), encoding through tiktoken, chat rendering.

The API follows nanochat's `RustBPETokenizer`. What differs, on purpose:
- saved as plain files, never pickle: `tokenizer.tiktoken` (base64 token, rank per line: tiktoken's own format),
  `tokenizer.json` (pattern, special tokens) and `token_bytes.npy` (the bits-per-byte denominator);
- `token_bytes` counts a token's raw bytes (nanochat's later fix; the first version counted U+FFFD for tokens that
  are partial UTF-8).
"""
import base64
import hashlib
import json
import os

import numpy as np
import tiktoken

from jaxchat.common import UserError, get_base_dir, write_atomic

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it; it also pads
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, forced into the sequence
]
# GPT-4's split pattern with \p{N}{1,2} instead of {1,3} (nanochat's choice: slightly better bpb at small vocab)
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")
FORMAT = "jaxchat-tokenizer-v1"
# every printable ASCII character, whitespace runs, accents, CJK, emoji: where a broken split pattern shows itself
PATTERN_PROBE = "".join(map(chr, range(32, 127))) + " \t\n\r\n  héllo 東京は晴れ 😀 2026 it's"
RANKS_FILE, META_FILE, TOKEN_BYTES_FILE = "tokenizer.tiktoken", "tokenizer.json", "token_bytes.npy"


class RustBPETokenizer:
    """A tiktoken Encoding plus the chat conventions; train with `train_from_iterator`, load with `from_directory`."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, pattern=SPLIT_PATTERN):
        from jaxchat import rustbpe
        n_bpe = vocab_size - len(SPECIAL_TOKENS)
        if n_bpe < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, n_bpe, pattern=pattern)
        pairs = trainer.get_mergeable_ranks()
        ranks = {bytes(token): rank for token, rank in pairs}
        assert len(ranks) == len(pairs), "the trainer produced two tokens with the same bytes"
        if len(ranks) < n_bpe:
            raise ValueError(f"the training text only supports {len(ranks) - 256} merges, {n_bpe - 256} were asked for "
                             f"(vocab_size {vocab_size}): use more text or a smaller vocab_size")
        return cls.from_ranks(ranks, pattern)

    @classmethod
    def from_ranks(cls, ranks, pattern=SPLIT_PATTERN, where="tokenizer", specials=None):
        """tiktoken's rank table (token bytes -> rank 0..n-1, the 256 single bytes first) and split pattern, the
        special tokens after it. `specials`: the {name: id} a file recorded, which must be that layout. Anything
        else (read from a damaged or foreign file: `where`) is one UserError."""
        if not (isinstance(ranks, dict) and all(type(t) is bytes and type(r) is int for t, r in ranks.items())
                and sorted(ranks.values()) == list(range(len(ranks)))
                and all(ranks.get(bytes([b])) == b for b in range(256))):
            raise UserError(f"{where}: not a rank table of token bytes -> 0..n-1 starting with the 256 single bytes")
        layout = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        if specials is not None and specials != layout:
            raise UserError(f"{where}: special tokens {specials} are not jaxchat's (nanochat's) {layout}")
        try:
            enc = tiktoken.Encoding(name="jaxchat", pat_str=pattern, mergeable_ranks=ranks, special_tokens=layout)
            enc.encode_ordinary(PATTERN_PROBE)  # a pattern that can match "" panics on use
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # the regex engine's refusal, or tiktoken's Rust panic (a BaseException)
            raise UserError(f"{where}: the split pattern {pattern!r} does not work with tiktoken "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """A tiktoken encoding such as "gpt2" or "cl100k_base", with <|endoftext|> as BOS (needs its vocab file)."""
        return cls(tiktoken.get_encoding(tiktoken_name), "<|endoftext|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        meta_path, ranks_path = os.path.join(tokenizer_dir, META_FILE), os.path.join(tokenizer_dir, RANKS_FILE)
        for path in (meta_path, ranks_path):
            if not os.path.exists(path):
                raise UserError(f"no tokenizer at {tokenizer_dir}: {path} is missing (train one with "
                                f"`python -m jaxchat.tok_train`)")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            assert isinstance(meta, dict) and meta.get("format") == FORMAT, f"not a {FORMAT} file"
            pattern, specials = meta["pattern"], meta["special_tokens"]
        except (ValueError, KeyError, AssertionError) as e:
            raise UserError(f"damaged or foreign tokenizer file {meta_path}: {e}") from None
        return cls.from_ranks(_read_ranks(ranks_path), pattern, f"damaged tokenizer {tokenizer_dir}", specials)

    def save(self, tokenizer_dir):
        """Write the ranks, the metadata and token_bytes as plain files (atomic per file)."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        n_bpe = self.enc.n_vocab - len(SPECIAL_TOKENS)
        lines = [base64.b64encode(self.enc.decode_single_token_bytes(i)).decode() + f" {i}\n" for i in range(n_bpe)]
        meta = {"format": FORMAT, "vocab_size": self.get_vocab_size(), "pattern": self.enc._pat_str,
                "special_tokens": {name: self.encode_special(name) for name in SPECIAL_TOKENS}}
        write_atomic(os.path.join(tokenizer_dir, RANKS_FILE), "".join(lines).encode())
        write_atomic(os.path.join(tokenizer_dir, META_FILE), (json.dumps(meta, indent=2) + "\n").encode())
        write_atomic(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE), lambda f: np.save(f, self.token_bytes()))

    # ---- basics -----------------------------------------------------------------------------------------------
    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def get_bos_token_id(self):
        return self.bos_token_id

    def token_bytes(self):
        """int32 [vocab]: each token's length in raw bytes, 0 for special tokens (the bits-per-byte denominator)."""
        special_ids = {self.encode_special(s) for s in self.get_special_tokens()}
        return np.array([0 if i in special_ids else len(self.enc.decode_single_token_bytes(i))
                         for i in range(self.get_vocab_size())], dtype=np.int32)

    def _special_or_id(self, token):
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Ordinary encoding (special-token strings in the text stay plain text); prepend/append an id or a special."""
        pre = [] if prepend is None else [self._special_or_id(prepend)]
        post = [] if append is None else [self._special_or_id(append)]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, list):
            return [pre + ids + post for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    # ---- chat -------------------------------------------------------------------------------------------------
    def render_conversation(self, conversation, max_tokens=2048):
        """Token ids and a 0/1 mask (1 = the assistant's supervised tokens) for one conversation.

        `conversation` is {"messages": [...]}; a leading system message is merged into the first user message;
        roles must alternate user/assistant; an assistant's content is a str or a list of parts
        {"type": "text"|"python"|"python_output", "text": ...}. Tool outputs are not supervised: at inference
        time the tool, not the model, writes them.
        """
        messages = _messages_of(conversation)
        if messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [{**messages[1], "content": merged}, *messages[2:]]
        ids, mask = [], []

        def add(token_ids, m):
            ids.extend(token_ids)
            mask.extend([m] * len(token_ids))

        def add_block(start, text, end, m):  # <|start|> text <|end|>, every token with mask m
            add([self.encode_special(start), *self.encode(text), self.encode_special(end)], m)

        add([self.get_bos_token_id()], 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message.get("role") != expected:
                raise ValueError(f"message {i} has role {message.get('role')!r}, expected {expected!r}: roles must "
                                 f"alternate user, assistant, user, ... (after an optional system message)")
            content = message.get("content")
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string, got {type(content).__name__}")
                add_block("<|user_start|>", content, "<|user_end|>", 0)
                continue
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise ValueError(f"message {i}: assistant content must be a string or a list of parts, "
                                 f"got {type(content).__name__}")
            add([self.encode_special("<|assistant_start|>")], 0)
            for part in content:
                kind, text = part.get("type"), part.get("text", "")
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add_block("<|python_start|>", text, "<|python_end|>", 1)
                elif kind == "python_output":
                    add_block("<|output_start|>", text, "<|output_end|>", 0)
                else:
                    raise ValueError(f"message {i}: unknown part type {kind!r} (text, python, python_output)")
            add([self.encode_special("<|assistant_end|>")], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation, max_tokens=None):
        """Ids that prime the assistant's reply: the conversation minus its last (assistant) message, then
        <|assistant_start|>. Used for RL and the chat evals. With max_tokens (the room a model has), a longer
        prompt keeps <|bos|> and its last max_tokens − 1 ids: the question and the reply's start are at the end."""
        messages = _messages_of(conversation)
        if messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation that ends with an assistant message")
        ids, _ = self.render_conversation({**conversation, "messages": messages[:-1]}, max_tokens=1 << 30)
        ids = ids + [self.encode_special("<|assistant_start|>")]
        return ids if max_tokens is None or len(ids) <= max_tokens else ids[:1] + ids[len(ids) - max_tokens + 1:]

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """Tokens coloured green (supervised) or red (not), for eyeballing a rendered conversation (nanochat's)."""
        green, red, reset = "\033[92m", "\033[91m", "\033[0m"
        return "|".join((green if m == 1 else red) + self.decode([t]) + (f"({t})" if with_token_id else "") + reset
                        for t, m in zip(ids, mask))

    # ---- identity ---------------------------------------------------------------------------------------------

    def fingerprint(self):
        """16 hex digits that change whenever a text's token ids could: a hash of the merge ranks, the split
        pattern, the special tokens with their ids and the BOS id. Computed from the object, not its files, so
        every saved copy of one tokenizer has the same fingerprint (checkpoints record it)."""
        h = hashlib.sha256()
        h.update(json.dumps({"pattern": self.enc._pat_str, "special_tokens": sorted(self.enc._special_tokens.items()),
                             "bos": self.bos_token_id}).encode())
        for token, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda item: item[1]):
            # length-prefixed so that no two different rank tables hash the same byte stream
            h.update(rank.to_bytes(4, "little") + len(token).to_bytes(4, "little") + token)
        return h.hexdigest()[:16]


def _messages_of(conversation):
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("a conversation is {'messages': [{'role': ..., 'content': ...}, ...]} with at least one message")
    return messages


def _read_ranks(path):
    """Parse tiktoken's text format, checking ranks run 0..n-1 in order (from_ranks checks the rest)."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                token_b64, rank = line.split()
                token, rank = base64.b64decode(token_b64, validate=True), int(rank)
            except ValueError:
                raise UserError(f"damaged tokenizer file {path}, line {lineno}: expected '<base64 token> <rank>'") from None
            if rank != len(ranks) or token in ranks:
                raise UserError(f"damaged tokenizer file {path}, line {lineno}: rank {rank} out of order or token repeated")
            ranks[token] = rank
    return ranks


def get_tokenizer(tokenizer_dir=None):
    return RustBPETokenizer.from_directory(tokenizer_dir or os.path.join(get_base_dir(), "tokenizer"))

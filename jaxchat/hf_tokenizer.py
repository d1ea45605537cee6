"""jaxchat's tokenizer as Hugging Face `tokenizers` files, and back.

Both sides are byte-level BPE; they differ in bookkeeping. tiktoken (jaxchat) keeps token bytes -> rank and
merges, within each regex-split piece, the adjacent pair whose concatenation has the lowest rank. `tokenizers`
keeps a vocabulary of printable strings (each byte mapped to one character, GPT-2's table) and an ordered list of
merge pairs. So a tiktoken rank table becomes: vocabulary = each token's string with its rank as id; merges =
every split of a token into two tokens, ordered by the merged token's rank (then the halves' ranks, to settle
which of two overlapping pairs merges first, as tiktoken's leftmost-lowest rule does). `ignore_merges` makes a
piece that is itself a token one token, as tiktoken does. Pre-tokenization: the same regex (Split, isolated),
then bytes to characters (ByteLevel without its own regex); the 9 special tokens follow the BPE vocabulary.

Going back, the ids are the ranks, which is only right when the merge list follows id order; `from_hf` checks
that, and then encodes a sample text both ways before it trusts the result.

The chat template (Jinja, as transformers' `apply_chat_template` runs it) renders a conversation to exactly the
ids of `render_conversation`, and with `add_generation_prompt` to those of `render_for_completion`: the system
message merged into the first user message, python tool calls and outputs as their special-token blocks.
"""
import json
import os

from jaxchat.common import UserError, write_atomic
from jaxchat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

TOKENIZER_JSON, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"

CHAT_TEMPLATE = """\
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] + '\\n\\n' -%}
  {%- set messages = messages[1:] -%}
{%- else -%}
  {%- set system = '' -%}
{%- endif -%}
<|bos|>
{%- for message in messages -%}
  {%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
    {{- raise_exception('roles must alternate user, assistant, user, ... after an optional system message') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    <|user_start|>{{ (system if loop.first else '') + message['content'] }}<|user_end|>
  {%- else -%}
    <|assistant_start|>
    {%- if message['content'] is string -%}
      {{ message['content'] }}
    {%- else -%}
      {%- for part in message['content'] -%}
        {%- if part['type'] == 'text' -%}
          {{ part['text'] }}
        {%- elif part['type'] == 'python' -%}
          <|python_start|>{{ part['text'] }}<|python_end|>
        {%- elif part['type'] == 'python_output' -%}
          <|output_start|>{{ part['text'] }}<|output_end|>
        {%- else -%}
          {{- raise_exception('unknown content part type ' + part['type']) -}}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    <|assistant_end|>
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|assistant_start|>
{%- endif -%}
"""

# What from_hf encodes both ways: the cases where byte-level tokenizers most often part ways.
SAMPLE = ("Hello world! It's 2026: 12345 + 678 = 13023.\n\n  indented\tcode()  \r\n"
          "déjà vu, naïve café; 東京は晴れ。 😀🚀 — “quotes” ‘and’ ...\n\n\n   trailing   ")


def byte_to_char():
    """GPT-2's table: each byte a printable character (the printable ones map to themselves, the others to
    256, 257, ... in byte order), so a vocabulary of byte strings can be JSON text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def hf_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` that encodes like `tokenizer` (a RustBPETokenizer with jaxchat's specials)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    chars = byte_to_char()
    as_text = lambda token: "".join(chars[b] for b in token)
    ranks = tokenizer.enc._mergeable_ranks
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], as_text(left), as_text(right)))
    merges.sort()
    model = BPE({as_text(token): rank for token, rank in ranks.items()}, [m[3:] for m in merges],
                ignore_merges=True, fuse_unk=False, byte_fallback=False)
    hf = Tokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    return hf


def save_hf_tokenizer(tokenizer, directory, max_len):
    """tokenizer.json and tokenizer_config.json (special tokens, the chat template, max length) in `directory`."""
    hf = hf_tokenizer(tokenizer)
    for name in SPECIAL_TOKENS:  # tokenizers appends added tokens after the vocabulary: the same ids as ours
        assert hf.token_to_id(name) == tokenizer.encode_special(name), name
    hf.save(os.path.join(directory, TOKENIZER_JSON))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
              "pad_token": "<|bos|>", "model_max_length": max_len, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    write_atomic(os.path.join(directory, TOKENIZER_CONFIG), (json.dumps(config, indent=2) + "\n").encode())


def from_hf(directory):
    """The RustBPETokenizer of a Hugging Face tokenizer.json that is byte-level BPE with a regex split and
    jaxchat's (nanochat's) 9 special tokens after the vocabulary; anything else is one UserError."""
    path = os.path.join(directory, TOKENIZER_JSON)
    if not os.path.exists(path):
        raise UserError(f"no {TOKENIZER_JSON} in {directory}")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model, pre, added = spec["model"], spec.get("pre_tokenizer") or {}, spec.get("added_tokens") or []
        vocab, merges = model["vocab"], model.get("merges") or []
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"damaged {path}: {e!r}") from None

    def refuse(why):
        return UserError(f"{path} is not a tokenizer jaxchat can use: {why}")

    if model.get("type") != "BPE" or spec.get("normalizer"):
        raise refuse(f"model {model.get('type')}, normalizer {spec.get('normalizer')}: jaxchat needs byte-level BPE "
                     f"without a normalizer")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if [s.get("type") for s in steps] != ["Split", "ByteLevel"] or steps[1].get("use_regex") \
            or steps[1].get("add_prefix_space") or steps[0].get("behavior") != "Isolated" or steps[0].get("invert") \
            or "Regex" not in (steps[0].get("pattern") or {}):
        raise refuse("the pre-tokenizer must be a regex Split (isolated) then ByteLevel without its own regex or "
                     "prefix space")
    pattern = steps[0]["pattern"]["Regex"]
    to_byte = {c: b for b, c in byte_to_char().items()}
    try:
        ranks = {bytes(to_byte[c] for c in text): i for text, i in vocab.items()}
    except KeyError as e:
        raise refuse(f"vocabulary entry with character {e} is not byte-level") from None
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)) or any(ranks.get(bytes([b])) != b for b in range(256)):
        raise refuse("the vocabulary's ids must run 0..n-1 and start with the 256 single bytes in order")
    specials = {t.get("content"): t.get("id") for t in added}
    expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        raise refuse(f"special tokens {specials} != nanochat's {expected}")
    by_text = {text: i for text, i in vocab.items()}
    last = -1
    for pair in merges:
        left, right = pair.split(" ", 1) if isinstance(pair, str) else pair
        merged = by_text.get(left + right)
        if merged is None or merged < last:
            raise refuse(f"merge {left!r} + {right!r} is {'not a token' if merged is None else 'out of id order'}: "
                         f"the ids are not the merge ranks")
        last = merged
    tokenizer = RustBPETokenizer.from_ranks(ranks, pattern)
    _same_ids(tokenizer, path)
    return tokenizer


def _same_ids(tokenizer, path):
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(path)
    text = SAMPLE + "<|bos|>" + SAMPLE  # a special token between two texts: both sides must split there
    ours = tokenizer.encode(SAMPLE) + [tokenizer.get_bos_token_id()] + tokenizer.encode(SAMPLE)
    theirs = hf.encode(text, add_special_tokens=False).ids
    if ours != theirs:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise UserError(f"{path}: tiktoken with these ranks encodes a sample text differently from the tokenizer "
                        f"itself (first difference at token {first}): not importable as is")

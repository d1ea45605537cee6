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
message merged into the first user message, python tool calls and outputs as their special-token blocks. Two differences cannot be written in a
template, since transformers tokenizes the rendered text as one string: the text of a special token inside a
message becomes that token there (jaxchat keeps it as plain text), and two text parts of one assistant message
in a row are encoded together (jaxchat encodes each part alone: a merge never crosses the boundary).
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
  {%- if not messages -%}
    {{- raise_exception('a system message must be followed by a user message') -}}
  {%- endif -%}
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

    def refuse(why):
        return UserError(f"{path} is not a tokenizer jaxchat can use: {why}")

    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or spec.get("normalizer"):
            raise refuse(f"model {model.get('type')}, normalizer {spec.get('normalizer')}: jaxchat needs byte-level "
                         f"BPE without a normalizer")
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        if [step.get("type") for step in steps] != ["Split", "ByteLevel"] or steps[1].get("use_regex") \
                or steps[1].get("add_prefix_space") or steps[0].get("behavior") != "Isolated" \
                or steps[0].get("invert") or "Regex" not in (steps[0].get("pattern") or {}):
            raise refuse("the pre-tokenizer must be a regex Split (isolated) then ByteLevel without its own regex or "
                         "prefix space")
        pattern, vocab = steps[0]["pattern"]["Regex"], model["vocab"]
        to_byte = {c: b for b, c in byte_to_char().items()}
        if not all(c in to_byte for text in vocab for c in text):
            raise refuse("the vocabulary is not byte-level (GPT-2's byte-to-character table)")
        ranks = {bytes(to_byte[c] for c in text): i for text, i in vocab.items()}
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        merges = [pair.split(" ", 1) if isinstance(pair, str) else pair for pair in model.get("merges") or []]
        merged_ids = [vocab.get(left + right) for left, right in merges]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise UserError(f"damaged {path}: {type(e).__name__}: {e}") from None
    tokenizer = RustBPETokenizer.from_ranks(ranks, pattern, path, specials)  # checks ids, specials, the pattern
    # tiktoken merges by token id (rank): right only when the merge list runs in id order
    for (left, right), merged, last in zip(merges, merged_ids, [-1, *merged_ids]):
        if merged is None or (last is not None and merged < last):
            raise refuse(f"merge {left!r} + {right!r} is {'not a token' if merged is None else 'out of id order'}: "
                         f"the ids are not the merge ranks")
    _same_ids(tokenizer, path)
    return tokenizer


def _same_ids(tokenizer, path):
    from tokenizers import Tokenizer
    try:
        hf = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers package raises plain Exceptions for what it cannot parse
        raise UserError(f"{path}: the tokenizers package cannot load it: {e}") from None
    text = SAMPLE + "<|bos|>" + SAMPLE  # a special token between two texts: both sides must split there
    ours = tokenizer.encode(SAMPLE) + [tokenizer.get_bos_token_id()] + tokenizer.encode(SAMPLE)
    theirs = hf.encode(text, add_special_tokens=False).ids
    if ours != theirs:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise UserError(f"{path}: tiktoken with these ranks encodes a sample text differently from the tokenizer "
                        f"itself (first difference at token {first}): not importable as is")

"""The Python face of the tokenizer: specials, encode/decode, save/load, token_bytes, chat rendering and masks."""
import os
import random

import numpy as np
import pytest

from jaxchat import rustbpe
from jaxchat.common import UserError
from jaxchat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer

VOCAB = 256 + len(SPECIAL_TOKENS) + 300


def make_corpus(n_docs=200, seed=0):
    rng = random.Random(seed)
    words = ["the", "model", "learns", "to", "predict", "next", "token", "hello", "world", "data", "byte", "pair",
             "encoding", "merges", "frequent", "pairs", "naïve", "café", "你好", "世界", "🙂", "later", "hello!"]
    syllables = ["ka", "lo", "mi", "tren", "str", "ous", "ing", "pa", "ve", "qu", "ell", "ark", "zo", "ion", "th"]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    docs = []
    for _ in range(n_docs):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
        docs.append(f"{sentence}. In {rng.randint(1900, 2030)} we had {rng.randint(0, 99999)} cases.\n\n  def f(x):\n\treturn x")
    return docs


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(make_corpus()), VOCAB)


def test_pattern_is_nanochats():
    assert SPLIT_PATTERN == rustbpe.GPT4_PATTERN
    assert r"\p{N}{1,2}" in SPLIT_PATTERN and "?+" in SPLIT_PATTERN and "++" in SPLIT_PATTERN


def test_vocab_and_specials(tok):
    assert tok.get_vocab_size() == VOCAB
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))  # V-9 .. V-1 in nanochat's order
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>") == VOCAB - 9
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)


@pytest.mark.parametrize("text", ["hello world", "naïve café 你好 🙂", "unseen tokens: zqxjkv", "  \t\n\n   x  \r\n",
                                  "🤖🤖 emoji 🙃 and ünïcödé ΩΣ", "12345678 3.14159 1e-10", ""])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_strings_are_plain_text(tok):
    ids = tok.encode("<|bos|>")
    assert len(ids) > 1 and tok.get_bos_token_id() not in ids
    assert tok.decode(ids) == "<|bos|>"


def test_prepend_append(tok):
    ids = tok.encode("hello world")
    bos = tok.get_bos_token_id()
    assert tok.encode("hello world", prepend="<|bos|>") == [bos] + ids
    assert tok.encode("hello world", prepend=bos, append="<|assistant_end|>") == [bos] + ids + [VOCAB - 5]
    assert tok.encode(["a b", "hello world"], prepend=bos) == [[bos] + tok.encode("a b"), [bos] + ids]


def test_batch_equals_single(tok):
    texts = make_corpus(20, seed=1) + ["naïve café 你好 🙂", ""]
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]
    with pytest.raises(TypeError):
        tok.encode(42)


def test_save_load_identical(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["token_bytes.npy", "tokenizer.json", "tokenizer.tiktoken"]
    tok2 = RustBPETokenizer.from_directory(tmp_path)
    texts = make_corpus(30, seed=2) + ["naïve café 你好 🙂 zqxjkv <|bos|>"]
    assert tok2.encode(texts) == tok.encode(texts)
    assert tok2.get_vocab_size() == VOCAB and tok2.get_bos_token_id() == tok.get_bos_token_id()
    np.testing.assert_array_equal(np.load(tmp_path / "token_bytes.npy", allow_pickle=False), tok.token_bytes())


def test_token_bytes_are_raw_byte_lengths(tok):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (VOCAB,)
    for i in range(VOCAB - 9):
        assert tb[i] == len(tok.enc.decode_single_token_bytes(i)) >= 1
    assert (tb[VOCAB - 9:] == 0).all()
    assert (tb[:256] == 1).all()
    # tokens that are partial UTF-8 (e.g. half of a CJK character) count their raw bytes, not U+FFFD's 3
    partial = [i for i in range(256, VOCAB - 9) if not _is_utf8(tok.enc.decode_single_token_bytes(i))]
    assert all(tb[i] == len(tok.enc.decode_single_token_bytes(i)) for i in partial)


def _is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_damaged_files_fail_clearly(tok, tmp_path):
    tok.save(tmp_path)
    ranks = tmp_path / "tokenizer.tiktoken"
    good = ranks.read_bytes()
    ranks.write_bytes(good.replace(b" 300\n", b" 7\n", 1))
    with pytest.raises(UserError, match="tokenizer.tiktoken, line 301"):
        RustBPETokenizer.from_directory(tmp_path)
    ranks.write_bytes(b"not base64!! x\n" + good)
    with pytest.raises(UserError, match="tokenizer.tiktoken, line 1"):
        RustBPETokenizer.from_directory(tmp_path)
    ranks.write_bytes(good)
    (tmp_path / "tokenizer.json").write_bytes(b"\x80\x04pickle?")
    with pytest.raises(UserError, match="tokenizer.json"):
        RustBPETokenizer.from_directory(tmp_path)
    with pytest.raises(UserError, match="missing"):
        RustBPETokenizer.from_directory(tmp_path / "nowhere")


def test_training_errors():
    with pytest.raises(ValueError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(iter(["abc"]), 200)
    with pytest.raises(ValueError, match="merges"):
        RustBPETokenizer.train_from_iterator(iter(["ab ab"]), 1000)


# ---- chat rendering (nanochat's rules) ----------------------------------------------------------------------------

def supervised(ids, mask):
    return [i for i, m in zip(ids, mask) if m == 1]


def test_render_basic_masks(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
                         {"role": "user", "content": "bye"}, {"role": "assistant", "content": "later"}]}
    ids, mask = tok.render_conversation(conv)
    sp = tok.encode_special
    assert len(ids) == len(mask) and ids[0] == tok.get_bos_token_id() and mask[0] == 0
    assert supervised(ids, mask) == tok.encode("hello!") + [sp("<|assistant_end|>")] + tok.encode("later") + [sp("<|assistant_end|>")]
    expected = ([tok.get_bos_token_id(), sp("<|user_start|>")] + tok.encode("hi") + [sp("<|user_end|>"), sp("<|assistant_start|>")]
                + tok.encode("hello!") + [sp("<|assistant_end|>"), sp("<|user_start|>")] + tok.encode("bye")
                + [sp("<|user_end|>"), sp("<|assistant_start|>")] + tok.encode("later") + [sp("<|assistant_end|>")])
    assert ids == expected
    for special in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>"):
        assert all(m == 0 for i, m in zip(ids, mask) if i == sp(special))


def test_render_system_message_merge(tok):
    with_system = {"messages": [{"role": "system", "content": "sys prompt"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "yo"}]}
    manual = {"messages": [{"role": "user", "content": "sys prompt\n\nhi"}, {"role": "assistant", "content": "yo"}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(manual)
    assert with_system["messages"][1]["content"] == "hi"  # the caller's conversation is not modified


def test_render_tool_parts(tok):
    conv = {"messages": [{"role": "user", "content": "what is 2+3?"}, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"}, {"type": "text", "text": "It is 5."}]}]}
    ids, mask = tok.render_conversation(conv)
    sp = tok.encode_special
    ps, pe, os_, oe = (ids.index(sp(s)) for s in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"))
    assert ps < pe < os_ < oe
    assert mask[ps:pe + 1] == [1] * (pe - ps + 1)          # the tool call is supervised
    assert ids[ps + 1:pe] == tok.encode("2+3")
    assert mask[os_:oe + 1] == [0] * (oe - os_ + 1)        # the tool's output is not
    assert ids[os_ + 1:oe] == tok.encode("5")
    assert supervised(ids, mask) == (tok.encode("Let me compute. ") + [sp("<|python_start|>")] + tok.encode("2+3")
                                     + [sp("<|python_end|>")] + tok.encode("It is 5.") + [sp("<|assistant_end|>")])


def test_render_truncation(tok):
    conv = {"messages": [{"role": "user", "content": "hello world " * 50}, {"role": "assistant", "content": "ok " * 50}]}
    ids, mask = tok.render_conversation(conv, max_tokens=32)
    full_ids, full_mask = tok.render_conversation(conv)
    assert len(ids) == len(mask) == 32 and ids == full_ids[:32] and mask == full_mask[:32]


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]}
    ids = tok.render_for_completion(conv)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    full, _ = tok.render_conversation(conv)
    assert full[:len(ids)] == ids and len(full) == len(ids) + len(tok.encode("four")) + 1
    assert len(conv["messages"]) == 2  # not modified


@pytest.mark.parametrize("messages,match", [
    ([], "at least one message"),
    ([{"role": "assistant", "content": "hi"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "html", "text": "x"}]}], "unknown part"),
    ([{"role": "user", "content": ["a"]}], "user content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], "string or a list"),
])
def test_render_bad_input(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_for_completion_needs_assistant_last(tok):
    with pytest.raises(ValueError, match="ends with an assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})

"""The CLI chat: one-shot and interactive turns equal the engine's greedy replies, `clear`, over-long messages."""

import dataclasses
import io
import os

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxchat import chat_cli, execution
from jaxchat.checkpoint_manager import Checkpointer, checkpoint_dir
from jaxchat.common import UserError, get_base_dir
from jaxchat.engine import Engine
from jaxchat.execution import python_tool
from jaxchat.model import GPT, GPTConfig
from jaxchat.tokenizer import RustBPETokenizer

from conftest import boundary_or_skip
from test_model import randomize

GREEDY = ["-i", "base", "-g", "tiny", "-t", "0", "-m", "20"]


@pytest.fixture
def model_and_tokenizer():
    """A tokenizer in the base dir and a random 2-layer model saved as base checkpoint 'tiny', step 1."""
    text = " ".join(f"hello world {i} the cat sat on the mat, number {i * 7}" for i in range(400))
    tok = RustBPETokenizer.train_from_iterator([text], 300)
    tok.save(os.path.join(get_base_dir(), "tokenizer"))
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = randomize(GPT(config, rngs=nnx.Rngs(0)), seed=4, scale=0.5)
    ckpt = Checkpointer(checkpoint_dir("base", "tiny"))
    ckpt.save(1, nnx.state(model), {"dummy": jnp.zeros(())}, {"model_config": dataclasses.asdict(config)}, tok)
    ckpt.close()
    return model, tok


def greedy_reply(model, tok, history, message):
    s = tok.encode_special
    prompt = history + [s("<|user_start|>"), *tok.encode(message), s("<|user_end|>"), s("<|assistant_start|>")]
    result, _ = Engine(model, tok).generate_batch(prompt, max_tokens=20, temperature=0.0)
    reply = result[0][len(prompt):]
    return prompt, reply, tok.decode(reply)


def test_one_shot_prompt(model_and_tokenizer):
    model, tok = model_and_tokenizer
    out = io.StringIO()
    replies = chat_cli.main(GREEDY + ["-p", "hello the cat"], out=out)
    _, _, want = greedy_reply(model, tok, [tok.get_bos_token_id()], "hello the cat")
    assert replies == [want] and out.getvalue() == f"Assistant: {want}\n"


def test_interactive_turns_clear_and_overlong(model_and_tokenizer):
    model, tok = model_and_tokenizer
    end = tok.encode_special("<|assistant_end|>")
    too_long = "number " * 80  # > 64 tokens: refused with a message, the chat goes on
    stdin = io.StringIO(f"hello world\n{too_long}\nthe cat sat\nclear\nthe cat sat\nquit\n")
    out = io.StringIO()
    replies = chat_cli.main(GREEDY, stdin=stdin, out=out)
    prompt1, reply1, text1 = greedy_reply(model, tok, [tok.get_bos_token_id()], "hello world")
    closed = reply1 + ([end] if reply1[-1:] != [end] else [])
    # turn 2 continues from the whole history (the CLI prefills only the new tokens; the result must be the same)
    _, _, text2 = greedy_reply(model, tok, prompt1 + closed, "the cat sat")
    _, _, text3 = greedy_reply(model, tok, [tok.get_bos_token_id()], "the cat sat")
    assert replies == [text1, text2, text3]
    assert "over the model's context of 64" in out.getvalue() and "Conversation cleared." in out.getvalue()
    assert out.getvalue().rstrip().endswith("Goodbye!")


def test_one_shot_errors_fit_the_mode(model_and_tokenizer):
    # an explicitly empty -p is an error, not a silent switch to interactive mode (refused before the model loads)
    for empty in ("", "  "):
        with pytest.raises(UserError, match="-p: the prompt is empty"):
            chat_cli.main(["-i", "base", "-g", "no_such_model", "-p", empty])
    # over the context with -p: nothing to type, so no 'clear' in the message
    with pytest.raises(UserError, match="over the model's context of 64: shorten it") as e:
        chat_cli.main(GREEDY + ["-p", "number " * 80], out=io.StringIO())
    assert "clear" not in str(e.value)


def test_python_tool_runs_in_the_sandbox(monkeypatch):
    boundary_or_skip()
    assert python_tool()("print(6 * 7)") == "42"
    assert python_tool()("1/0").startswith("Error: ZeroDivisionError")


def test_python_tool_without_the_sandbox_is_refused_at_start(monkeypatch):
    monkeypatch.setattr(execution, "boundary_problem", lambda: "bubblewrap is not installed")
    with pytest.raises(UserError, match="bubblewrap is not installed.*--unsafe-weak-sandbox"):
        chat_cli.main(["-g", "no_such_model", "--tool", "python", "-p", "hi"])  # before the model loads
    with pytest.raises(UserError, match="no_such_model"):  # opted out: it goes on to load the model
        chat_cli.main(["-g", "no_such_model", "--tool", "python", "--unsafe-weak-sandbox", "-p", "hi"])

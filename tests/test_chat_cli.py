"""The CLI chat: one-shot and interactive turns equal the engine's greedy replies, `clear`, over-long messages; bad
flags, closed streams and a reader that goes away end with one line or quietly, never a traceback."""

import dataclasses
import io
import os
import shlex
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxchat import chat_cli, execution
from jaxchat.checkpoint_manager import Checkpointer, checkpoint_dir
from jaxchat.common import UserError, get_base_dir
from jaxchat.engine import Engine
from jaxchat.execution import python_tool
from jaxchat.model import GPT, GPTConfig
from jaxchat.sampling import MAX_TOP_K
from jaxchat.tokenizer import RustBPETokenizer

from conftest import boundary_or_skip
from test_model import randomize

GREEDY = ["-i", "base", "-g", "tiny", "-t", "0", "-m", "20"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.slow
def test_one_shot_prompt(model_and_tokenizer):
    model, tok = model_and_tokenizer
    out = io.StringIO()
    replies = chat_cli.main(GREEDY + ["-p", "hello the cat"], out=out)
    _, _, want = greedy_reply(model, tok, [tok.get_bos_token_id()], "hello the cat")
    assert replies == [want] and out.getvalue() == f"Assistant: {want}\n"


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_bad_flags_are_one_argparse_line(capsys):
    """Before: -m 0 was an IndexError, -k 100000 a JAX ValueError, -t -1 sampled anyway; now argparse refuses each
    (status 2) with one line naming the flag and its range."""
    cases = [(["-m", "0"], "-m/--max-tokens/--max_tokens: must be ≥ 1; got 0"),
             (["-k", "100000"], f"-k/--top-k/--top_k: must be ≥ 0 and ≤ {MAX_TOP_K}; got 100000"),
             (["-t", "-1"], "-t/--temperature: must be ≥ 0; got -1"),
             (["-t", "nan"], "-t/--temperature: must be ≥ 0; got nan"),
             (["-s", "-2"], "-s/--step: must be ≥ 0; got -2"),
             (["--seed", str(2 ** 40)], f"--seed: must be ≥ 0 and ≤ {2 ** 31 - 1}; got {2 ** 40}")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            chat_cli.main(argv + ["-p", "hi"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.splitlines()[-1].endswith(f": error: argument {message}"), err


@pytest.mark.slow
def test_top_k_reaches_the_sampler(model_and_tokenizer):
    """-k 1 keeps only the likeliest token, so sampling at temperature 1 gives the greedy reply; the sampler's
    limit itself is accepted."""
    model, tok = model_and_tokenizer
    _, _, greedy = greedy_reply(model, tok, [tok.get_bos_token_id()], "hello the cat")
    top1 = chat_cli.main(["-i", "base", "-g", "tiny", "-t", "1", "-k", "1", "-m", "20", "-p", "hello the cat"],
                         out=io.StringIO())
    assert top1 == [greedy]
    assert chat_cli.build_parser().parse_args(["-k", str(MAX_TOP_K)]).top_k == MAX_TOP_K


def cli(args, shell_redirect="", **kw):
    """The CLI as a command (`python -m jaxchat.chat_cli`), optionally with a shell redirection such as `<&-`."""
    command = " ".join([shlex.quote(sys.executable), "-m", "jaxchat.chat_cli", *map(shlex.quote, args), shell_redirect])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    return subprocess.Popen(["bash", "-c", "exec " + command], env=env, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_closed_stdin_and_stdout_are_one_line():
    """Before: AttributeError tracebacks ('NoneType' has no readline / write). Now one line, status 1, before the
    model loads (no checkpoint is needed to see it)."""
    for args, redirect, message in [([], "<&-", "error: standard input is closed"),
                                    (["-p", "hi"], ">&-", "error: standard output is closed")]:
        proc = cli(["-g", "no_such_model", *args], redirect, stdout=subprocess.DEVNULL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and err.decode().count("\n") == 1 and err.decode().startswith(message), err


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_it_quietly(model_and_tokenizer):
    """`chat_cli | head`: before, a BrokenPipeError traceback; now no traceback and the status of a tool that
    SIGPIPE ended (128 + 13), as `head` leaves other tools."""
    proc = cli(GREEDY, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    seen, deadline = b"", time.monotonic() + 120
    while b"User: " not in seen and time.monotonic() < deadline:  # the model is loaded: the prompt is shown
        seen += os.read(proc.stdout.fileno(), 4096) or b""
    assert b"User: " in seen, seen
    proc.stdout.close()  # the reader goes away; the reply to this message has nowhere to go
    proc.stdin.write(b"hello the cat\n")
    proc.stdin.close()
    proc.wait(timeout=120)
    err = proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGPIPE and b"Traceback" not in err, err.decode()

"""The server's life: /health while the model loads, the command itself (a checkpoint served, then stopped by
SIGINT or SIGTERM), a full queue, a tool refused before serving, streams ended by stopping, a client leaving, a
decode loop that fails. The tiny random model and the server in a thread come from test_chat_web."""
import json
import socket
import threading
import time

import httpx
import pytest
from flax import nnx

from jaxchat.chat_web import create_app
from jaxchat.serving import Request, SlotServer

from test_chat_web import DEFAULTS, Served, greedy_text, serving
from test_chat_web import model_and_tokenizer  # noqa: F401 (a fixture: pytest finds it by name)

@pytest.mark.slow
def test_health_is_503_while_loading(model_and_tokenizer):
    loaded, release = threading.Event(), threading.Event()
    model, tok = model_and_tokenizer

    def make_server():
        release.wait(30)
        server = SlotServer(model, tok, slots=2, chunk=4)
        server.start()
        loaded.set()
        return server

    s = Served(create_app(make_server, "m", DEFAULTS))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.get(s.url + "/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        busy = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "not_ready"
        release.set()
        s.wait_ready()
        assert loaded.is_set()
    finally:
        release.set()
        s.stop()


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_the_command_serves_and_ctrl_c_ends_streams_cleanly(model_and_tokenizer, tmp_path, stop):
    """python -m jaxchat.chat_web on a saved checkpoint; Ctrl-C (or `kill`'s SIGTERM) with a stream open: the stream
    ends and the process says it stopped and exits 0 within seconds (the tiny model may finish first; the error
    event is checked in-process below)."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys

    import jax.numpy as jnp

    from jaxchat.checkpoint_manager import Checkpointer, checkpoint_dir
    from jaxchat.common import get_base_dir

    model, tok = model_and_tokenizer
    tok.save(os.path.join(get_base_dir(), "tokenizer"))
    ckpt = Checkpointer(checkpoint_dir("sft", "tiny"))
    ckpt.save(1, nnx.state(model), {"dummy": jnp.zeros(())}, {"model_config": dataclasses.asdict(model.config)}, tok)
    ckpt.close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "jaxchat.chat_web", "-i", "sft", "-g", "tiny", "-p", str(port),
                             "--slots", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hello the cat"}], "temperature": 0, "max_tokens": 20})
        assert reply.json()["choices"][0]["message"]["content"] == greedy_text(model, tok, "hello the cat")
        with httpx.stream("POST", url + "/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "hello"}], "temperature": 1.0, "max_tokens": 4096}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(getattr(signal, stop))
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest and ("shutting down" in rest[-1] or rest[-1] == 'data: {"done": true}')  # ended, either way
        assert proc.wait(15) == 0
        assert "jaxchat: stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_full_queue_is_503_with_the_reason(model_and_tokenizer):
    model, tok = model_and_tokenizer
    idle = SlotServer(model, tok, slots=2, chunk=4, max_waiting=1)  # never started: what is queued stays queued
    idle.submit(Request(prompt=[tok.get_bos_token_id()], max_tokens=4, emit=lambda t, f: None))
    with serving(idle) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full" and "waiting" in r.text
        assert idle.stats()["queued_requests"] == 1  # the refused request left nothing behind


def test_python_tool_without_the_sandbox_is_refused_before_serving(monkeypatch):
    from jaxchat import chat_web, execution
    from jaxchat.common import UserError

    monkeypatch.setattr(execution, "boundary_problem", lambda: "bubblewrap is not installed")
    with pytest.raises(UserError, match="bubblewrap is not installed.*--unsafe-weak-sandbox"):
        chat_web.main(["-g", "no_such_model", "--tool", "python"])


class SlowSlots(SlotServer):
    """A server whose every device call takes a while (a big model, in effect)."""

    def _step(self):
        time.sleep(0.2)
        super()._step()


@pytest.fixture
def slow(model_and_tokenizer):
    server = SlowSlots(*model_and_tokenizer, slots=2, chunk=1)
    server.warm_up()  # compiled now: the tests time what requests do, on however busy a machine
    server.start()
    return server


@pytest.mark.slow
def test_a_reply_not_streamed_is_cancelled_when_its_client_leaves(slow):
    with serving(slow) as s:
        with pytest.raises(httpx.ReadTimeout):  # ~50 tokens at 0.2 s each: the client gives up after 1 s
            httpx.post(s.url + "/v1/chat/completions", timeout=1.0, json={
                "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0, "max_tokens": 4096})
        deadline = time.monotonic() + 5
        while slow.stats()["busy_slots"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert slow.stats()["busy_slots"] == 0 and slow.stats()["generated_tokens_total"] < 40


@pytest.mark.slow
def test_stopping_ends_streams_in_flight_with_an_error_event(slow):
    with serving(slow) as s:
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=30, json={
                "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0, "stream": True}) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            next(lines)
            threading.Thread(target=slow.stop).start()  # what Ctrl-C does first
            rest = list(lines)
        assert "shutting down" in rest[-1] and json.loads(rest[-1][6:])["error"]["code"] == "unavailable"
        assert httpx.get(s.url + "/health").status_code == 503


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker's traceback
@pytest.mark.slow
def test_a_failed_decode_loop_is_503_everywhere_and_nothing_hangs(model_and_tokenizer):
    broken = SlotServer(*model_and_tokenizer, slots=2, chunk=4)

    def lost():
        raise RuntimeError("device lost")

    broken._step = lost
    broken.start()
    with serving(broken) as s:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        first = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=10)
        assert first.status_code == 503 and "device lost" in first.json()["error"]["message"]
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]
        again = httpx.post(s.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=10)
        assert again.status_code == 503 and "device lost" in again.json()["error"]["message"]

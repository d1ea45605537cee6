"""The server under abuse, with real sockets on 127.0.0.1 and a scripted stand-in for the engine (no model, no
device): the connection cap, the read timeout, header and body limits, every malformed value one 400 naming its
parameter on a connection that stays usable, 404/405/500 in OpenAI's shape, no traceback for a client that leaves,
/v1 replies that end at a special token. Every wait is bounded."""
import contextlib
import http.client
import json
import logging
import select
import socket
import threading
import time

import httpx
import openai
import pytest

from jaxchat.chat_api import MAX_BODY_BYTES, MAX_MESSAGES, MAX_TOTAL_CHARS, ApiError, parse_request, read_json
from jaxchat.chat_web import create_app
from jaxchat.http_limits import MAX_HEADER_BYTES, limited_http, raise_fd_limit
from jaxchat.tokenizer import RustBPETokenizer

from test_chat_web import DEFAULTS, Served

HELLO = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator([" ".join(f"hello world {i} the cat sat" for i in range(200))], 300)


class Scripted:
    """Stands in for SlotServer: every request gets `reply` (token ids), then finish "length"; `delay` seconds
    between its tokens (else all at once). Cancellations are recorded."""

    def __init__(self, tok, reply, delay=0.0):
        special = tok.encode_special
        self.tokenizer, self.reply, self.delay, self.cancelled = tok, reply, delay, []
        self.ids = (tok.get_bos_token_id(), special("<|assistant_end|>"), special("<|python_start|>"),
                    special("<|python_end|>"))
        self.slots, self.context, self.failure = 2, 64, None

    def submit(self, generation):
        def play():
            for i, t in enumerate(self.reply):
                time.sleep(self.delay)
                generation.emit([t], "length" if i == len(self.reply) - 1 else None)
        if self.delay:
            threading.Thread(target=play, daemon=True).start()
        else:
            generation.emit(list(self.reply), "length")

    def cancel(self, generation):
        self.cancelled.append(generation)

    def stats(self):
        return {"slots": self.slots, "busy_slots": 0}

    def stop(self):
        pass


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, level):
        return [r.getMessage() for r in self.records if r.levelno >= level]


@contextlib.contextmanager
def limited(slots, max_connections=50, read_timeout=5.0, max_body_bytes=MAX_BODY_BYTES):
    """The app behind the server's limits on a free port, ready; yields (served, log records of uvicorn.error)."""
    s = Served(create_app(lambda: slots, "m", DEFAULTS, max_body_bytes),
               http=limited_http(max_connections, read_timeout))
    logger, records = logging.getLogger("uvicorn.error"), Records()
    logger.addHandler(records)
    try:
        s.wait_ready()
        yield s, records
    finally:
        logger.removeHandler(records)
        s.stop()


def connect(s):
    return socket.create_connection(("127.0.0.1", s.port), timeout=5.0)


def read_all(sock):
    """Everything the server sends until it closes the connection (a socket timeout fails the test). A close with
    what this side sent still unread is a reset, after the data that came before it."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def response_of(raw):
    """(status, headers, JSON body) of one raw HTTP response with a Content-Length."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body[:int(headers["content-length"])])


def open_connections(s):
    return len(s.server.server_state.connections)


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_connections_past_the_cap_are_answered_503_at_once_and_logged(tok):
    with limited(Scripted(tok, tok.encode("hi")), max_connections=4, read_timeout=10) as (s, log):
        held = [connect(s) for _ in range(4)]
        wait_for(lambda: open_connections(s) == 4)
        extra, start = connect(s), time.monotonic()
        status, headers, body = response_of(read_all(extra))  # answered and closed, not held
        assert time.monotonic() - start < 2
        assert status == 503 and body["error"]["code"] == "too_many_connections" and headers["connection"] == "close"
        assert open_connections(s) == 4
        wait_for(lambda: any("refused 1 connection(s): 4 open" in line for line in log.lines(logging.WARNING)))
        held.pop().close()
        wait_for(lambda: open_connections(s) == 3)
        assert httpx.get(s.url + "/v1/models", timeout=5).status_code == 200  # room again
        for sock in held:
            sock.close()
        wait_for(lambda: open_connections(s) == 0)


def test_a_flood_of_idle_connections_stays_under_the_cap_and_expires(tok):
    """100 connections that send nothing against a cap of 20 and a 1 s read timeout: never more than 20 held, the
    rest refused (one log line for them all), the held ones closed (without a response: they asked nothing) after
    the timeout."""
    with limited(Scripted(tok, tok.encode("hi")), max_connections=20, read_timeout=1.0) as (s, log):
        socks = [connect(s) for _ in range(100)]
        peak = 0
        for sock in socks:
            peak = max(peak, open_connections(s))
        replies = [read_all(sock) for sock in socks]  # each ends within the timeout, or the 5 s recv timeout fails
        assert peak <= 20
        refused = [r for r in replies if r]
        assert len(refused) >= 80 and all(response_of(r)[0] == 503 for r in refused)
        assert replies.count(b"") >= 1 and open_connections(s) == 0
        assert len([line for line in log.lines(logging.WARNING) if "refused" in line]) == 1  # a line, not 80
        assert httpx.get(s.url + "/v1/models", timeout=5).status_code == 200
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("sent", [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",  # headers never end
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"messages": ',  # short body
    b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",  # answered 404 first, then the body is late
])
def test_a_request_that_does_not_arrive_whole_in_time_is_408_and_closed(tok, sent):
    with limited(Scripted(tok, tok.encode("hi")), read_timeout=1.0) as (s, log):
        sock, start = connect(s), time.monotonic()
        sock.sendall(sent)
        raw = read_all(sock)
        assert 0.9 < time.monotonic() - start < 3
        status, _, body = response_of(raw)
        if b"/nothing" in sent:  # its answer was already written: the late body only closes the connection
            assert status == 404 and raw.count(b"HTTP/1.1") == 1
        else:
            assert status == 408 and body["error"]["code"] == "request_timeout"
        wait_for(lambda: open_connections(s) == 0)
        assert log.lines(logging.ERROR) == []  # the handler waiting on the body saw a disconnect, no traceback


def test_a_trickled_request_is_cut_at_the_timeout_and_a_slow_reply_is_not(tok):
    """A request sent one byte per 0.2 s is cut at 1 s; a reply streamed for 2 s (the timeout is the request's,
    not the response's) and a keep-alive pause of 1.5 s between two requests are fine; a stray CRLF after them
    is a request that never arrives."""
    slow = Scripted(tok, tok.encode("hello world the cat sat") * 4, delay=0.1)
    assert len(slow.reply) >= 16
    with limited(slow, read_timeout=1.0) as (s, log):
        sock, start = connect(s), time.monotonic()
        request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        for byte in request:  # 7 s of it, unless the server answers first
            if select.select([sock], [], [], 0.2)[0]:
                break
            sock.sendall(bytes([byte]))
        assert response_of(read_all(sock))[0] == 408 and time.monotonic() - start < 3
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        start = time.monotonic()
        conn.request("POST", "/v1/chat/completions", json.dumps({**HELLO, "stream": True}),
                     {"Content-Type": "application/json"})
        events = conn.getresponse().read().decode()
        assert time.monotonic() - start > 1.5 and events.endswith("data: [DONE]\n\n")
        sock = conn.sock
        time.sleep(1.5)
        conn.request("GET", "/v1/models")
        r = conn.getresponse()
        assert r.status == 200 and r.read() and conn.sock is sock
        start = time.monotonic()
        sock.sendall(b"\r\n")  # bytes that start no request (stops uvicorn's keep-alive timer), then nothing
        assert response_of(read_all(sock))[0] == 408 and time.monotonic() - start < 3


def test_headers_over_the_limit_are_431(tok):
    with limited(Scripted(tok, tok.encode("hi"))) as (s, log):
        sock = connect(s)
        with contextlib.suppress(OSError):  # the server may close while this is still sending
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1000))
        status, _, body = response_of(read_all(sock))
        assert status == 431 and body["error"]["code"] == "headers_too_large"


def worst_valid_body():
    """The largest request chat_api takes: every message at its share of the characters, each character an emoji
    escaped as two \\uXXXX, and each message carrying 900 bytes of a field the server ignores."""
    per = MAX_TOTAL_CHARS // MAX_MESSAGES
    roles = ["system"] + ["user", "assistant"] * (MAX_MESSAGES // 2 - 1) + ["user"]
    messages = [{"role": role, "content": "😀" * per, "name": "n" * 900} for role in roles]
    return json.dumps({"messages": messages, "max_tokens": 8}).encode()


def test_bodies_larger_than_any_valid_request_are_413_before_they_are_read(tok):
    body = worst_valid_body()
    assert len(body) <= MAX_BODY_BYTES and parse_request(read_json(body), DEFAULTS).messages
    with limited(Scripted(tok, tok.encode("hi"))) as (s, log):
        big = httpx.post(s.url + "/v1/chat/completions", content=body, timeout=30)
        assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded"  # read, parsed

        sock, start = connect(s), time.monotonic()  # declares 300 MiB, sends none of it
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (300 << 20))
        status, headers, error = response_of(read_all(sock))
        assert status == 413 and error["error"]["code"] == "request_too_large" and headers["connection"] == "close"
        assert time.monotonic() - start < 2

        sock = connect(s)  # chunked: no length declared, counted as it arrives
        sock.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk, pending, sent = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16)), b"", 0
        while sent < 64 * MAX_BODY_BYTES and not select.select([sock], [], [], 0)[0]:
            if select.select([], [sock], [], 1)[1]:
                pending = pending or chunk
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    n = sock.send(pending)
                    pending, sent = pending[n:], sent + n
        assert response_of(read_all(sock))[0] == 413 and sent < 64 * MAX_BODY_BYTES

    with limited(Scripted(tok, tok.encode("hi")), max_body_bytes=100) as (s, log):  # the flag sets it
        r = httpx.post(s.url + "/v1/chat/completions", json={**HELLO, "pad": "x" * 100}, timeout=10)
        assert r.status_code == 413 and "100 bytes" in r.json()["error"]["message"]
        assert httpx.post(s.url + "/v1/chat/completions", json=HELLO, timeout=10).status_code == 200


NUMBERS = ["temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "n", "seed"]
NOT_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400]


def test_every_malformed_number_is_one_400_naming_it_on_a_connection_that_stays_open(tok):
    """NaN, ±Infinity and numbers too big for a float, in each numeric parameter, then JSON nested too deep: each a
    400 in OpenAI's shape naming what is wrong, all on one keep-alive connection, which then still serves."""
    for name in NUMBERS:
        for value in NOT_FINITE:
            with pytest.raises(ApiError) as e:
                parse_request(read_json(f'{{"messages": [{{"role": "user", "content": "hi"}}], "{name}": {value}}}'),
                              DEFAULTS)
            assert e.value.param == name and e.value.status == 400, (name, value)
    with limited(Scripted(tok, tok.encode("hello world"))) as (s, log):
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        conn.connect()
        sock = conn.sock
        for name in NUMBERS:
            for value in NOT_FINITE:
                conn.request("POST", "/v1/chat/completions",
                             f'{{"messages": [{{"role": "user", "content": "hi"}}], "{name}": {value}}}')
                r = conn.getresponse()
                error = json.loads(r.read())["error"]
                assert r.status == 400 and error["param"] == name and error["type"] == "invalid_request_error"
        for deep in ("[" * 100_000, '{"a": ' * 100_000):
            conn.request("POST", "/v1/chat/completions", deep)
            r = conn.getresponse()
            assert r.status == 400 and "nested too deeply" in json.loads(r.read())["error"]["message"]
        conn.request("POST", "/v1/chat/completions", json.dumps(HELLO))
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["choices"][0]["message"]["content"] == "hello world"
        assert conn.sock is sock  # never reconnected
        assert log.lines(logging.ERROR) == []


def test_404_405_and_500_are_openai_shaped(tok):
    class Broken(Scripted):
        def stats(self):
            raise RuntimeError("a bug")

    with limited(Broken(tok, tok.encode("hi"))) as (s, log):
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        conn.connect()
        sock = conn.sock
        for method, path, status, code in (("GET", "/v1/nothing", 404, "not_found"), ("GET", "/x", 404, "not_found"),
                                           ("POST", "/v1/models", 405, "method_not_allowed"),
                                           ("GET", "/v1/chat/completions", 405, "method_not_allowed")):
            conn.request(method, path)
            r = conn.getresponse()
            error = json.loads(r.read())["error"]
            assert r.status == status and error["code"] == code and path in error["message"], (path, error)
            assert r.status == 404 or r.getheader("allow")
        assert conn.sock is sock
        conn.request("GET", "/stats")  # a bug: a 500 that says the connection closes; the client opens another
        r = conn.getresponse()
        assert r.status == 500 and json.loads(r.read())["error"]["code"] == "internal_error"
        assert r.getheader("connection") == "close"
        conn.request("GET", "/v1/models")
        assert conn.getresponse().status == 200
        assert any("a bug" in str(r.exc_info[1]) for r in log.records if r.exc_info)  # the bug's traceback is logged

        client = openai.OpenAI(base_url=s.url + "/v2", api_key="x", max_retries=0, timeout=10)
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="m", messages=HELLO["messages"])
        assert e.value.body["code"] == "not_found"


def test_a_client_that_leaves_while_sending_its_body_logs_no_error(tok):
    with limited(Scripted(tok, tok.encode("hi"))) as (s, log):
        for _ in range(3):
            sock = connect(s)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            time.sleep(0.2)  # the handler is waiting for the rest
            sock.close()
        wait_for(lambda: open_connections(s) == 0)
        time.sleep(0.2)
        assert log.lines(logging.ERROR) == []
        assert httpx.post(s.url + "/v1/chat/completions", json=HELLO, timeout=10).status_code == 200


def test_v1_replies_end_at_any_other_special_token(tok):
    """The model writing past its turn (<|user_end|><|assistant_start|>…): the /v1 reply ends there ("stop", the
    generation cancelled, the end token counted); the tool markers still show as code."""
    special = tok.encode_special
    said, after = tok.encode("hello world"), tok.encode(" the cat")
    code = [special("<|python_start|>"), *tok.encode("1+1"), special("<|python_end|>")]
    slots = Scripted(tok, said + code + [special("<|user_end|>"), special("<|assistant_start|>")] + after)
    with limited(slots) as (s, log):
        r = httpx.post(s.url + "/v1/chat/completions", json=HELLO, timeout=10).json()
        assert r["choices"][0]["message"]["content"] == "hello world\n```python\n1+1\n```\n"
        assert r["choices"][0]["finish_reason"] == "stop" and len(slots.cancelled) == 1
        assert r["usage"]["completion_tokens"] == len(said) + len(code) + 1
        stream = httpx.post(s.url + "/v1/chat/completions", json={**HELLO, "stream": True}, timeout=10).text
        chunks = [json.loads(line[6:]) for line in stream.split("\n\n") if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == r["choices"][0]["message"][
            "content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        for marker in ("<|user_end|>", "<|assistant_start|>", "<|bos|>", "<|user_start|>"):
            slots.reply = said + [special(marker)] + after
            content = httpx.post(s.url + "/v1/chat/completions", json=HELLO, timeout=10).json()["choices"][0]
            assert content["message"]["content"] == "hello world", marker


def test_the_limits_flags(capsys):
    import resource

    from jaxchat import chat_web

    for flag, bad in (("--max-connections", "0"), ("--read-timeout", "0"), ("--read-timeout", "nan"),
                      ("--max-body-bytes", "-1"), ("-t", "-1"), ("-k", "100000"), ("-m", "0"), ("--slots", "0")):
        with pytest.raises(SystemExit) as exit:
            chat_web.main([flag, bad])
        assert exit.value.code == 2 and f"{flag}" in capsys.readouterr().err.splitlines()[-1]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        assert raise_fd_limit(10 ** 9) < hard and resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        assert raise_fd_limit(100) == 100

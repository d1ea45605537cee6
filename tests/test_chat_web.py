"""The web server on 127.0.0.1 (port 0), a tiny random model: both chat endpoints equal the engine's greedy replies,
the real `openai` client, limits as OpenAI-shaped 400s, concurrent streams, disconnects, the page in a real browser.
The server's start, stop and failures: test_chat_web_lifecycle; its limits: test_server_limits."""
import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from flax import nnx

from jaxchat.chat_api import ReplyText
from jaxchat.chat_web import create_app
from jaxchat.decoding import queue_tool_outputs
from jaxchat.engine import Engine
from jaxchat.http_limits import limited_http
from jaxchat.model import GPT, GPTConfig
from jaxchat.serving import Request, SlotServer
from jaxchat.tokenizer import RustBPETokenizer

from test_model import randomize

SLOTS = 3
DEFAULTS = {"temperature": 0.0, "top_k": 50, "max_tokens": 20}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    text = " ".join(f"hello world {i} the cat sat on the mat, number {i * 7} 😀 日本" for i in range(400))
    tok = RustBPETokenizer.train_from_iterator([text], 300)
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return randomize(GPT(config, rngs=nnx.Rngs(0)), seed=4, scale=0.5), tok


class Served:
    """uvicorn in a thread on a free loopback port, with the command's connection limits (`config`: more of
    uvicorn.Config's arguments, other limits); stopped (and checked stopped) at the end."""

    def __init__(self, app, **config):
        config.setdefault("http", limited_http(100, 30.0))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("the server did not become ready")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def serving(slot_server):
    """slot_server behind a fresh app on a free port, ready; the app stopped afterwards."""
    s = Served(create_app(lambda: slot_server, "m", DEFAULTS))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def served(model_and_tokenizer):
    model, tok = model_and_tokenizer
    slot_server = SlotServer(model, tok, slots=SLOTS, chunk=4)
    slot_server.warm_up()
    slot_server.start()
    s = Served(create_app(lambda: slot_server, "jaxchat-test", DEFAULTS))
    s.wait_ready()
    s.slots, s.tok = slot_server, tok
    yield s
    s.stop()


def prompt_of(tok, message):
    return tok.render_for_completion({"messages": [{"role": "user", "content": message},
                                                   {"role": "assistant", "content": ""}]})


def greedy_text(model, tok, message, markers=True, max_tokens=20):
    """What the engine decodes greedily for this message, as the endpoint shows it."""
    prompt = prompt_of(tok, message)
    result, _ = Engine(model, tok).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    special = tok.encode_special
    marks = {special(s): t for s, t in (("<|python_start|>", "\n```python\n"), ("<|python_end|>", "\n```\n"),
                                        ("<|output_start|>", "\n```output\n"), ("<|output_end|>", "\n```\n"))}
    text = ReplyText(tok, (tok.get_bos_token_id(), special("<|assistant_end|>")), markers=marks if markers else None)
    return text.add(result[0][len(prompt):], final=True)


def events(response):
    """The `data:` payloads of an SSE response, checking the framing of every event."""
    raw = response.text
    assert raw.endswith("\n\n")
    out = []
    for event in raw.split("\n\n")[:-1]:
        assert event.startswith("data: ") and "\n" not in event, event
        out.append(event[6:])
    return out


MESSAGES = ["hello the cat", "number 7 world", "the mat sat on", "hello 😀 日本"]


@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.slow
def test_both_endpoints_equal_the_engines_greedy_reply(served, model_and_tokenizer, message):
    model, tok = model_and_tokenizer
    body = {"model": "anything", "messages": [{"role": "user", "content": message}], "temperature": 0,
            "max_tokens": 20, "user": "ignored", "presence_penalty": 0}
    r = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    reply = r.json()
    want = greedy_text(model, tok, message)
    assert reply["choices"][0]["message"]["content"] == want
    assert reply["object"] == "chat.completion" and reply["model"] == "anything"
    assert reply["usage"]["prompt_tokens"] == len(prompt_of(tok, message))
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")

    stream = httpx.post(served.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    data = events(stream)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want  # no character split
    assert chunks[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]

    nano = httpx.post(served.url + "/chat/completions", json={"messages": body["messages"], "temperature": 0,
                                                              "max_tokens": 20}, timeout=60)
    pieces = [json.loads(d) for d in events(nano)]
    assert pieces[-1] == {"done": True}
    assert "".join(p["token"] for p in pieces[:-1]) == greedy_text(model, tok, message, markers=False)


@pytest.mark.slow
def test_openai_client(served, model_and_tokenizer):
    model, tok = model_and_tokenizer
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["jaxchat-test"]
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello the cat"}],
                                            temperature=0, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(prompt_of(tok, "hello the cat"))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_text(model, tok, "hello the cat")
    assert chunks[-1].usage.completion_tokens >= 1
    system = client.chat.completions.create(model="m", temperature=0, max_tokens=20, messages=[
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert system.choices[0].message.content == greedy_text(model, tok, "be brief\n\nhi")

    bad = [({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
           ({"max_tokens": 5000}, "max_tokens"), ({"n": 9}, "n"), ({"extra_body": {"top_k": 201}}, "top_k"),
           ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content"),
           ({"messages": [{"role": "user", "content": "x" * 7000}] * 9}, "messages"),
           ({"messages": [{"role": "user", "content": "hi"}] * 501}, "messages"),
           ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
           ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content"),
           ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
           ({"messages": [{"role": "user", "content": "hello the cat " * 30}]}, "messages")]
    for change, param in bad:
        kwargs = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **change}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kwargs)
        assert e.value.body["param"] == param, (change, e.value.body)
    assert e.value.body["code"] == "context_length_exceeded"


@pytest.mark.slow
def test_bad_requests_are_one_clear_400(served):
    for content, why in ((b"{not json", "not valid JSON"), (b'"a string"', "JSON object"), (b"", "JSON object")):
        r = httpx.post(served.url + "/v1/chat/completions", content=content, timeout=10)
        assert r.status_code == 400 and why in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(served.url + "/chat/completions", json={"messages": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


@pytest.mark.slow
def test_n_seed_and_stop(served, model_and_tokenizer):
    model, tok = model_and_tokenizer
    body = {"messages": [{"role": "user", "content": "hello the cat"}], "temperature": 1.0, "max_tokens": 12,
            "n": 3, "seed": 123}
    first = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60).json()
    again = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60).json()
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]] and len(set(texts)) > 1
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    greedy = greedy_text(model, tok, "hello the cat")
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    cut = httpx.post(served.url + "/v1/chat/completions", timeout=60, json={
        "messages": body["messages"], "temperature": 0, "max_tokens": 20, "stop": stop}).json()
    assert cut["choices"][0]["message"]["content"] == greedy[:greedy.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    short = httpx.post(served.url + "/v1/chat/completions", timeout=60, json={
        "messages": body["messages"], "temperature": 0, "max_tokens": 2}).json()
    assert short["usage"]["completion_tokens"] <= 2


@pytest.mark.slow
def test_concurrent_streams_each_equal_their_solo_reply(served, model_and_tokenizer):
    model, tok = model_and_tokenizer
    messages = [f"hello the cat {i} sat" for i in range(2 * SLOTS + 2)]
    want = [greedy_text(model, tok, m) for m in messages]

    async def one(client, message):
        text = ""
        async with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": message}], "temperature": 0, "max_tokens": 20,
                "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content", "") if json.loads(
                        line[6:])["choices"] else ""
        return text

    async def all_of():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, m) for m in messages))

    assert asyncio.run(all_of()) == want
    assert served.slots.stats()["busy_slots"] == 0


@pytest.mark.slow
def test_disconnect_frees_the_slot(served):
    async def read_one_chunk_then_leave():
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            async with client.stream("POST", "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hello"}], "temperature": 1.0, "max_tokens": 4096,
                    "stream": True}) as r:
                async for _ in r.aiter_lines():
                    break

    asyncio.run(read_one_chunk_then_leave())
    deadline = time.monotonic() + 5
    while served.slots.stats()["busy_slots"] and time.monotonic() < deadline:
        time.sleep(0.05)
    first = httpx.get(served.url + "/stats").json()
    time.sleep(1)
    second = httpx.get(served.url + "/stats").json()
    assert first["busy_slots"] == 0 and first["generated_tokens_total"] == second["generated_tokens_total"]
    r = httpx.post(served.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200


@pytest.mark.slow
def test_page_metrics_and_stats(served):
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and "<title>jaxchat</title>" in page.text and "/chat/completions" in page.text
    httpx.post(served.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    metrics = httpx.get(served.url + "/metrics").text
    for name in ("jaxchat_requests_running", "jaxchat_requests_waiting", "jaxchat_time_to_first_token_seconds_count",
                 'jaxchat_requests_total{outcome="ok",route="openai"}'):
        assert name in metrics, name
    stats = httpx.get(served.url + "/stats").json()
    assert stats["slots"] == SLOTS and stats["requests_served_total"] >= 1


def test_a_failing_tool_is_reported_to_the_model(model_and_tokenizer):
    model, tok = model_and_tokenizer

    def broken(code):
        raise RuntimeError("tool exploded")

    server = SlotServer(model, tok, slots=2, chunk=4, tool=broken)
    special = tok.encode_special
    generated = [special("<|python_start|>"), *tok.encode("1+1"), special("<|python_end|>")]
    rows = queue_tool_outputs(server.rows, {1: generated}, server.tool, tok, server.ids)
    forced = rows.forced[1, :int(rows.forced_len[1])].tolist()
    assert forced[0] == special("<|output_start|>") and forced[-1] == special("<|output_end|>")
    assert tok.decode(forced[1:-1]) .startswith("Error: RuntimeError: tool exploded")


@pytest.mark.slow
def test_the_page_in_a_real_browser(served, model_and_tokenizer, tmp_path):
    """Debian's chromium, headless, through chromedriver: send, see the streamed reply, a slash command, regenerate,
    edit. The screenshot is kept (JAXCHAT_TEST_ARTEFACTS, else the test's tmp dir)."""
    import os
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("JAXCHAT_TEST_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required here (apt install chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver (apt install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1280,800", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(served.url + "/")
        wait.until(lambda d: "context 64 tokens" in d.find_element(By.ID, "status").text)
        box = driver.find_element(By.ID, "input")
        box.send_keys("hello the cat", Keys.ENTER)
        idle = lambda d: d.find_element(By.ID, "send").text == "Send"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1 and idle(d))
        raw = "".join(json.loads(d)["token"] for d in events(httpx.post(
            served.url + "/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "hello the cat"}]}))[:-1])
        for marker in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"):
            raw = raw.replace(marker, "")
        reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
        assert reply.get_attribute("textContent") == raw and raw  # the greedy reply, streamed into the page
        shot = os.path.join(os.environ.get("JAXCHAT_TEST_ARTEFACTS", str(tmp_path)), "chat_page.png")
        os.makedirs(os.path.dirname(shot), exist_ok=True)
        assert driver.save_screenshot(shot) and os.path.getsize(shot) > 1000
        print(f"screenshot: {shot}")

        box.send_keys("/temperature 0.5", Keys.ENTER)
        wait.until(lambda d: "temperature: 0.5" in d.find_element(By.ID, "chat").text)
        reply.click()  # regenerate: the reply is replaced, not added
        wait.until(lambda d: idle(d) and len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
                   and d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[0].get_attribute("textContent"))
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 1
        driver.find_element(By.CSS_SELECTOR, ".msg.user").click()  # edit: back in the box, the rest dropped
        assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
        assert driver.find_element(By.ID, "input").get_attribute("value") == "hello the cat"
    finally:
        driver.quit()

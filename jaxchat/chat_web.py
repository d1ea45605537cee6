"""Serve a model: a chat page and an OpenAI-compatible API over one continuously batched engine.

    python -m jaxchat.chat_web -i sft -g d20 [-s STEP] [--host 127.0.0.1] [-p 8000] [-t 0.8] [-k 50] [-m 512]
                               [--slots 8] [--max-connections 1000] [--read-timeout 30] [--max-body-bytes N]

- `GET /` the chat page; `GET /health` (503 while loading, then 200); `GET /stats`; `GET /metrics` (Prometheus).
- `POST /chat/completions`: nanochat's request and SSE framing (`data: {"token": ...}` … `data: {"done": true}`).
- `POST /v1/chat/completions` (streaming or not) and `GET /v1/models`: what the `openai` package, Open WebUI,
  LibreChat and curl scripts speak. Tool blocks show as fenced code there; nanochat's route keeps the raw markers.

All requests share `--slots` rows of one KV cache (`jaxchat.serving`): decoding runs on a worker thread, the event
loop only parses, queues and streams. A closed connection frees its row before the next device call.
No request can hold the server: connections are capped and each request has --read-timeout seconds to arrive
(`jaxchat.http_limits`), a body over --max-body-bytes is refused (413) before it is read, and every error, 404 and
405 included, is one response in OpenAI's shape that leaves the connection usable.
"""
import argparse
import asyncio
import json
import os
import signal
import threading
import time
import uuid
from contextlib import aclosing, asynccontextmanager

from jaxchat.chat_api import MAX_BODY_BYTES, MAX_TOKENS, ApiError, ReplyText, parse_request, read_json
from jaxchat.checkpoint_manager import add_checkpoint_flags
from jaxchat.common import UserError, flag_adder, non_negative_int, number, positive_int
from jaxchat.distributed import run_main
from jaxchat.execution import add_tool_flags, chosen_tool
from jaxchat.sampling import MAX_TOP_K

PAGE = os.path.join(os.path.dirname(__file__), "ui.html")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not hold the stream back


def build_parser():
    p = argparse.ArgumentParser(description="Serve a jaxchat model: chat page and OpenAI-compatible API.")
    add = flag_adder(p)
    add_checkpoint_flags(p)
    add("host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    add("port", "-p", type=number(int, 0, 65535), default=8000, help="0: any free port")
    add("temperature", "-t", type=number(float, 0, 2), default=0.8, help="default when a request has none")
    add("top_k", "-k", type=number(int, 0, MAX_TOP_K), default=50, help="default when a request has none")
    add("max_tokens", "-m", type=number(int, 1, MAX_TOKENS), default=512, help="default reply length")
    add("slots", type=positive_int, default=8, help="rows decoded together (concurrent requests)")
    add("chunk", type=positive_int, default=16, help="decode steps per device call (tokens streamed together)")
    add("max_waiting", type=non_negative_int, default=64, help="queued requests before 503")
    add("max_connections", type=positive_int, default=1000,
        help="open connections; one more is answered 503 and closed")
    add("read_timeout", type=number(float, 0.1), default=30.0,
        help="seconds for a request to arrive whole (headers and body), else 408")
    add("max_body_bytes", type=positive_int, default=MAX_BODY_BYTES,
        help="larger request bodies are refused (413) unread; the default fits the largest valid request")
    add("mesh_data", type=positive_int, default=1)
    add_tool_flags(p)
    return p


def _sse(payload):
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _metrics(registry, server):
    from prometheus_client import Counter, Gauge, Histogram
    Gauge("jaxchat_requests_running", "requests holding a slot", registry=registry).set_function(
        lambda: server().stats()["busy_slots"] if server() else 0)
    Gauge("jaxchat_requests_waiting", "requests queued for a slot", registry=registry).set_function(
        lambda: server().stats()["queued_requests"] if server() else 0)
    Gauge("jaxchat_generated_tokens", "tokens generated since start", registry=registry).set_function(
        lambda: server().stats()["generated_tokens_total"] if server() else 0)
    return {"requests": Counter("jaxchat_requests", "requests by route and outcome", ["route", "outcome"],
                                registry=registry),
            "ttft": Histogram("jaxchat_time_to_first_token_seconds", "from arrival to the first token",
                              registry=registry, buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30)),
            "tps": Histogram("jaxchat_tokens_per_second", "generated tokens per second of each request",
                             registry=registry, buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000))}


def create_app(make_server, model_id, defaults, max_body_bytes=MAX_BODY_BYTES):
    """The ASGI app. make_server() -> a started SlotServer (run in a thread at start-up, so /health answers 503
    meanwhile); defaults: the server's temperature, top_k, max_tokens."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from jaxchat.serving import QueueFull, Stopped
    from jaxchat.serving import Request as Generation

    state = {"server": None, "loaded": None, "error": None, "created": int(time.time())}
    registry = CollectorRegistry()
    metrics = _metrics(registry, lambda: state["server"])

    @asynccontextmanager
    async def lifespan(app):
        async def load():
            try:
                state["server"] = state["loaded"] = await asyncio.to_thread(make_server)
            except Exception as e:  # the server stays up to say why on /health
                state["error"] = f"{type(e).__name__}: {e}"
        task = asyncio.create_task(load())
        yield
        task.cancel()
        if state["server"] is not None:
            await asyncio.to_thread(state["server"].stop)

    app = FastAPI(title="jaxchat", lifespan=lifespan)
    app.state.jaxchat = state

    @app.exception_handler(ApiError)
    async def api_error(request, e, headers=None):
        headers = {"x-should-retry": "true" if e.status >= 500 else "false", **(headers or {})}
        if e.status in (413, 500):  # the client may still be sending (413), or this connection is dropped (500)
            headers["connection"] = "close"
        return JSONResponse(e.body(), e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return await api_error(request, ApiError(f"invalid request: {e.errors()}"))

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # 404, 405: OpenAI's shape too, not FastAPI's {"detail": ...}
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return await api_error(request, ApiError(f"{e.detail}: {request.method} {request.url.path}", code=code,
                                                 status=e.status_code), e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, e):
        """A bug, not the request's fault: its traceback is logged (uvicorn), the client gets a 500 in OpenAI's shape
        that says the connection closes (uvicorn drops a connection whose app raised)."""
        return await api_error(request, ApiError(f"the server failed on this request ({type(e).__name__}); its log "
                                                 "says more", status=500, kind="server_error", code="internal_error"))

    def current():
        """The serving SlotServer, or None while loading or once its worker has ended (then state says why)."""
        if state["server"] is not None and state["server"].failure:
            state["error"], state["server"] = state["server"].failure, None
        return state["server"]

    def ready():
        if current() is None:
            raise ApiError("the model is " + (f"not available: {state['error']}" if state["error"] else "loading"),
                           status=503, kind="server_error", code="not_ready")
        return state["server"]

    async def read_body(request):
        """The body, refused (413) as soon as it is known to be larger than any valid request: by its declared
        length before a byte of it is read, else as its chunks arrive. Kept in memory: max_body_bytes at most."""
        too_large = ApiError(f"the request body is over {max_body_bytes} bytes, larger than any valid request",
                             status=413, code="request_too_large")
        if int(request.headers.get("content-length") or 0) > max_body_bytes:  # uvicorn checked it is a number
            raise too_large
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise too_large
        except ClientDisconnect:  # nobody is left to answer; not the server's error
            raise ApiError("the client left before sending the whole request", code="client_disconnected") from None
        return bytes(body)

    async def chat_request(request):
        body = await read_body(request)
        server = ready()
        chat = parse_request(read_json(body), defaults)
        prompt = server.tokenizer.render_for_completion({"messages": chat.messages + [
            {"role": "assistant", "content": ""}]})
        if len(prompt) + 1 > server.context:
            raise ApiError(f"the conversation is {len(prompt)} tokens; this model's context is {server.context} "
                           f"(and the reply needs at least one)", "messages", "context_length_exceeded")
        return server, chat, prompt

    def generate(server, chat, prompt, ends, markers, route, request=None):
        """Submit chat.n generations now (a full queue is a 503 before any response starts); returns an async
        generator of (choice, new_text, finish, tokens generated) as their tokens arrive, each reply ending at the
        first of the token ids `ends`. Closing it cancels what is unfinished; with `request` (a reply that is not
        streamed), so does the client going away."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        texts = [ReplyText(server.tokenizer, ends, chat.stop, markers) for _ in range(chat.n)]
        gens = []
        for i in range(chat.n):
            emit = lambda tokens, finish, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, tokens, finish))
            gens.append(Generation(prompt=prompt, max_tokens=chat.max_tokens or MAX_TOKENS, emit=emit,
                                   temperature=chat.temperature, top_k=chat.top_k, top_p=chat.top_p,
                                   seed=chat.seed + i))
        try:
            for g in gens:
                server.submit(g)
        except (QueueFull, Stopped) as e:
            for g in gens:
                server.cancel(g)
            busy = isinstance(e, QueueFull)
            raise ApiError(f"the server is busy ({e}); try again shortly" if busy else str(e), status=503,
                           kind="server_error", code="queue_full" if busy else "unavailable") from None

        async def client_left():
            """None in the queue the moment the client goes (a reply not streamed has no write that would fail)."""
            while (await request.receive())["type"] != "http.disconnect":
                pass
            queue.put_nowait(None)

        async def results():
            watch = asyncio.create_task(client_left()) if request is not None else None
            open_choices = set(range(chat.n))
            try:
                while open_choices:
                    event = await queue.get()
                    if event is None:
                        return
                    i, tokens, finish = event
                    if i not in open_choices:
                        continue
                    if finish == "cancelled":
                        raise ApiError(server.failure or "the request was cancelled", status=503,
                                       kind="server_error", code="unavailable")
                    new = texts[i].add(tokens, final=finish is not None)
                    if texts[i].stopped:
                        server.cancel(gens[i])
                        finish = "stop"
                    if finish:
                        open_choices.discard(i)
                        _observe(metrics, gens[i], texts[i].count())
                    yield i, new, finish, texts[i].count()
                metrics["requests"].labels(route, "ok").inc()
            finally:
                if watch is not None:
                    watch.cancel()
                for i in open_choices:
                    server.cancel(gens[i])
                    metrics["requests"].labels(route, "cancelled").inc()
        return results()

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        server = current()
        body = {"status": "ok" if server else ("error" if state["error"] else "loading"), "ready": bool(server),
                "model": model_id}
        if state["error"]:
            body["error"] = state["error"]
        if server:
            body.update(slots=server.slots, context=server.context)
        return JSONResponse(body, 200 if server else 503)

    @app.get("/stats")
    async def stats():
        return ready().stats()

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": state["created"],
                                            "owned_by": "jaxchat"}]}

    @app.post("/chat/completions")
    async def nanochat_completions(request: Request):
        server, chat, prompt = await chat_request(request)
        chat.n = 1

        stream = generate(server, chat, prompt, server.ids[:2], None, "nanochat")

        async def events():
            try:
                async with aclosing(stream):
                    async for _, text, _, _ in stream:
                        if text:
                            yield _sse({"token": text, "gpu": 0})
                yield _sse({"done": True})
            except ApiError as e:
                yield _sse(e.body())
        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        server, chat, prompt = await chat_request(request)
        tokenizer = server.tokenizer
        markers = {tokenizer.encode_special(s): text for s, text in (
            ("<|python_start|>", "\n```python\n"), ("<|python_end|>", "\n```\n"),
            ("<|output_start|>", "\n```output\n"), ("<|output_end|>", "\n```\n"))}
        # The reply also ends at any other special token (the engine stops only at <|assistant_end|> and <|bos|>):
        # <|user_end|>, <|assistant_start|> and the like are the model writing past its turn, not text to show.
        ends = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()} - markers.keys()
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": chat.model or model_id}
        stream = generate(server, chat, prompt, ends, markers, "openai", None if chat.stream else request)
        if not chat.stream:
            content, finishes, completion = [""] * chat.n, [None] * chat.n, 0
            async with aclosing(stream):
                async for i, text, finish, generated in stream:
                    content[i] += text
                    if finish:
                        finishes[i], completion = finish, completion + generated
            return {**head, "object": "chat.completion", "choices": [
                {"index": i, "message": {"role": "assistant", "content": content[i]}, "finish_reason": finishes[i],
                 "logprobs": None} for i in range(chat.n)], "usage": _usage(len(prompt), chat.n, completion)}

        def chunk(choices, usage=None):
            return _sse({**head, "object": "chat.completion.chunk", "choices": choices,
                         **({"usage": usage} if chat.include_usage else {})})

        async def events():
            completion = 0
            try:
                for i in range(chat.n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                async with aclosing(stream):
                    async for i, text, finish, generated in stream:
                        if text:
                            yield chunk([{"index": i, "delta": {"content": text}, "finish_reason": None}])
                        if finish:
                            completion += generated
                            yield chunk([{"index": i, "delta": {}, "finish_reason": finish}])
                if chat.include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                                "usage": _usage(len(prompt), chat.n, completion)})
                yield _sse("[DONE]")
            except ApiError as e:
                yield _sse(e.body())
        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    return app


def _observe(metrics, generation, tokens):
    """A finished generation's time to first token and tokens per second."""
    if generation.first_token_at is not None:
        metrics["ttft"].observe(generation.first_token_at - generation.submitted)
        if (elapsed := time.monotonic() - generation.first_token_at) > 0:
            metrics["tps"].observe(tokens / elapsed)


def _usage(prompt_tokens, n, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def main(argv=None):
    args = build_parser().parse_args(argv)
    import jax
    import uvicorn

    from jaxchat.checkpoint_manager import load_model
    from jaxchat.http_limits import limited_http, raise_fd_limit
    from jaxchat.run import make_mesh
    from jaxchat.serving import STOPPED, SlotServer

    tool = chosen_tool(args)  # a missing sandbox is refused now, not per request
    mesh = make_mesh(args)
    model_id = f"jaxchat-{args.source}-{args.model_tag or 'largest'}"

    def make_server():
        with jax.set_mesh(mesh):
            model, tokenizer, meta = load_model(args.source, args.model_tag, args.step)
            server = SlotServer(model, tokenizer, slots=args.slots, chunk=args.chunk, tool=tool,
                                max_waiting=args.max_waiting)
            server.warm_up()
        server.start()
        print(f"ready: {args.source} model {meta['model_tag']} step {meta['step']}, {args.slots} slots, context "
              f"{server.context}", flush=True)
        return server

    defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
    app = create_app(make_server, model_id, defaults, args.max_body_bytes)
    if (connections := raise_fd_limit(args.max_connections)) < args.max_connections:
        print(f"jaxchat: --max-connections lowered to {connections}, what this process's open-file limit allows "
              f"(ulimit -n)", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5,
                            http=limited_http(connections, args.read_timeout))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """Ctrl-C first ends the generations in flight (their streams end with an error event), so connections
            close at once instead of at the graceful-shutdown timeout."""
            if (slots := app.state.jaxchat["server"]) is not None:
                threading.Thread(target=slots.stop, daemon=True).start()
            super().handle_exit(sig, frame)

    print(f"jaxchat: serving on http://{args.host}:{args.port}/ (OpenAI API at http://{args.host}:{args.port}/v1)",
          flush=True)
    # uvicorn handles SIGTERM as Ctrl-C, then raises it again once stopped: let it end the command as Ctrl-C does
    # (a clean exit 0 after the "stopped" line), not kill it with status -15.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: stopping is this command's normal end
        pass
    print("jaxchat: stopped", flush=True)
    loaded = app.state.jaxchat["loaded"]
    if loaded is None and app.state.jaxchat["error"]:  # the model never loaded
        raise UserError(app.state.jaxchat["error"])
    if loaded is not None and loaded.failure not in (None, STOPPED):  # the decode loop failed while serving
        raise UserError(loaded.failure)


if __name__ == "__main__":
    run_main(main)

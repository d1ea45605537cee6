"""The limits uvicorn's HTTP server lacks: how many connections are open, and how long a request may take to arrive.

uvicorn holds a connection that sends nothing, or half a request, or a body shorter than it declared, for as long as
the client likes, and accepts connections until the process runs out of file descriptors (after which new ones are
dropped with no answer and nothing logged). `limited_http(max_connections, read_timeout)` is its httptools protocol
with these limits:
- at most `max_connections` open: one more is answered 503 and closed at once (logged, a line per 10 s at most);
- `read_timeout` seconds for each request to arrive whole, headers and body, counted from its first byte (the
  first request's from the connection's start): then 408 and close, or just close where nothing was sent yet (a
  browser's unused preconnection) or a response is already under way;
- MAX_HEADER_BYTES of request headers (httptools has no limit of its own): 431 and close.
The body's size is the app's to bound, as it knows which routes read one (chat_web: 413 past --max-body-bytes).
Between requests, uvicorn's own keep-alive timeout (5 s) closes an idle connection.
"""
import http
import json
import logging
import resource
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from jaxchat.chat_api import ApiError

MAX_HEADER_BYTES = 64 * 1024
FD_RESERVE = 256  # descriptors left for what is not a connection: checkpoint files, logs, the runtime's own
LOG_EVERY = 10.0  # seconds between two lines about refused connections
log = logging.getLogger("uvicorn.error")


def error_response(status, message, code):
    """A whole HTTP response in OpenAI's error shape, written by the protocol itself (no app behind it)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps(ApiError(message, code=code, status=status, kind=kind).body()).encode()
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def raise_fd_limit(max_connections):
    """Lift the soft limit on open files to the hard one, and the connections that fit under it, FD_RESERVE kept
    for the rest: a connection past the cap is refused by the server, never dropped by the kernel."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    except (ValueError, OSError):  # macOS: an unlimited hard limit is not a soft one to have
        pass
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return min(max_connections, max(soft - FD_RESERVE, soft // 2))


class Refusals:
    """Connections refused over the cap, counted and logged as one line at once, then at most one line per
    LOG_EVERY seconds with the count since (a flood is a line per 10 s, not one per connection)."""

    def __init__(self):
        self.count, self.logged_at = 0, -LOG_EVERY

    def add(self, loop, open_connections, cap):
        self.count += 1
        if self.count == 1:  # the first since the last line: that line is due now, or LOG_EVERY after the last
            loop.call_later(max(0.0, self.logged_at + LOG_EVERY - time.monotonic()), self._log, open_connections, cap)

    def _log(self, open_connections, cap):
        log.warning(f"refused {self.count} connection(s): {open_connections} open, the most allowed "
                    f"(--max-connections {cap})")
        self.count, self.logged_at = 0, time.monotonic()


class LimitedHttp(HttpToolsProtocol):
    """uvicorn's protocol for one connection, with the limits above; `limited_http` sets them per server."""
    max_connections = 1000
    read_timeout = 30.0
    refusals = Refusals()

    def connection_made(self, transport):
        self.refused = len(self.server_state.connections) >= self.max_connections
        self.deadline, self.in_headers, self.header_bytes = None, True, 0
        if self.refused:
            transport.write(error_response(503, "the server has as many connections open as it allows; try "
                                                "again shortly", "too_many_connections"))
            transport.close()
            self.refusals.add(self.loop, len(self.server_state.connections), self.max_connections)
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc):
        if self.refused:  # never opened as far as uvicorn is concerned
            return
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data):
        if self.in_headers:  # any byte between requests starts the clock (uvicorn stops its keep-alive one here)
            self.header_bytes += len(data)
            self._arm()
        super().data_received(data)
        if self.in_headers and self.header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self.transport.write(error_response(431, f"the request's headers are over {MAX_HEADER_BYTES} bytes",
                                                "headers_too_large"))
            self.transport.close()

    # The parser's callbacks (httptools calls them from data_received) mark where each request starts and ends.
    def on_message_begin(self):  # a pipelined request starts its clock in the middle of a read
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self):
        self.in_headers = False
        super().on_headers_complete()

    def on_message_complete(self):
        self._disarm()
        self.in_headers, self.header_bytes = True, 0  # what comes next is the next request's headers
        super().on_message_complete()

    def handle_websocket_upgrade(self):  # the connection is no longer this protocol's to time
        self._disarm()
        super().handle_websocket_upgrade()

    def _arm(self):
        if self.deadline is None:
            self.deadline = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self):
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _timed_out(self):
        self.deadline = None
        if self.transport.is_closing():
            return
        # A 408 only where nothing else is being written: no response of this connection under way, and none yet
        # to the request that is late (an app may answer before reading the body, a 404 say). Its ASGI task, if
        # one waits on the body, then sees a disconnect.
        sent_nothing = self.in_headers and self.header_bytes == 0
        cycle = self.cycle
        free = cycle is None or (cycle.response_complete if self.in_headers else not cycle.response_started)
        if free and not sent_nothing:
            self.transport.write(error_response(408, f"the request did not arrive whole within {self.read_timeout:g} s",
                                                "request_timeout"))
        self.transport.close()


def limited_http(max_connections, read_timeout):
    """The protocol class to give uvicorn (`uvicorn.Config(..., http=limited_http(...))`)."""
    return type("LimitedHttp", (LimitedHttp,), {"max_connections": max_connections, "read_timeout": read_timeout,
                                                "refusals": Refusals()})

"""The chat request as clients send it (nanochat's UI and the OpenAI Chat Completions API): parsing with nanochat's
limits, errors in OpenAI's shape, and the reply's text as it grows.

Every limit violation is an `ApiError`: HTTP 400 with {"error": {"message", "type", "param", "code"}}, which the
`openai` client raises as BadRequestError. Unknown fields are ignored (strict servers break LibreChat and friends).
"""
import dataclasses
import json
import math
import random

from jaxchat.sampling import MAX_TOP_K

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_TOKENS = 4096
MAX_CHOICES = 8
MAX_STOPS = 4
# No valid request is larger: 32,000 characters at 12 bytes each (an emoji escaped as two \uXXXX) is 384 KB, and
# 500 messages with 1 KiB each of keys, roles and fields to ignore is 512 KB more. A larger body is refused unread.
MAX_BODY_BYTES = 1 << 20


class ApiError(Exception):
    def __init__(self, message, param=None, code=None, status=400, kind="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
    messages: list  # [{"role": "user"|"assistant"|"system", "content": str}]
    temperature: float
    top_k: int
    top_p: float
    max_tokens: int | None  # None: the rest of the context
    n: int
    stop: list
    seed: int
    stream: bool
    include_usage: bool
    model: str | None


def read_json(raw):
    """The request's JSON. NaN and Infinity parse (Python's json takes them) and are refused by the parameter that
    holds them; nesting too deep for the parser is one 400 like any other bad JSON."""
    try:
        return json.loads(raw or b"null")
    except RecursionError:
        raise ApiError("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError("the request body is not valid JSON") from None


def _number(body, name, default, low, high, kind=float, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value)) or (kind is int and value != int(value))):
        raise ApiError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if value < low or value > high or (low_open and value == low):
        raise ApiError(f"'{name}' must be {'>' if low_open else '≥'} {low} and ≤ {high}, got {value}", name)
    return kind(value)


def _text(content, i):
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_messages(raw):
    """nanochat's limits; system/developer messages (leading) merged into one; roles then alternate user/assistant
    and end with the user."""
    if not isinstance(raw, list) or not raw:
        raise ApiError("'messages' must be a non-empty list", "messages")
    if len(raw) > MAX_MESSAGES:
        raise ApiError(f"at most {MAX_MESSAGES} messages, got {len(raw)}", "messages")
    messages, total = [], 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be an object", f"messages[{i}]")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise ApiError(f"messages[{i}].role must be system, developer, user or assistant, got {m.get('role')!r}",
                           f"messages[{i}].role")
        text = _text(m.get("content"), i)
        if not text.strip():
            raise ApiError(f"messages[{i}].content is empty", f"messages[{i}].content")
        if len(text) > MAX_MESSAGE_CHARS:
            raise ApiError(f"messages[{i}] has {len(text)} characters, over the {MAX_MESSAGE_CHARS} allowed",
                           f"messages[{i}].content", "message_too_long")
        total += len(text)
        if role == "system" and messages and messages[-1]["role"] != "system":
            raise ApiError(f"messages[{i}]: a system message must come before the conversation", f"messages[{i}]")
        if role == "system" and messages:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    if total > MAX_TOTAL_CHARS:
        raise ApiError(f"the messages have {total} characters, over the {MAX_TOTAL_CHARS} allowed", "messages",
                       "messages_too_long")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ApiError("after an optional system message, roles must alternate user, assistant, user, ...",
                           "messages")
    if not turns or turns[-1]["role"] != "user":
        raise ApiError("the last message must be the user's", "messages")
    return messages


def parse_request(body, defaults):
    """A ChatRequest from a JSON body; `defaults`: the server's temperature, top_k, max_tokens (None = context)."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    if body.get("logprobs"):
        raise ApiError("logprobs are not supported", "logprobs")
    if body.get("tools") and body.get("tool_choice") == "required":
        raise ApiError("tool calls are not supported: the model's one tool is its own python block", "tool_choice")
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(param)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
    options = body.get("stream_options") or {}
    seed = body.get("seed")
    return ChatRequest(
        messages=parse_messages(body.get("messages")),
        temperature=_number(body, "temperature", defaults["temperature"], 0.0, 2.0),
        top_k=_number(body, "top_k", defaults["top_k"], 0, MAX_TOP_K, int),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        max_tokens=_number({param: max_tokens}, param, defaults["max_tokens"], 1, MAX_TOKENS, int),
        n=_number(body, "n", 1, 1, MAX_CHOICES, int),
        stop=stop,
        seed=_number(body, "seed", 0, -2 ** 63, 2 ** 63 - 1, int) if seed is not None else random.getrandbits(31),
        stream=bool(body.get("stream")),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        model=body.get("model") if isinstance(body.get("model"), str) else None)


class ReplyText:
    """The text of a growing reply, handed out in whole UTF-8 characters, cut at the first of `end_ids` (a token the
    reply ends at; the engine itself stops only at <|assistant_end|> and <|bos|>) or stop string (neither is
    returned; text that could still become a stop string is held back). `stopped`: the reply was cut, its
    generation is to be cancelled. `markers`: text for special tokens (the tool blocks), None to decode them as
    they are."""

    def __init__(self, tokenizer, end_ids, stop=(), markers=None):
        self.tokenizer, self.end_ids, self.stop, self.markers = tokenizer, set(end_ids), list(stop), markers or {}
        self.tokens, self.shown, self.stopped = [], 0, False

    def text(self):
        pieces, run = [], []
        for t in self.tokens:
            if t in self.end_ids:
                break
            if t in self.markers:
                pieces += [self.tokenizer.decode(run), self.markers[t]]
                run = []
            else:
                run.append(t)
        return "".join(pieces) + self.tokenizer.decode(run)

    def count(self):
        """Tokens of the reply so far, its end token included (what `usage` reports)."""
        ends = [i for i, t in enumerate(self.tokens) if t in self.end_ids]
        return ends[0] + 1 if ends else len(self.tokens)

    def add(self, tokens, final=False):
        """The new text these tokens make visible ("" while a character or a possible stop string is incomplete)."""
        self.tokens += tokens
        if self.end_ids.intersection(tokens):
            final = self.stopped = True
        text = self.text()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        if not final:
            text = text.rstrip("\ufffd")  # the rest of a multi-byte character is still to come
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[:max(self.shown, len(text) - hold)] if hold else text
        new, self.shown = text[self.shown:], max(self.shown, len(text))
        return new

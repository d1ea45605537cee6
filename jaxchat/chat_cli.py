"""Chat with a model in the terminal: `python -m jaxchat.chat_cli [-i sft] [-g d20] [-s STEP] [-p "prompt"]`.

Interactive: type a message, the reply streams back token by token; `clear` starts over, `quit`/`exit` (or
Ctrl-D) leaves. With -p: one reply, then exit. Each turn prefills only the new tokens: the engine keeps the KV
cache of the conversation so far. The tool runs when the model calls it: the calculator, or with --tool python
Python behind the kernel sandbox (jaxchat.execution; --unsafe-weak-sandbox where there is none). A reader that goes
away (`... | head`) ends it quietly, as it ends other tools.
"""
import argparse
import os
import signal
import sys

from jaxchat.checkpoint_manager import add_checkpoint_flags, load_model
from jaxchat.common import UserError, flag_adder, non_negative_float, number, positive_int, random_seed
from jaxchat.distributed import run_main
from jaxchat.engine import Engine
from jaxchat.execution import add_tool_flags, chosen_tool
from jaxchat.sampling import MAX_TOP_K


def build_parser():
    p = argparse.ArgumentParser(description="Chat with a jaxchat model.")
    add = flag_adder(p)
    add_checkpoint_flags(p)
    add("prompt", "-p", default=None, help="one message, one reply, then exit")
    add("temperature", "-t", type=non_negative_float, default=0.6, help="0: greedy")
    add("top_k", "-k", type=number(int, 0, MAX_TOP_K), default=50, help="0: off")
    add("max_tokens", "-m", type=positive_int, default=256, help="reply length limit")
    add_tool_flags(p)
    add("seed", type=random_seed, default=42)
    return p


class Chat:
    """The conversation as tokens, and one reply at a time through the engine."""

    def __init__(self, engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        special = tokenizer.encode_special
        self.user_start, self.user_end = special("<|user_start|>"), special("<|user_end|>")
        self.assistant_start, self.assistant_end = special("<|assistant_start|>"), special("<|assistant_end|>")
        self.context = engine.model.config.sequence_len
        self.clear()

    def clear(self):
        self.tokens = [self.tokenizer.get_bos_token_id()]

    def reply(self, message, out=sys.stdout, **sampling):
        """Stream the assistant's reply to `out`; returns its text. A message that would overflow the model's
        context is refused with a message (the conversation is left as it was)."""
        turn = [self.user_start, *self.tokenizer.encode(message), self.user_end, self.assistant_start]
        room = self.context - len(self.tokens) - len(turn)
        if room < 1:  # with nothing before it (always so with -p) there is nothing to clear
            what = "shorten it" if len(self.tokens) == 1 else "type 'clear' to start a new conversation"
            raise UserError(f"this message would make the conversation {len(self.tokens) + len(turn)} tokens, "
                            f"over the model's context of {self.context}: {what}")
        self.tokens += turn
        max_tokens = min(sampling.pop("max_tokens", 256), room)
        reply, shown = [], ""
        for column, _ in self.engine.generate(self.tokens, max_tokens=max_tokens, **sampling):
            reply.append(column[0])  # drained to the end: the engine then keeps this turn's cache
            text = self.tokenizer.decode([t for t in reply if t != self.assistant_end])
            if not text.endswith("\ufffd"):  # print only whole UTF-8 characters
                out.write(text[len(shown):])
                out.flush()
                shown = text
        text = self.tokenizer.decode([t for t in reply if t != self.assistant_end])
        out.write(text[len(shown):] + "\n")
        if len(reply) == max_tokens and reply[-1] != self.assistant_end and max_tokens == room:
            out.write("[the conversation reached the model's context: type 'clear' to start over]\n")
        if not reply or reply[-1] != self.assistant_end:
            reply.append(self.assistant_end)  # the turn always closes, even when cut by max_tokens
        self.tokens += reply
        return text


def main(argv=None, stdin=None, out=None):
    args = build_parser().parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout  # None when the command started with them closed (<&-, >&-)
    if out is None:  # each of these before the model loads
        raise UserError("standard output is closed: nothing could show the replies")
    if args.prompt is None and stdin is None:
        raise UserError("standard input is closed: give it your messages, or pass -p PROMPT for one reply")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("-p: the prompt is empty; leave out -p to chat interactively")
    tool = chosen_tool(args)
    model, tokenizer, meta = load_model(args.source, args.model_tag, args.step)
    chat = Chat(Engine(model, tokenizer, tool=tool), tokenizer)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed)
    if args.prompt is not None:
        out.write("Assistant: ")
        return [chat.reply(args.prompt, out=out, **sampling)]
    out.write(f"jaxchat: {args.source} model {meta['model_tag']} step {meta['step']} "
              f"(context {chat.context} tokens). 'clear' starts over, 'quit' leaves.\n")
    replies = []
    while True:
        out.write("\nUser: ")
        out.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        message = line.strip()
        if message.lower() in ("quit", "exit"):
            break
        if message.lower() == "clear":
            chat.clear()
            out.write("Conversation cleared.\n")
            continue
        if not message:
            continue
        out.write("\nAssistant: ")
        try:
            replies.append(chat.reply(message, out=out, **sampling))
        except UserError as e:
            out.write(f"\n{e}\n")
    out.write("Goodbye!\n")
    return replies


def cli():
    try:
        run_main(main)
    except BrokenPipeError:  # the reader went away: no traceback, and the status a shell shows for SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's last flush at exit must not fail
        sys.exit(128 + signal.SIGPIPE)
    except KeyboardInterrupt:  # Ctrl-C: leave without a traceback, with the status a shell shows for SIGINT
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    cli()

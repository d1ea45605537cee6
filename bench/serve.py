"""Serving throughput through the real server: aggregate tokens/s and time to first token (TTFT) at 1, 4, 16 and 32
concurrent streams, beside the same requests served one at a time.

    python bench/serve.py                                   # jaxchat's d4 benchmark checkpoint if present, else
                                                            # a random model of its shape (speed needs no training)
    python bench/serve.py --slots 16 --chunk 16 --max-tokens 128

Method: uvicorn on 127.0.0.1 in this process, `httpx` streaming clients on another thread's event loop, every
request a short chat message (~20 prompt tokens), `stream: true` with usage, temperature 1.0, its own seed.
- concurrent: c requests sent at once to a server of `--slots` rows, `--rounds` times (at least 16 requests per
  level); aggregate tok/s = completion tokens of a round / its wall time from the first send to the last [DONE]
  (median over rounds); TTFT = first content chunk − send (p50, p95); per-stream tok/s = a request's tokens /
  (its end − its first token), as its user receives them (median).
- one at a time: 16 requests in sequence to a 1-slot server (the peer's way: one conversation per worker).
- nanochat (with --nanochat-dir set up as bench/decode.py's peer): its Engine's batch-1 decode tok/s from its CPU
  bench, the peer's one-stream speed. Run one after the other, never both at once.
"""
import argparse
import asyncio
import gzip
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import uvicorn

HOME = os.path.expanduser("~")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is the capital of France?", "Tell me about the history of science.", "How do plants grow?",
             "Write a short poem about the sea.", "Why is the sky blue?", "What is a prime number?",
             "Explain how a bicycle works.", "Who wrote Hamlet, and when?"]


def load(args, compute_dtype=None):
    """The benchmark checkpoint, or a random model of its shape (d4, vocab 8192, context 512, head dim 64)."""
    os.environ["JAXCHAT_BASE_DIR"] = args.base_dir
    from jaxchat.checkpoint_manager import load_model
    from jaxchat.common import UserError
    try:
        model, tok, meta = load_model("base", args.model_tag, compute_dtype=compute_dtype)
        return model, tok, f"{meta['model_tag']} step {meta['step']}"
    except UserError:
        from flax import nnx

        from jaxchat.model import GPT, config_for_depth
        from jaxchat.tokenizer import RustBPETokenizer
        from jaxchat.corpus import DEFAULT_CORPUS
        with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
            tok = RustBPETokenizer.train_from_iterator([json.loads(line)["text"] for line in f], 8192)
        config = config_for_depth(4, tok.get_vocab_size(), 512, head_dim=64, compute_dtype=compute_dtype)
        return GPT(config, rngs=nnx.Rngs(0)), tok, f"random d4 (no {args.model_tag} in {args.base_dir})"


class Served:
    def __init__(self, model, tok, slots, chunk):
        from jaxchat.chat_web import create_app
        from jaxchat.serving import SlotServer
        self.slot_server = SlotServer(model, tok, slots=slots, chunk=chunk, max_waiting=256)
        self.slot_server.warm_up()
        self.slot_server.start()
        app = create_app(lambda: self.slot_server, "bench", {"temperature": 1.0, "top_k": 0, "max_tokens": 128})
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while httpx.get(self.url + "/health").status_code != 200:
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join()


async def one(client, i, max_tokens):
    """(send time, first token time, end time, completion tokens) of one streamed request."""
    body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "temperature": 1.0,
            "max_tokens": max_tokens, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    sent, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return sent, first or time.perf_counter(), time.perf_counter(), tokens


async def concurrent(url, n, max_tokens, rounds, sequential=False):
    """`rounds` times: n requests at once (or one after another); [(start, runs)] per round."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        out = []
        for r in range(rounds):
            start = time.perf_counter()
            if sequential:
                runs = [await one(client, r * n + i, max_tokens) for i in range(n)]
            else:
                runs = await asyncio.gather(*(one(client, r * n + i, max_tokens) for i in range(n)))
            out.append((start, runs))
        return out


def summarize(name, rounds):
    """Aggregate tok/s: the median over rounds; TTFT and per-stream tok/s over every request of every round."""
    runs = [run for _, rs in rounds for run in rs]
    ttft = sorted(f - s for s, f, _, _ in runs)
    total = sum(t for *_, t in runs)
    aggregate = statistics.median(sum(t for *_, t in rs) / (max(e for _, _, e, _ in rs) - start)
                                  for start, rs in rounds)
    per_stream = statistics.median(t / max(e - f, 1e-9) for _, f, e, t in runs)
    row = {"streams": name, "requests": len(runs), "tokens": total, "aggregate_tok_s": aggregate,
           "per_stream_tok_s": per_stream, "ttft_p50_s": statistics.median(ttft),
           "ttft_p95_s": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))]}
    print(f"{name:>14}{len(runs):>6}{total:>8}{row['aggregate_tok_s']:>14,.0f}{per_stream:>14,.0f}"
          f"{1e3 * row['ttft_p50_s']:>12,.0f}{1e3 * row['ttft_p95_s']:>12,.0f}", flush=True)
    return row


def nanochat_one_stream(args):
    """nanochat's Engine, batch 1, through its CPU bench (None when the peer is not set up)."""
    py = os.path.join(args.nanochat_dir, ".venv", "bin", "python")
    if not (os.path.exists(py) and os.path.exists(args.nanochat_bench)):
        return None
    env = {**os.environ, "NANOCHAT_BASE_DIR": args.nanochat_base, "OMP_NUM_THREADS": str(os.cpu_count())}
    r = subprocess.run([py, args.nanochat_bench, "-g", args.nanochat_tag, "--batch-sizes", "1", "--prompt-tokens", "20",
                        "--decode-tokens", str(args.max_tokens)], cwd=args.nanochat_dir, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        print(f"nanochat bench failed: {r.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(r.stdout.splitlines()[-1])["sweep"][0]["tok_per_sec"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-dir", default=f"{HOME}/.cache/jaxchat-bench")
    p.add_argument("--model-tag", default="bench_d4_float32")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="repeats of each level (the median aggregate is shown)")
    p.add_argument("--streams", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16, 32])
    p.add_argument("--nanochat-dir", default=os.environ.get("NANOCHAT_DIR", f"{HOME}/.cache/nanochat-peer"))
    p.add_argument("--nanochat-base", default=os.environ.get("NANOCHAT_BASE_DIR", f"{HOME}/.cache/nanochat-peer-base"))
    p.add_argument("--nanochat-tag", default="bench_d4", help="the peer's d4 checkpoint (run_bench.sh: TAG)")
    p.add_argument("--nanochat-bench", default=os.path.join(ROOT, "..", "shared", "bench", "nanochat",
                                                            "cpu_infer_bench.py"))
    args = p.parse_args()
    print(f"load avg before: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    model, tok, what = load(args)
    print(f"model: {what}, {model.num_params():,} params, context {model.config.sequence_len}; "
          f"{args.max_tokens} tokens per request, chunk {args.chunk}")
    print(f"{'streams':>14}{'reqs':>6}{'tokens':>8}{'aggregate/s':>14}{'per stream/s':>14}{'TTFT p50 ms':>12}"
          f"{'TTFT p95 ms':>12}")
    rows = []
    alone = Served(model, tok, slots=1, chunk=args.chunk)
    rows.append(summarize("1 at a time", asyncio.run(concurrent(alone.url, 16, args.max_tokens, args.rounds,
                                                                sequential=True))))
    alone.close()
    served = Served(model, tok, slots=args.slots, chunk=args.chunk)
    for c in args.streams:
        rounds = max(args.rounds, 16 // c)  # at least 16 requests per level
        rows.append(summarize(f"{c} at once", asyncio.run(concurrent(served.url, c, args.max_tokens, rounds))))
    served.close()
    base = rows[0]["aggregate_tok_s"]
    for row in rows[1:]:
        print(f"{row['streams']}: {row['aggregate_tok_s'] / base:.2f}x the aggregate tok/s of one at a time")
    peer = nanochat_one_stream(args)
    if peer:
        mine = rows[1]["per_stream_tok_s"]
        print(f"one stream: jaxchat {mine:,.0f} tok/s as received vs nanochat Engine {peer:,.0f} tok/s: "
              f"{mine / peer:.2f}x")
    print(json.dumps({"model": what, "rows": rows, "nanochat_one_stream_tok_s": peer}))


if __name__ == "__main__":
    sys.exit(main())

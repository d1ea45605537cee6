"""The server under abuse, measured: its memory while clients send huge bodies, and the connections it holds for
clients that send nothing.

    python bench/server_limits.py                          # this checkout's server, default limits
    python bench/server_limits.py --tree /tmp/old --server-args ""   # another checkout (e.g. before a change)
    python bench/server_limits.py --server-args "--read-timeout 5" --wait 7

Method: a random tiny model saved as an SFT checkpoint in a temporary base dir, served by `python -m
jaxchat.chat_web` in a subprocess (from --tree), ready on /health.
- bodies: --clients raw-socket clients at once, each declaring a --body-mib body (Content-Length) to
  /v1/chat/completions and sending it in 1 MiB blocks until done or the server stops it; the server's resident
  memory (VmRSS) sampled every 20 ms: baseline and peak, and each client's answer, bytes sent and seconds.
- idle: --idle connections opened that send nothing; after 2 s, the server's open descriptors (/proc/PID/fd) and
  how many were answered at once (refused), and what a fresh GET /health gets; again after --wait seconds.
"""
import argparse
import dataclasses
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(base_dir):
    """A random tiny model (context 64, vocab 300) with its tokenizer, as `-i sft -g tiny` in base_dir."""
    os.environ["JAXCHAT_BASE_DIR"] = base_dir
    import jax.numpy as jnp
    from flax import nnx

    from jaxchat.checkpoint_manager import Checkpointer, checkpoint_dir
    from jaxchat.model import GPT, GPTConfig
    from jaxchat.tokenizer import RustBPETokenizer

    tok = RustBPETokenizer.train_from_iterator([" ".join(f"hello world {i} the cat sat" for i in range(400))], 300)
    tok.save(os.path.join(base_dir, "tokenizer"))
    model = GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),
                rngs=nnx.Rngs(0))
    ckpt = Checkpointer(checkpoint_dir("sft", "tiny"))
    ckpt.save(1, nnx.state(model), {"dummy": jnp.zeros(())}, {"model_config": dataclasses.asdict(model.config)}, tok)
    ckpt.close()


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def send_body(port, mib, out):
    """Declare `mib` MiB, send it in 1 MiB blocks until done or refused; out: (status line, MiB sent, seconds)."""
    start, sent, block = time.monotonic(), 0, b" " * (1 << 20)
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (mib << 20))
        for _ in range(mib):
            sock.sendall(block)
            sent += 1
    except OSError:
        pass  # the server closed the connection: its answer, if any, is still to be read
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except OSError:
        pass
    sock.close()
    out.append((reply.split(b"\r\n", 1)[0].decode() or "(no answer)", sent, time.monotonic() - start))


def bodies(pid, port, clients, mib):
    base, peak, done = rss_mib(pid), 0.0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mib(pid))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample)
    sampler.start()
    out = []
    threads = [threading.Thread(target=send_body, args=(port, mib, out)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    print(f"bodies: {clients} clients x {mib} MiB: server RSS {base:,.0f} MiB before, peak {peak:,.0f} MiB "
          f"(+{peak - base:,.0f} MiB)")
    for status, sent, seconds in out:
        print(f"  {status}: {sent} MiB sent, {seconds:.2f} s")


def idle(pid, url, port, n, wait):
    fds = open_fds(pid)
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)

    def report(when):
        answered = closed = 0
        for s in socks:
            try:
                data = s.recv(65536)
                answered += bool(data)
                closed += not data
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        try:
            fresh = httpx.get(url + "/health", timeout=5).status_code
        except httpx.TransportError as e:
            fresh = type(e).__name__
        print(f"  after {when}: server holds {open_fds(pid) - fds} more descriptors; {answered} answered at once "
              f"(refused), {closed} closed by the server; a fresh GET /health: {fresh}")

    print(f"idle: {n} connections that send nothing (server descriptors before: {fds})")
    time.sleep(2)
    report("2 s")
    time.sleep(max(0.0, wait - 2))
    report(f"{wait:g} s")
    for s in socks:
        s.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", default=ROOT, help="the checkout whose server runs")
    p.add_argument("--server-args", default="", help="more flags for python -m jaxchat.chat_web")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--body-mib", type=int, default=300)
    p.add_argument("--idle", type=int, default=3000)
    p.add_argument("--wait", type=float, default=32.0, help="seconds before the idle connections are looked at again")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as base_dir, tempfile.TemporaryFile("w+") as log:
        make_checkpoint(base_dir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "JAXCHAT_BASE_DIR": base_dir, "PYTHONPATH": args.tree}
        server = subprocess.Popen([sys.executable, "-m", "jaxchat.chat_web", "-i", "sft", "-g", "tiny", "-p", str(port),
                                   "--slots", "2", *shlex.split(args.server_args)], cwd=args.tree, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            print(f"server: {args.tree} {args.server_args}".rstrip())
            bodies(server.pid, port, args.clients, args.body_mib)
            idle(server.pid, url, port, args.idle, args.wait)
        finally:
            server.terminate()
            server.wait(30)
        log.seek(0)
        said = [line.rstrip() for line in log if "refused" in line or "Error" in line]
        print(f"server log: {len(said)} line(s) about refusals or errors" + "".join(f"\n  {s}" for s in said[:5]))


if __name__ == "__main__":
    main()

"""Inference speed beside nanochat's Engine, on the same model shape, one after the other.

    python bench/decode.py                       # jaxchat's d4 benchmark checkpoint, then nanochat's
    python bench/decode.py --skip-nanochat --model-tag d20 --base-dir ~/.cache/jaxchat

Method (nanochat's cpu_infer_bench.py, which the nanochat side runs): a 128-token natural-language prompt; prefill
TTFT at batch 1; then 128 decode tokens at T=1.0 for batch sizes 1, 8, 32. jaxchat is measured two ways:
  - streamed: `Engine.generate`, one device call per token (what the CLI does; nanochat's method: tok/s =
    batch × steps / summed step times, TPOT = median step time);
  - on device: `Engine.generate_batch`'s single `lax.while_loop` (what evals and RL do): tok/s = batch × steps /
    decode time, the decode time excluding the prefill.
Rows stop at <|bos|>/<|assistant_end|>; each figure sums `--repeats` seeds so early stops do not decide it.
Checkpoints: jaxchat's bench_d4_float32 from bench/pretrain_vs_nanochat.py (~/.cache/jaxchat-bench; without it a
random model of its shape, as bench/serve.py), nanochat's bench_d4 from the peer benchmark
(~/.cache/nanochat-peer-base).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax

HOME = os.path.expanduser("~")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAGRAPH = ("The history of science is the study of the development of science, including both the natural "
             "and social sciences. Science is a body of empirical, theoretical, and practical knowledge about "
             "the natural world. ")  # nanochat's infer_bench prompt


def ready(ds):
    jax.block_until_ready(ds.logits)
    return ds


def streamed(engine, prompt, batch, tokens, seed):
    """(ttft, step times) of Engine.generate, as nanochat's bench times its generator."""
    gen = engine.generate(prompt, num_samples=batch, max_tokens=tokens, temperature=1.0, seed=seed)
    t0 = time.perf_counter()
    next(gen)
    ttft, steps = time.perf_counter() - t0, []
    while True:
        t0 = time.perf_counter()
        if next(gen, None) is None:
            return ttft, steps
        steps.append(time.perf_counter() - t0)


def on_device(engine, prompt, batch, tokens, seed):
    """(decode seconds, steps) of the while-loop decode after a prefill."""
    ds, n_cols = engine._start([prompt], batch, tokens, seed, temperature=1.0)
    ready(ds)
    t0 = time.perf_counter()
    ds = ready(engine._run(ds, n_cols))
    return time.perf_counter() - t0, int(ds.n)


def run_jaxchat(args):
    from jaxchat.engine import Engine
    from serve import load

    model, tokenizer, what = load(args, compute_dtype=args.dtype)
    cfg = model.config
    engine = Engine(model, tokenizer)
    n_prompt = min(args.prompt_tokens, cfg.sequence_len - args.decode_tokens)
    prompt = tokenizer.encode(PARAGRAPH * (n_prompt // 10 + 1), prepend="<|bos|>")[:n_prompt]
    print(f"jaxchat {what} | depth {cfg.n_layer} dim {cfg.n_embd} heads "
          f"{cfg.n_head} vocab {cfg.vocab_size} | {model.num_params():,} params | {args.dtype} | {jax.devices()[0]}")
    out = {"sweep": []}
    ttfts = []
    for _ in range(6):  # compile, then the median of 5
        t0 = time.perf_counter()
        ready(engine._start([prompt], 1, args.decode_tokens, 0)[0])
        ttfts.append(time.perf_counter() - t0)
    ttft = statistics.median(ttfts[1:])
    out["prefill"] = {"ttft_sec": ttft, "tok_per_sec": n_prompt / ttft}
    print(f"prefill (batch 1, {n_prompt} tokens): {n_prompt / ttft:,.0f} tok/s | TTFT {ttft * 1e3:.1f} ms")
    print(f"{'batch':>6} {'streamed TPOT ms':>17} {'streamed tok/s':>15} {'on-device ms/step':>18} "
          f"{'on-device tok/s':>16} {'steps':>6}")
    for batch in args.batch_sizes:
        streamed(engine, prompt, batch, args.decode_tokens, 0)  # compile (same shapes as measured)
        on_device(engine, prompt, batch, args.decode_tokens, 0)
        steps, seconds, n_steps = [], 0.0, 0
        for seed in range(args.repeats):
            steps += streamed(engine, prompt, batch, args.decode_tokens, seed)[1]
            dt, n = on_device(engine, prompt, batch, args.decode_tokens, seed)
            seconds, n_steps = seconds + dt, n_steps + n
        row = {"batch_size": batch, "streamed_tpot_sec": statistics.median(steps),
               "streamed_tok_per_sec": batch * len(steps) / sum(steps),
               "device_sec_per_step": seconds / n_steps, "device_tok_per_sec": batch * n_steps / seconds,
               "decode_steps": n_steps}
        out["sweep"].append(row)
        print(f"{batch:>6} {1e3 * row['streamed_tpot_sec']:>17.2f} {row['streamed_tok_per_sec']:>15,.0f} "
              f"{1e3 * row['device_sec_per_step']:>18.2f} {row['device_tok_per_sec']:>16,.0f} {n_steps:>6}")
    return out


def run_nanochat(args):
    env = {**os.environ, "NANOCHAT_BASE_DIR": args.nanochat_base, "OMP_NUM_THREADS": str(os.cpu_count())}
    if args.dtype == "bfloat16":
        env["NANOCHAT_DTYPE"] = "bfloat16"
    py = os.path.join(args.nanochat_dir, ".venv", "bin", "python")
    cmd = [py, args.nanochat_bench, "-g", "bench_d4", "--batch-sizes", ",".join(map(str, args.batch_sizes)),
           "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens)]
    r = subprocess.run(cmd, cwd=args.nanochat_dir, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"nanochat bench failed:\n{r.stderr[-3000:]}")
    print("\n".join(r.stdout.splitlines()[:-1]))
    return json.loads(r.stdout.splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-dir", default=f"{HOME}/.cache/jaxchat-bench")
    p.add_argument("--model-tag", default="bench_d4_float32")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-nanochat", action="store_true")
    p.add_argument("--nanochat-dir", default=os.environ.get("NANOCHAT_DIR", f"{HOME}/.cache/nanochat-peer"))
    p.add_argument("--nanochat-base", default=os.environ.get("NANOCHAT_BASE_DIR", f"{HOME}/.cache/nanochat-peer-base"))
    p.add_argument("--nanochat-bench", default=os.path.join(ROOT, "..", "shared", "bench", "nanochat",
                                                            "cpu_infer_bench.py"))
    args = p.parse_args()
    print(f"load avg before: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    ours = run_jaxchat(args)
    if args.skip_nanochat or not os.path.exists(args.nanochat_bench):
        return
    print()
    theirs = run_nanochat(args)
    print(f"\n{'':<22}{'jaxchat':>12}{'nanochat':>12}{'ratio':>8}")
    rows = [("prefill tok/s (b=1)", ours["prefill"]["tok_per_sec"], theirs["prefill"]["tok_per_sec"])]
    for mine, peer in zip(ours["sweep"], theirs["sweep"]):
        b = mine["batch_size"]
        rows.append((f"decode tok/s b={b} dev", mine["device_tok_per_sec"], peer["tok_per_sec"]))
        rows.append((f"decode tok/s b={b} str", mine["streamed_tok_per_sec"], peer["tok_per_sec"]))
    for name, a, b in rows:
        print(f"{name:<22}{a:>12,.0f}{b:>12,.0f}{a / b:>7.2f}x")


if __name__ == "__main__":
    main()

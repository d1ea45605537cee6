"""Pretraining side by side with nanochat on this machine: same shards, same vocab, same shape, same steps.

    python bench/pretrain_vs_nanochat.py                      # jaxchat, then nanochat (one after the other)
    python bench/pretrain_vs_nanochat.py --dtype bfloat16     # both sides in bf16 (nanochat: NANOCHAT_DTYPE)
    python bench/pretrain_vs_nanochat.py --skip-nanochat

The peer is set up by the project's peer-benchmark scripts (a nanochat work tree + venv, default
~/.cache/nanochat-peer, and its offline shards in $NANOCHAT_BASE_DIR/base_data_climbmix, default
~/.cache/nanochat-peer-base). Shape: nanochat's CPU benchmark: depth 4, width 256, 4 heads of 64, vocab 8,192,
sequences of 512, 16 × 512 = 8,192 tokens per step, 200 steps, val bpb every 100 steps on 65,536 tokens. Both
tokenizers are trained on the same train shards (jaxchat's trainer reproduces rustbpe's merges, so the ids agree).
tok/s = tokens per step × steps / their summed step time, over steps > 10 (nanochat's convention).
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys

HOME = os.path.expanduser("~")


def timed(cmd, log, env=None, cwd=None):
    """Run under /usr/bin/time -v; returns (wall, peak RSS MiB) and leaves the full log in `log`."""
    with open(log, "w") as f:
        r = subprocess.run(["/usr/bin/time", "-v"] + cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    text = open(log).read()
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n" + "\n".join(text.splitlines()[-30:]))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    return wall, rss


def run_jaxchat(args, shards, logs):
    env = {**os.environ, "JAXCHAT_BASE_DIR": args.jaxchat_base}
    py = sys.executable
    if not os.path.exists(os.path.join(args.jaxchat_base, "tokenizer", "tokenizer.json")):
        timed([py, "-m", "jaxchat.tok_train", "--vocab-size=8192", f"--data-dir={shards}"], f"{logs}/jaxchat_tok.log", env)
    run = f"bench_d4_{args.dtype}"
    for d in ("runs", "base_checkpoints"):  # a fresh run: no old events, no checkpoint to collide with
        shutil.rmtree(os.path.join(args.jaxchat_base, d, run), ignore_errors=True)
    wall, rss = timed([py, "-m", "jaxchat.base_train", "--depth=4", "--head_dim=64", "--max_seq_len=512",
                       "--device_batch_size=16", "--total_batch_size=8192", f"--num_iterations={args.steps}",
                       "--eval_every=100", "--eval_tokens=65536", "--sample_every=-1", f"--dtype={args.dtype}",
                       f"--data_dir={shards}", f"--model_tag={run}", f"--run={run}"], f"{logs}/jaxchat_train.log", env)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(args.jaxchat_base, "runs", run))
    acc.Reload()
    dts = [(e.step, e.value) for e in acc.Scalars("train/dt")]
    warm = [dt for s, dt in dts if s > 10]
    bpb = {e.step: e.value for e in acc.Scalars("val/bpb")}
    loss = acc.Scalars("train/loss")[-1].value
    return {"tok_s": 8192 * len(warm) / sum(warm), "median_ms": 1e3 * statistics.median(warm),
            "first_step_s": dts[0][1], "bpb": bpb, "loss": loss, "wall": wall, "rss": rss}


def run_nanochat(args, logs):
    env = {**os.environ, "NANOCHAT_BASE_DIR": args.nanochat_base, "OMP_NUM_THREADS": str(os.cpu_count())}
    if args.dtype == "bfloat16":
        env["NANOCHAT_DTYPE"] = "bfloat16"
    py = os.path.join(args.nanochat_dir, ".venv", "bin", "python")
    if not os.path.exists(os.path.join(args.nanochat_base, "tokenizer", "tokenizer.pkl")):
        timed([py, "-m", "scripts.tok_train", "--vocab-size=8192"], f"{logs}/nanochat_tok.log", env, args.nanochat_dir)
    wall, rss = timed([py, "-m", "scripts.base_train", "--depth=4", "--head-dim=64", "--window-pattern=L",
                       "--max-seq-len=512", "--device-batch-size=16", "--total-batch-size=8192",
                       f"--num-iterations={args.steps}", "--eval-every=100", "--eval-tokens=65536",
                       "--core-metric-every=-1", "--sample-every=-1", "--model-tag=bench_d4"],
                      f"{logs}/nanochat_train.log", env, args.nanochat_dir)
    text = open(f"{logs}/nanochat_train.log").read()
    steps = [(int(s), float(loss), float(dt)) for s, loss, dt in
             re.findall(r"step (\d+)/\d+ .*?loss: ([\d.]+) .*?dt: ([\d.]+)ms", text)]
    warm = [dt / 1e3 for s, _, dt in steps if s > 10]
    bpb = {int(s): float(v) for s, v in re.findall(r"Step (\d+) \| Validation bpb: ([\d.]+)", text)}
    return {"tok_s": 8192 * len(warm) / sum(warm), "median_ms": 1e3 * statistics.median(warm),
            "first_step_s": steps[0][2] / 1e3, "bpb": bpb, "loss": steps[-1][1], "wall": wall, "rss": rss}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanochat-dir", default=os.environ.get("NANOCHAT_DIR", f"{HOME}/.cache/nanochat-peer"))
    p.add_argument("--nanochat-base", default=os.environ.get("NANOCHAT_BASE_DIR", f"{HOME}/.cache/nanochat-peer-base"))
    p.add_argument("--jaxchat-base", default=f"{HOME}/.cache/jaxchat-bench")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--skip-nanochat", action="store_true")
    args = p.parse_args()
    shards = os.path.join(args.nanochat_base, "base_data_climbmix")
    if not os.path.isdir(shards):
        sys.exit(f"no shards in {shards}: build them with the peer's build_offline_data.py (see its README)")
    logs = os.path.join(args.jaxchat_base, "bench_logs")
    os.makedirs(logs, exist_ok=True)
    load = open("/proc/loadavg").read().split()[:3]
    print(f"shards {shards} | {args.steps} steps, d4, 8,192 tokens/step, {args.dtype} | load avg before {' '.join(load)}")
    results = {"jaxchat": run_jaxchat(args, shards, logs)}
    if not args.skip_nanochat:
        results["nanochat"] = run_nanochat(args, logs)
    cols = list(results)
    rows = [("train tok/s (steps > 10)", lambda r: f"{r['tok_s']:,.0f}"),
            ("median step ms", lambda r: f"{r['median_ms']:.0f}"),
            ("first step s (compile)", lambda r: f"{r['first_step_s']:.1f}"),
            ("wall", lambda r: r["wall"]), ("peak RSS MiB", lambda r: f"{r['rss']:,.0f}"),
            ("final train loss (EMA)", lambda r: f"{r['loss']:.4f}")]
    rows += [(f"val bpb @ {s}", (lambda s: lambda r: f"{r['bpb'].get(s, float('nan')):.4f}")(s))
             for s in sorted(results["jaxchat"]["bpb"])]
    print(f"{'':<26}" + "".join(f"{c:>14}" for c in cols))
    for name, fmt in rows:
        print(f"{name:<26}" + "".join(f"{fmt(results[c]):>14}" for c in cols))
    if "nanochat" in results:
        print(f"jaxchat / nanochat tok/s: {results['jaxchat']['tok_s'] / results['nanochat']['tok_s']:.2f}x")


if __name__ == "__main__":
    main()

"""Evaluation speed beside nanochat's, on the same model shape and the same examples, one after the other.

    python bench/eval.py                                   # CORE: jaxchat's d4 benchmark checkpoint, then nanochat's
    python bench/eval.py --skip-nanochat --max-per-task 500 --model-tag d20 --base-dir ~/.cache/jaxchat

CORE: every task of the bundle, `--max-per-task` examples each (the same examples on both sides: shuffle seed 1337),
timed per task from reading its file to its accuracy (nanochat's per-task timer); examples/s = examples / seconds.
jaxchat's time includes its compiles (one per batch shape, cached across tasks). nanochat runs `scripts/base_eval.py
--eval core` (one forward per example). Both models are the d4 benchmark shape (vocab 8,192, 4 layers of 256, seq
512, fp32), trained separately by bench/pretrain_vs_nanochat.py, so their accuracies differ; the speed compares.
jaxchat crops prompts to the model's context (512) while nanochat runs the full prompt: `--max-len 8192` makes jaxchat
do nanochat's work (the table shows the tokens each side forwards). nanochat's GPT cannot go past 10x its
sequence_len, so tasks with longer prompts are left out on its side. The bundle: `--eval-bundle` (default
/work/shared/data/eval_bundle when present); nanochat reads it through a throwaway NANOCHAT_BASE_DIR of symlinks
(its checkpoints and tokenizer, our bundle with only the tasks it can run); nothing is downloaded.
"""
import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HOME = os.path.expanduser("~")
LOCAL_BUNDLE = "/work/shared/data/eval_bundle"
NANOCHAT_MAX_T = 10 * 512  # nanochat's rotary cache: 10 x the sequence_len of its bench_d4


def loadavg():
    return " ".join(open("/proc/loadavg").read().split()[:3])


def core_jaxchat(args):
    """{label: {examples, seconds, accuracy, tokens (jaxchat forwards), nanochat_tokens, nanochat_max_len}}."""
    os.environ["JAXCHAT_BASE_DIR"] = args.base_dir
    import jax
    from jaxchat import core_eval
    from jaxchat.checkpoint_manager import load_model

    model, tokenizer, meta = load_model("base", args.model_tag)
    cfg = model.config
    print(f"jaxchat {meta['model_tag']} step {meta['step']} | depth {cfg.n_layer} dim {cfg.n_embd} vocab "
          f"{cfg.vocab_size} seq {cfg.sequence_len} | {cfg.compute_dtype} | {jax.devices()[0]} | load {loadavg()}")
    tasks, _ = core_eval.load_bundle(core_eval.get_eval_bundle(args.eval_bundle, download=False))
    max_len = args.max_len or cfg.sequence_len
    out = {}
    for task in tasks:
        t0, c0 = time.perf_counter(), time.process_time()
        data = core_eval.load_task_data(task["path"], args.max_per_task)
        acc = core_eval.evaluate_task(model, tokenizer, data, task, max_len=max_len)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        # the work of each side: jaxchat's padded batches; nanochat's examples, each padded to its longest prompt
        rows = core_eval.prepare_task(tokenizer, data, task, max_len)
        plan = core_eval.plan_batches([len(r[0]) for r in rows], max_len)
        longest = {}
        for tokens, _, _, idx in core_eval.prepare_task(tokenizer, data, task, 1 << 30):
            n, top = longest.get(idx, (0, 0))
            longest[idx] = (n + 1, max(top, len(tokens)))
        out[task["label"]] = {"examples": len(data), "seconds": dt, "cpu_seconds": cpu, "accuracy": acc,
                              "tokens": sum(r * b for r, b, _ in plan),
                              "nanochat_tokens": sum(n * top for n, top in longest.values()),
                              "nanochat_max_len": max(top for _, top in longest.values())}
        print(f"  {task['label']:<34} {len(data):>5} ex {dt:>7.2f}s {len(data) / dt:>8.1f} ex/s  acc {acc:.4f}",
              flush=True)
    return out


def nanochat_base(args, labels):
    """A throwaway NANOCHAT_BASE_DIR: links to the peer's checkpoints and tokenizer, and a bundle (links to ours)
    whose core.yaml lists only `labels`. Nothing is downloaded, nothing of the peer's is changed."""
    import yaml
    base = tempfile.mkdtemp(prefix="nanochat-core-")
    for name in ("base_checkpoints", "tokenizer"):
        os.symlink(os.path.join(args.nanochat_base, name), os.path.join(base, name))
    bundle = os.path.join(base, "eval_bundle")
    os.makedirs(bundle)
    for name in ("eval_data", "eval_meta_data.csv"):
        os.symlink(os.path.join(os.path.abspath(args.eval_bundle), name), os.path.join(bundle, name))
    with open(os.path.join(args.eval_bundle, "core.yaml")) as f:
        config = yaml.safe_load(f)
    config["icl_tasks"] = [t for t in config["icl_tasks"] if t["label"] in labels]
    with open(os.path.join(bundle, "core.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    return base


def core_nanochat(args, labels):
    """({label: (seconds, accuracy)} parsed from nanochat's base_eval output on the tasks `labels`, its CPU seconds)."""
    base = nanochat_base(args, labels)
    env = {**os.environ, "NANOCHAT_BASE_DIR": base, "OMP_NUM_THREADS": str(os.cpu_count())}
    py = os.path.join(args.nanochat_dir, ".venv", "bin", "python")
    cmd = [py, "-m", "scripts.base_eval", "--eval", "core", "--max-per-task", str(args.max_per_task),
           "--model-tag", "bench_d4", "--device-type", "cpu"]
    print(f"nanochat: {' '.join(cmd[1:])} | load {loadavg()}")
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        r = subprocess.run(cmd, cwd=args.nanochat_dir, env=env, capture_output=True, text=True)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if r.returncode:
        sys.exit(f"nanochat base_eval failed:\n{r.stderr[-3000:]}")
    out = {}
    for m in re.finditer(r"Evaluating: (\S+) .*?accuracy: ([\d.]+) \| centered: \S+ \| time: ([\d.]+)s", r.stdout):
        out[m[1]] = (float(m[3]), float(m[2]))
        print(f"  {m[1]:<34} {float(m[3]):>7.2f}s  acc {float(m[2]):.4f}", flush=True)
    return out, cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime  # (model loading included)


def core(args):
    """CORE examples/s of both sides, printed side by side (on the tasks both can run)."""
    print(f"== CORE, {args.max_per_task} examples per task, bundle {args.eval_bundle}")
    ours = core_jaxchat(args)
    # nanochat's GPT stops at 10x its sequence_len (rotary cache): tasks with longer prompts crash it
    runnable = [k for k, v in ours.items() if v["nanochat_max_len"] <= NANOCHAT_MAX_T]
    if skipped := sorted(set(ours) - set(runnable)):
        print(f"nanochat cannot run {', '.join(skipped)}: prompts beyond its {NANOCHAT_MAX_T}-token rotary cache")
    theirs, their_cpu = ({}, None) if args.skip_nanochat else core_nanochat(args, runnable)
    print(f"\n{'task':<34} {'ex':>5} {'jaxchat ex/s':>13} {'nanochat ex/s':>14} {'speedup':>8} "
          f"{'jaxchat Mtok':>13} {'nanochat Mtok':>14}")
    for label, v in ours.items():
        n = v["examples"]
        peer = f"{n / theirs[label][0]:>14.1f} {theirs[label][0] / v['seconds']:>7.1f}x" if label in theirs \
            else f"{'-':>14} {'':>8}"
        print(f"{label:<34} {n:>5} {n / v['seconds']:>13.1f} {peer} {v['tokens'] / 1e6:>13.3f} "
              f"{v['nanochat_tokens'] / 1e6:>14.3f}")
    common = [k for k in ours if k in theirs] or list(ours)
    n = sum(ours[k]["examples"] for k in common)
    t_ours = sum(ours[k]["seconds"] for k in common)
    line = f"{'all' + (' (both ran)' if theirs else ''):<34} {n:>5} {n / t_ours:>13.1f}"
    t_theirs = sum(theirs[k][0] for k in common) if theirs else None
    if theirs:
        line += f" {n / t_theirs:>14.1f} {t_theirs / t_ours:>7.1f}x"
    print(f"{line}   (jaxchat {t_ours:.1f}s" + (f", nanochat {t_theirs:.1f}s)" if theirs else ")"))
    cpu_ours = sum(ours[k]["cpu_seconds"] for k in common)  # CPU time: less sensitive to a busy machine
    print(f"CPU seconds on those tasks: jaxchat {cpu_ours:.1f}" +
          (f", nanochat {their_cpu:.1f} (its whole run) = {their_cpu / cpu_ours:.1f}x" if theirs else ""))
    print(f"load avg after: {loadavg()}")
    return {"examples": n, "jaxchat_s": t_ours, "nanochat_s": t_theirs}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-dir", default=f"{HOME}/.cache/jaxchat-bench")
    p.add_argument("--model-tag", default="bench_d4_float32")
    p.add_argument("--max-per-task", type=int, default=100)
    p.add_argument("--max-len", type=int, default=0, help="crop prompts to this (default: the model's context)")
    p.add_argument("--eval-bundle", default=LOCAL_BUNDLE if os.path.isdir(LOCAL_BUNDLE) else None)
    p.add_argument("--skip-nanochat", action="store_true")
    p.add_argument("--nanochat-dir", default=os.environ.get("NANOCHAT_DIR", f"{HOME}/.cache/nanochat-peer"))
    p.add_argument("--nanochat-base", default=os.environ.get("NANOCHAT_BASE_DIR", f"{HOME}/.cache/nanochat-peer-base"))
    args = p.parse_args()
    if args.eval_bundle is None:
        sys.exit("no CORE bundle: pass --eval-bundle DIR")
    if not args.skip_nanochat and not os.path.isdir(args.nanochat_dir):
        print(f"no nanochat checkout at {args.nanochat_dir}: jaxchat only")
        args.skip_nanochat = True
    core(args)


if __name__ == "__main__":
    main()

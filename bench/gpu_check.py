"""The GPU check: what a few minutes on one GPU can tell, most informative first, figures in one JSON file.

    python bench/gpu_check.py                        # one H100/H200: ~8 minutes, writes gpu_check.json
    python bench/gpu_check.py --toy --out x.json     # tiny shapes, any backend (its test runs it on CPU)

Parts, each in its own process (so an OOM or a hang costs only that part, and peak memory is per part) and under
its own time budget; what would start with less than its budget left is skipped and says so:
  1. attention: cuDNN flash attention (where it can run; else jaxchat's XLA kernel) against an fp32 reference,
     outputs and dq/dk/dv, MHA and GQA, a length that is not a multiple of 128; and whether the compiled program
     holds the fused cuDNN call.
  2. train: the d20 train step in bf16 at device batch 8, 16, 32 (131,072 tokens per step): compile time, step
     time, tok/s, MFU (nanochat's FLOP formula: 6·(N − N_wte) + 12·L·d·T per token), peak device memory beside
     XLA's own figure for the program.
  3. train_xla: the same step at device batch 16 with jaxchat's XLA attention kernel instead of cuDNN.
  4. decode: the engine's on-device decode loop (random weights: speed does not depend on them), batch 1 and 32.
  5. predict: the largest batch's step compiled for the card's shipped description without using the card, as
     `python -m jaxchat.memory --target=h100` does on a machine with no GPU: its peak beside the measured one.
Runs from a checkout without installing (PYTHONPATH=.): it needs jax, flax, optax and numpy, not the tokenizer or
the Rust extension. Where the GPU machine's flax/optax differ from the pins, bring them as wheels made beforehand,
`pip download --no-deps --only-binary=:all: --python-version 3.12 -d wheels flax==0.12.8 optax==0.2.8`, and
`pip install --no-deps wheels/*.whl` there first.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FULL = dict(depth=20, vocab=65536, seq=2048, tokens=131072, batches=(8, 16, 32), decode_batches=(1, 32),
            prompt=128, new_tokens=256, attn=[(2, 2048, 10, 10, 128), (2, 1000, 8, 2, 128), (1, 777, 4, 4, 64)])
TOY = dict(depth=2, vocab=512, seq=128, tokens=1024, batches=(2, 4, 8), decode_batches=(1, 4),
           prompt=16, new_tokens=16, attn=[(2, 128, 4, 4, 32), (2, 100, 4, 2, 32)])
# seconds per part (per batch: train)
BUDGETS = {"attention": 60, "train": 100, "train_xla": 100, "decode": 60, "predict": 90}


def part_attention(size, _):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxchat.attention import causal_attention, cudnn_problem

    results = []
    for B, T, H, K, D in size["attn"]:
        keys = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(keys[0], (B, T, H, D), jnp.bfloat16)
        k, v = (jax.random.normal(kk, (B, T, K, D), jnp.bfloat16) for kk in keys[1:3])
        do = jax.random.normal(keys[3], (B, T, H, D), jnp.float32)
        impl = "xla" if cudnn_problem(q, k, jnp.bfloat16) else "cudnn"

        def reference(q, k, v):  # fp32, exact matmuls (no TF32)
            kr, vr = (jnp.repeat(t, H // K, axis=2) for t in (k, v))
            s = jnp.einsum("bthd,bshd->bhts", q, kr, precision="highest") * D ** -0.5
            s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
            return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), vr, precision="highest")

        def fwd_bwd(fn, *args):
            out, vjp = jax.vjp(fn, *args)
            return (out, *vjp(do.astype(out.dtype)))

        tested = jax.jit(lambda q, k, v: fwd_bwd(lambda *a: causal_attention(*a, jnp.bfloat16, impl), q, k, v))
        got = tested(q, k, v)
        want = jax.jit(lambda q, k, v: fwd_bwd(reference, q, k, v))(*(t.astype(jnp.float32) for t in (q, k, v)))
        errors = {name: float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / (float(jnp.max(jnp.abs(w))) + 1e-9))
                  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
        hlo = tested.lower(q, k, v).compile().as_text()
        t0 = time.perf_counter()
        for _ in range(5):
            jax.block_until_ready(tested(q, k, v))
        results.append({"shape": {"B": B, "T": T, "H": H, "K": K, "D": D}, "impl": impl,
                        "max_rel_error": errors, "fused_cudnn_call": "cudnn" in hlo.lower(),
                        "fwd_bwd_ms": 1e3 * (time.perf_counter() - t0) / 5,
                        "ok": bool(np.all(np.array(list(errors.values())) < 2e-2))})
    return results


def part_train(size, batch, attn_impl="auto"):
    import jax
    import numpy as np

    from jaxchat import aot, hardware, sharding
    from jaxchat.model import config_for_depth
    from jaxchat.optim import OptimConfig, hyperparams
    from jaxchat.train import init_train_state, train_step

    device = jax.devices()[0]
    config = config_for_depth(size["depth"], size["vocab"], size["seq"], compute_dtype="bfloat16",
                              attn_impl=attn_impl)
    accum = size["tokens"] // (batch * size["seq"])
    tokens = np.random.default_rng(0).integers(0, size["vocab"], (accum, batch, size["seq"] + 1), np.int32)
    with jax.set_mesh(sharding.make_mesh(devices=[device])):
        state = init_train_state(config, OptimConfig())
        data = sharding.shard_batch({"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}, batch_axis=1)
        hyper = hyperparams()
        t0 = time.perf_counter()
        compiled = train_step.lower(state, data, hyper).compile()
        compile_s = time.perf_counter() - t0
        xla_peak_bytes = aot.memory(compiled)["peak"]
        flops_per_token = state.model.estimate_flops()
        times = []
        for _ in range(4):  # the first call warms up and is not counted
            t0 = time.perf_counter()
            state, metrics = compiled(state, data, hyper)
            float(metrics["loss"])
            times.append(time.perf_counter() - t0)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    tok_s = size["tokens"] / step_s
    peak = hardware.peak_flops(device.device_kind)
    stats = device.memory_stats() or {}
    return {"device_batch_size": batch, "accum": accum, "attn_impl": attn_impl, "compile_s": compile_s,
            "step_s": step_s, "step_times_s": times, "tok_s": tok_s, "loss": float(metrics["loss"]),
            "mfu": flops_per_token * tok_s / peak if peak else None,
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "xla_program_peak_bytes": xla_peak_bytes}


def part_predict(size, batch):
    """What `python -m jaxchat.memory --target=...` predicts for the train step at this batch: the program compiled
    for this card's shipped description (aot.py) without touching the card, as on a machine with no GPU."""
    import jax

    from jaxchat import aot, memory, sharding
    from jaxchat.model import config_for_depth
    from jaxchat.optim import OptimConfig

    kind = jax.devices()[0].device_kind
    target = next((t for name, t in (("H100", "h100"), ("H200", "h200"), ("A100", "a100-80")) if name in kind), "cpu")
    config = config_for_depth(size["depth"], size["vocab"], size["seq"], compute_dtype="bfloat16")
    mesh = sharding.make_mesh(devices=aot.target_devices(target, 1))
    shapes = (size["tokens"] // (batch * size["seq"]), batch, size["seq"], False)
    compiled, _, compile_s = memory.compile_train_step(config, OptimConfig(), shapes, mesh)
    stats = aot.analyse(compiled)
    return {"target": target, "device_batch_size": batch, "compile_s": compile_s, "peak_bytes": stats["peak"],
            "rematerialized": stats["rematerialized"], "custom_calls": stats["custom_calls"]}


def part_decode(size, batch):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxchat.engine import Engine
    from jaxchat.model import GPT, config_for_depth

    class Specials:  # the engine needs only the special tokens' ids from a tokenizer
        def get_bos_token_id(self):
            return 0

        def encode_special(self, name):
            return {"<|assistant_end|>": 1, "<|python_start|>": 2, "<|python_end|>": 3, "<|output_start|>": 4,
                    "<|output_end|>": 5}[name]

    config = config_for_depth(size["depth"], size["vocab"], size["seq"], compute_dtype="bfloat16")
    model = GPT(config, rngs=nnx.Rngs(0))
    for path, p in nnx.iter_graph(model):  # zero-initialised projections would make every row alike
        if isinstance(p, nnx.Param) and not jnp.any(p[...]):
            p[...] = 0.02 * jax.random.normal(jax.random.key(len(path)), p.shape)
    engine = Engine(model, Specials())
    prompt = [0] + list(range(10, 10 + size["prompt"] - 1))
    out = {}
    for attempt in ("warmup", "timed"):
        ds, n_cols = engine._start([prompt], batch, size["new_tokens"], seed=0, temperature=1.0)
        jax.block_until_ready(ds.logits)
        t0 = time.perf_counter()
        ds = engine._run(ds, n_cols)
        jax.block_until_ready(ds.logits)
        out = {"batch": batch, "steps": int(ds.n), "seconds": time.perf_counter() - t0}
    out["tok_s"] = batch * out["steps"] / out["seconds"]
    return out


def run_part(name, args, extra):
    """One part in a fresh process; its result, or why there is none."""
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--arg", str(extra)] + (["--toy"] if args.toy else [])
    budget = BUDGETS[name] * (3 if args.toy else 1)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"over its budget of {budget} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1][-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--toy", action="store_true", help="tiny shapes (any backend)")
    p.add_argument("--total-seconds", type=float, default=480, help="the whole check's budget")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--arg", help=argparse.SUPPRESS)
    args = p.parse_args()
    size = TOY if args.toy else FULL
    if args.part:  # inside a part's process
        from jaxchat.distributed import configure_accelerator
        configure_accelerator()
        fn = {"attention": part_attention, "train": part_train, "decode": part_decode, "predict": part_predict,
              "train_xla": lambda s, b: part_train(s, b, "xla")}[args.part]
        print(json.dumps(fn(size, None if args.arg in (None, "None") else int(args.arg))))
        return
    import jax  # only to describe the machine; the parts run in their own processes
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "jax": jax.__version__,
              "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "toy": args.toy,
              "size": {k: v for k, v in size.items() if k != "attn"}, "parts": {}}
    del jax
    plan = [("attention", None)] + [("train", b) for b in size["batches"]] + [("train_xla", size["batches"][1])] + \
           [("decode", b) for b in size["decode_batches"]] + [("predict", size["batches"][-1])]
    start = time.perf_counter()
    for name, extra in plan:
        key = name if extra is None else f"{name}_{extra}"
        left = args.total_seconds - (time.perf_counter() - start)
        if left < BUDGETS[name] and not args.toy:
            report["parts"][key] = {"skipped": f"{left:.0f} s left, budget {BUDGETS[name]} s"}
        else:
            t0 = time.perf_counter()
            report["parts"][key] = run_part(name, args, extra)
            print(f"{key}: {time.perf_counter() - t0:.0f} s: {json.dumps(report['parts'][key])[:400]}", flush=True)
        with open(args.out, "w") as f:  # after every part: a cut-off run still leaves its figures
            json.dump(report, f, indent=2)
    print(f"figures in {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

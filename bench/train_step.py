"""Benchmark jaxchat's train step: compile time, median step time, tokens/s, FLOP/s and MFU, peak memory.

    python bench/train_step.py                      # the CPU d4 shape, fp32
    python bench/train_step.py --dtype bfloat16
    python bench/train_step.py --depth 20 --vocab-size 65536 --seq-len 2048 --device-batch-size 32 \
        --total-batch-size 65536 --head-dim 128 --dtype bfloat16       # one GPU

FLOPs per token follow nanochat's `estimate_flops`: 6·(N − N_wte) + 12·L·H·head_dim·T (attention counted as
if unmasked). MFU = achieved / peak; the peak comes from --peak-tflops or the table below (none for CPUs: there
only the achieved GFLOP/s is printed). Random tokens; the data pipeline is not timed.
"""

import argparse
import statistics
import time

import jax
import numpy as np

from jaxchat import sharding
from jaxchat.hardware import peak_flops, peak_memory
from jaxchat.model import config_for_depth
from jaxchat.optim import OptimConfig, hyperparams
from jaxchat.train import init_train_state, train_step



def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=64, help="64 gives nanochat's CPU d4 bench shape (4 heads)")
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--total-batch-size", type=int, default=8192, help="tokens per optimizer step")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none", help="none | block | matmuls | attention")
    p.add_argument("--scan-layers", type=int, default=0, help="1: the blocks under one lax.scan")
    p.add_argument("--fp8", type=int, default=0, help="1: the large matmuls in fp8 (needs --dtype bfloat16)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="per device; default from the device name")
    return p.parse_args()


def main():
    args = parse_args()
    devices = jax.devices()
    mesh = sharding.make_mesh()
    config = config_for_depth(args.depth, args.vocab_size, args.seq_len, head_dim=args.head_dim,
                              compute_dtype=args.dtype, remat=args.remat, scan_layers=bool(args.scan_layers),
                              fp8=bool(args.fp8))
    rows = args.device_batch_size * len(devices)
    accum, rem = divmod(args.total_batch_size, rows * args.seq_len)
    assert accum >= 1 and rem == 0, "total batch size must be a multiple of device batch × seq len × devices"

    tokens = np.random.default_rng(0).integers(0, args.vocab_size, (accum, rows, args.seq_len + 1), np.int32)
    with jax.set_mesh(mesh):
        state = init_train_state(config, OptimConfig())
        batch = sharding.shard_batch({"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}, batch_axis=1)
    model = state.model
    n_params, flops_per_token = model.num_params(), model.estimate_flops()
    hyper = hyperparams(1.0, 0.95)
    print(f"{jax.default_backend()} × {len(devices)} ({devices[0].device_kind}) | d{args.depth}: {config}")
    print(f"params {n_params:,} | FLOPs/token {flops_per_token:.4g} = 6·(N − N_wte) + 12·L·H·head_dim·T "
          f"(nanochat) | {accum} × {rows} × {args.seq_len} tokens/step")

    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = train_step.lower(state, batch, hyper).compile()
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.steps + 1):  # the first call warms up the runtime and is not counted
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch, hyper)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    print("step times (ms):", " ".join(f"{1e3 * t:.0f}" for t in times))
    step_s = statistics.median(times[1:])
    tok_s = args.total_batch_size / step_s
    flops = flops_per_token * tok_s
    kind = devices[0].device_kind
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(kind)
    mfu = f" | MFU {100 * flops / (peak * len(devices)):.1f}% of {peak / 1e12:g} TFLOP/s/device" if peak else ""
    print(f"loss {float(metrics['loss']):.4f} | compile {compile_s:.1f} s | step median {1e3 * step_s:.1f} ms "
          f"(min {1e3 * min(times[1:]):.1f}) | {tok_s:,.0f} tok/s | {flops / 1e9:,.1f} GFLOP/s{mfu}")
    label, gib = peak_memory()
    print(f"{gib:.2f} GiB {label}")


if __name__ == "__main__":
    main()

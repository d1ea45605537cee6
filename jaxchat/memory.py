"""Will it fit? The train step's memory per device, before renting the hardware:

    python -m jaxchat.memory --config=d20                       # base_train of a config, on 8 devices
    python -m jaxchat.memory --config=d32 --device_batch_size=8 --remat=block --devices=8 --fits=h100

Two figures per device, both without an accelerator:
- compiled: the train step compiled ahead of time for the config's model, batch and mesh on `--devices` fake CPU
  devices; XLA's buffer assignment gives parameters, optimizer state, batch, temporaries and the peak. It is
  exact for XLA:CPU (what a CPU run allocates), but the CPU program is not the GPU's: the CPU attention kernel
  and fusions keep more fp32 scratch than cuDNN and XLA:GPU do.
- accelerator estimate: what any backend must hold — state and gradient accumulators (exact, from the
  shardings), the activations autodiff keeps for the backward pass (exact, traced from the model for one
  device's rows), plus the largest transients (a chunk of the loss's logits, one block's backward).
The GPU check prints measured peaks beside both. Flags after --config are base_train's
(`--device_batch_size=16`, `--remat=block`, `--scan_layers=1`, `--dtype=bfloat16`, ...).
"""
import argparse
import math
import os
import sys
import time

from jaxchat import pipeline
from jaxchat.common import UserError
from jaxchat.distributed import run_main
from jaxchat.hardware import DEVICES, GIB, GPU_MEM_FRACTION


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="", help="a config name or .toml path (default: base_train's defaults)")
    p.add_argument("--devices", type=int, default=8, help="devices of the target mesh (faked on the CPU)")
    p.add_argument("--fits", default="", help=f"judge only this device ({', '.join(DEVICES)}); default: all")
    p.add_argument("--vocab_size", type=int, default=0, help="default: the config's tok_train.vocab_size, else 65536")
    return p


def base_train_args(config_name, overrides, vocab_size):
    """base_train's flags as the launcher would pass them for `config_name` and the `--key=value` overrides."""
    config = pipeline.load_config(config_name) if config_name else {}
    config["stages"] = ["base_train"]  # the overrides are base_train's alone
    [(_, argv)] = pipeline.plan(config, overrides)
    args = pipeline.stage_parser("base_train").parse_args(argv)
    return args, vocab_size or config.get("tok_train", {}).get("vocab_size", 65536)


def train_step_memory(model_config, optim_config, device_batch_size, accum, mesh):
    """Compile the train step for `mesh` without running it: per-device bytes {params, optimizer, batch, temp,
    outputs (not aliased to inputs), peak} and the compile time."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from jaxchat import sharding
    from jaxchat.optim import hyperparams
    from jaxchat.train import abstract_train_state, train_step

    with jax.set_mesh(mesh):
        state = abstract_train_state(model_config, optim_config)
        place = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=nnx.get_named_sharding(v, mesh).get_value())
        is_var = lambda x: isinstance(x, nnx.Variable)
        state = state.replace(params=jax.tree.map(lambda v: v.replace(place(v)), state.params, is_leaf=is_var),
                              opt_state=jax.tree.map(lambda v: v.replace(place(v)), state.opt_state, is_leaf=is_var))
        rows = device_batch_size * mesh.size
        spec = sharding.logical_to_spec((None, "batch", None))
        tokens = jax.ShapeDtypeStruct((accum, rows, model_config.sequence_len), jax.numpy.int32,
                                      sharding=NamedSharding(mesh, spec))
        t0 = time.perf_counter()
        compiled = train_step.lower(state, {"inputs": tokens, "targets": tokens}, hyperparams()).compile()
        compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    local = lambda tree: sum(_local_bytes(x) for x in jax.tree.leaves(tree))
    figures = {"params": local(state.params), "optimizer": local(state.opt_state), "batch": 2 * _local_bytes(tokens),
               "temp": m.temp_size_in_bytes, "outputs": m.output_size_in_bytes - m.alias_size_in_bytes,
               "arguments": m.argument_size_in_bytes}
    figures["peak"] = figures["arguments"] + figures["temp"] + figures["outputs"]
    return figures, compile_s


def saved_activations(model_config, rows):
    """Bytes autodiff keeps from the forward pass for the backward of the loss over `rows` sequences (one device's
    rows; weights as the device holds them while computing, i.e. gathered): JAX's own residual count."""
    import jax
    from flax import nnx
    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

    from jaxchat.model import GPT

    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: GPT(model_config, rngs=nnx.Rngs(0))), nnx.Param, ...)
    tokens = jax.ShapeDtypeStruct((rows, model_config.sequence_len), jax.numpy.int32)
    loss = lambda params, idx: nnx.merge(graphdef, params, rest).loss(idx, idx, reduction="sum")
    return sum(a.size * a.dtype.itemsize for a, why in saved_residuals(loss, params, tokens)
               if not why.startswith("from the argument"))


def accelerator_estimate(figures, model_config, device_batch_size, loss_chunk_rows=4096):
    """Per-device bytes any backend needs at the peak (the end of the forward pass of the last micro-batch):
    arguments, gradient accumulators (as the parameters), saved activations, and transients — a chunk of the
    fused loss (fp32 logits, probabilities and their gradient) and twice one block's activations (its backward)."""
    saved = saved_activations(model_config, device_batch_size)
    loss_chunk = 3 * loss_chunk_rows * model_config.vocab_size * 4
    transient = loss_chunk + 2 * saved // model_config.n_layer
    return {"saved_activations": saved, "transient": transient,
            "estimate": figures["arguments"] + figures["params"] + saved + transient}


def _local_bytes(x):
    shard = x.sharding.shard_shape(x.shape)
    return math.prod(shard) * x.dtype.itemsize


def main(argv=None):
    args, overrides = build_parser().parse_known_args(argv)
    if args.fits and args.fits not in DEVICES:
        raise UserError(f"--fits={args.fits}: one of {', '.join(DEVICES)}")
    # Fake devices are a flag of XLA's CPU client, read when JAX first starts a backend: set it before that.
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
        # the CPU scheduler that trades memory for concurrency would overstate the peak
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler"
                                   f"=false --xla_force_host_platform_device_count={args.devices}").strip()
    import jax

    from jaxchat.model import config_for_depth
    from jaxchat.run import batch_rows, make_mesh, model_execution, optim_config

    if jax.device_count() < args.devices:
        raise UserError(f"--devices={args.devices} but JAX already started with {jax.device_count()} devices")
    train_args, vocab_size = base_train_args(args.config, overrides, args.vocab_size)
    config = config_for_depth(train_args.depth, vocab_size, train_args.max_seq_len,
                              n_kv_head=train_args.n_kv_head or None, head_dim=train_args.head_dim,
                              **model_execution(train_args))
    mesh = make_mesh(train_args, devices=jax.devices()[:args.devices])
    _, accum = batch_rows(train_args, train_args.total_batch_size, train_args.max_seq_len, device_count=args.devices)
    print(f"d{train_args.depth}: {config}")
    print(f"mesh {dict(mesh.shape)} | device batch {train_args.device_batch_size} × {train_args.max_seq_len} tokens "
          f"× {accum} micro-batches | compiling on {args.devices} fake CPU devices ...", flush=True)
    figures, compile_s = train_step_memory(config, optim_config(train_args, grad_clip=train_args.grad_clip),
                                           train_args.device_batch_size, accum, mesh)
    figures.update(accelerator_estimate(figures, config, train_args.device_batch_size))
    labels = {"params": "parameters", "optimizer": "optimizer state", "batch": "batch",
              "temp": "temporaries (activations, grads)", "outputs": "outputs not donated",
              "peak": "peak of the XLA:CPU program", "saved_activations": "activations kept for the backward",
              "transient": "transients (loss chunk, one block)", "estimate": "accelerator estimate"}
    print(f"compiled in {compile_s:.0f} s; per device:")
    for key, label in labels.items():
        print(f"  {label:<36} {figures[key] / GIB:8.2f} GiB")
    for key in [args.fits] if args.fits else DEVICES:
        usable = DEVICES[key][1] * (1.0 if key.startswith("tpu") else GPU_MEM_FRACTION)
        verdict = "fits" if figures["estimate"] <= usable else "does NOT fit"
        print(f"  {verdict:>12} {DEVICES[key][0]} ({usable / GIB:.1f} GiB usable) by the accelerator estimate")
    return figures


if __name__ == "__main__":
    run_main(main)

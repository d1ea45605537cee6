"""Will it fit? Every training stage's step compiled for the target hardware, before renting it:

    python -m jaxchat.memory --config=d20 --target=h100            # 8×H100, XLA:GPU's own program (no GPU needed)
    python -m jaxchat.memory --config=d20 --target=tpu-v5p --devices=4 --stages=base_train
    python -m jaxchat.memory --config=d32 --device_batch_size=8 --remat=block        # fake CPU devices

Each stage's train step is lowered with the config's model, batch and mesh and compiled by the target's own
compiler (aot.py): XLA:GPU for GPUs (the CUDA plugin, `pip install 'jaxchat[gpu]'`), libtpu for TPUs
(`jaxchat[tpu]`), XLA:CPU on fake devices for `--target=cpu`. Per device it prints what the compiler assigned
(parameters, optimizer state, batch, temporaries, outputs not donated, the peak) and whether that fits the card at
the memory fraction the stages set; the kernels the program runs (fused attention, GEMMs, collectives with their
bytes); its FLOPs; the compile time. If XLA had to rematerialise to stay under the card's memory, the program as
written does not fit, and it says so. What a compile without the hardware cannot see: autotuning (GEMM and fusion
choices may differ a little on the card) and cuDNN's workspaces, which are not in the buffer sizes.

Flags after the memory flags are the stages' own, as the launcher takes them: `--device_batch_size=16` (every
stage with that flag), `--chat_sft.device_batch_size=8` (one stage).
"""
import argparse
import math
import os
import sys
import time

from jaxchat import aot, pipeline
from jaxchat.common import UserError
from jaxchat.distributed import run_main
from jaxchat.hardware import GIB

TRAINING_STAGES = ("base_train", "mid_train", "chat_sft", "chat_rl")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="", help="a config name or .toml path (default: the stages' defaults)")
    p.add_argument("--target", default="cpu", help=f"the hardware to compile for: {', '.join(aot.TARGETS)}")
    p.add_argument("--devices", type=int, default=0, help="devices of the target mesh (default: 8 GPUs or CPUs, "
                                                          "a v5p-8 slice's 4 chips, 8 v5e/v6e chips)")
    p.add_argument("--stages", default=",".join(TRAINING_STAGES), help="comma-separated training stages")
    p.add_argument("--vocab_size", type=int, default=0, help="default: the config's tok_train.vocab_size, else 65536")
    return p


def stage_args(config_name, stages, overrides):
    """{stage: its parsed flags} as the launcher would pass them for `config_name` and the `--key=value` overrides;
    base_train's are always there (they define the model)."""
    config = pipeline.load_config(config_name) if config_name else {}
    config["stages"] = list(dict.fromkeys(("base_train", *stages)))
    return config, {stage: pipeline.stage_parser(stage).parse_args(argv) for stage, argv in pipeline.plan(config, overrides)}


def step_shapes(stage, args, sequence_len, device_count):
    """(micro-batches, rows per micro-batch over all devices, row length, weighted) of one optimizer step."""
    from jaxchat.run import batch_rows
    if stage in ("base_train", "mid_train"):
        T = args.max_seq_len or sequence_len
        rows, accum = batch_rows(args, args.total_batch_size, row_len=T, device_count=device_count)
        return accum, rows, T, False
    per_step = args.target_examples_per_step if stage == "chat_sft" else args.examples_per_step * args.num_samples
    rows, accum = batch_rows(args, per_step, device_count=device_count)
    T = (args.max_seq_len or sequence_len) if stage == "chat_sft" else sequence_len
    return accum, rows, T, stage == "chat_rl"  # RL weighs each token's loss by its advantage


def compile_train_step(model_config, optim_config, shapes, mesh):
    """The train step lowered for `mesh` from shapes alone and compiled: (compiled, {params, optimizer, batch}
    bytes per device from the shardings, compile seconds)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from jaxchat import sharding
    from jaxchat.optim import hyperparams
    from jaxchat.train import abstract_train_state, train_step

    accum, rows, T, weighted = shapes
    with jax.set_mesh(mesh):
        state = abstract_train_state(model_config, optim_config)
        place = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=nnx.get_named_sharding(v, mesh).get_value())
        is_var = lambda x: isinstance(x, nnx.Variable)
        state = state.replace(params=jax.tree.map(lambda v: v.replace(place(v)), state.params, is_leaf=is_var),
                              opt_state=jax.tree.map(lambda v: v.replace(place(v)), state.opt_state, is_leaf=is_var))
        batch_sharding = NamedSharding(mesh, sharding.logical_to_spec((None, "batch", None)))
        tokens = jax.ShapeDtypeStruct((accum, rows, T), jax.numpy.int32, sharding=batch_sharding)
        batch = {"inputs": tokens, "targets": tokens}
        if weighted:
            batch["weights"] = jax.ShapeDtypeStruct((accum, rows, T), jax.numpy.float32, sharding=batch_sharding)
        t0 = time.perf_counter()
        compiled = train_step.lower(state, batch, hyperparams()).compile()
        compile_s = time.perf_counter() - t0
    local = lambda tree: sum(_local_bytes(x) for x in jax.tree.leaves(tree))
    formula = state.model.estimate_flops() * accum * rows * T // mesh.size  # per device, as MFU counts it
    return compiled, {"params": local(state.params), "optimizer": local(state.opt_state), "batch": local(batch),
                      "formula_flops": formula}, compile_s


def _local_bytes(x):
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def report(figures, usable):
    """The lines printed for one compiled stage."""
    gib = lambda b: f"{b / GIB:.2f} GiB"
    lines = [f"  {label:<34} {gib(figures[key]):>12}" for key, label in (
        ("params", "parameters"), ("optimizer", "optimizer state"), ("batch", "batch"),
        ("temp", "temporaries (activations, grads)"), ("outputs", "outputs not donated"), ("peak", "peak"))]
    if usable:
        label, limit = usable
        verdict = "fits" if figures["peak"] <= limit and not figures["rematerialized"] else "does NOT fit"
        lines.append(f"  {verdict} {label} ({limit / GIB:.1f} GiB usable)")
    if figures["rematerialized"]:
        lines.append(f"  XLA rematerialised {figures['rematerialized']} instructions to stay under the device's "
                     "memory: the program as written does not fit")
    per_step = lambda counts: ", ".join(f"{n} × {name}" for name, n in sorted(counts.items())) or "none"
    lines.append(f"  custom calls per step: {per_step(figures['custom_calls'])}")
    if figures["gemm_fusions"]:
        lines.append(f"  GEMM fusions per step: {per_step(figures['gemm_fusions'])}")
    moved = ", ".join(f"{n} × {kind} ({b / 2**20:,.1f} MiB)" for kind, (n, b) in sorted(figures["collectives"].items()))
    lines.append(f"  collectives per step: {moved or 'none'}")
    lines.append(f"  matmul FLOPs per step: {figures['flops']:.3e} in the program (attention in custom calls not "
                 f"counted), {figures['formula_flops']:.3e} by the model's formula")
    return lines


def main(argv=None):
    args, overrides = build_parser().parse_known_args(argv)
    aot.check_target(args.target)
    stages = [s for s in args.stages.split(",") if s]
    if unknown := [s for s in stages if s not in TRAINING_STAGES]:
        raise UserError(f"--stages: {', '.join(unknown)} not among {', '.join(TRAINING_STAGES)}")
    generation = aot.TPU_TARGETS.get(args.target, (None,))[0]
    devices = args.devices or (4 if generation == "v5p" else 8)
    # Fake CPU devices are a flag of XLA's CPU client, read when JAX first starts a backend: set it before that.
    # Compile-only GPU and TPU devices need no backend of their own; the host's CPU one is enough.
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
        if args.target == "cpu":  # the CPU scheduler that trades memory for concurrency would overstate the peak
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_"
                                       f"scheduler=false --xla_force_host_platform_device_count={devices}").strip()
    from jaxchat.model import config_for_depth
    from jaxchat.run import make_mesh, model_execution, optim_config

    config, parsed = stage_args(args.config, stages, overrides)
    base = parsed["base_train"]
    vocab_size = args.vocab_size or config.get("tok_train", {}).get("vocab_size", 65536)
    target_devices = aot.target_devices(args.target, devices)
    usable = aot.usable_memory(args.target)
    print(f"{args.target}: {devices} × {target_devices[0].device_kind}")
    results = {}
    for stage in stages:
        stage_flags = parsed[stage]
        model_config = config_for_depth(base.depth, vocab_size, base.max_seq_len, n_kv_head=base.n_kv_head or None,
                                        head_dim=base.head_dim, **model_execution(stage_flags))
        shapes = step_shapes(stage, stage_flags, base.max_seq_len, devices)
        mesh = make_mesh(stage_flags, devices=target_devices)
        optim = optim_config(stage_flags, **({"grad_clip": base.grad_clip} if stage == "base_train" else {}))
        accum, rows, T, _ = shapes
        print(f"\n{stage}: d{base.depth} {model_config.compute_dtype} | mesh {dict(mesh.shape)} | device batch "
              f"{rows // devices} × {T} tokens × {accum} micro-batches | compiling ...", flush=True)
        compiled, figures, compile_s = compile_train_step(model_config, optim, shapes, mesh)
        figures.update(aot.analyse(compiled), compile_s=compile_s)
        print(f"  compiled in {compile_s:.0f} s; per device:")
        print("\n".join(report(figures, usable)))
        results[stage] = figures
    return results


if __name__ == "__main__":
    run_main(main)

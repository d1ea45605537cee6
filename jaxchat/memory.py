"""Will it fit? Every training stage's step, and decoding, compiled for the target hardware before renting it:

    python -m jaxchat.memory --config=d20 --target=h100            # 8×H100, XLA:GPU's own program (no GPU needed)
    python -m jaxchat.memory --config=d20 --target=tpu-v5p --devices=4 --stages=base_train
    python -m jaxchat.memory --config=d32 --device_batch_size=8 --remat=block        # fake CPU devices
    python -m jaxchat.memory --config=d20 --target=h100 --stages=engine,server --slots=32

Each stage's train step is lowered with the config's model, batch and mesh, and so are the two decoders: `engine`,
the engine's prefill and decode loop at one RL step's rollouts (chat_rl's examples_per_step × num_samples rows,
max_new_tokens each: the engine's largest use); `server`, the web server's prompt prefill and decode step at its
--slots and --chunk, over the whole context. Both decode the model of the config's last training stage (its
dtype, never fp8), with the weights replicated on every device.
All are compiled by the target's own compiler (aot.py): XLA:GPU for GPUs (the CUDA plugin, `pip install
'jaxchat[gpu]'`), libtpu for TPUs (`jaxchat[tpu]`), XLA:CPU on fake devices for `--target=cpu`.

Per device it prints what the compiler assigned (parameters or weights, optimizer state, batch or KV cache,
temporaries, outputs not donated, the peak) and whether that fits the card at the memory fraction the stages set;
the kernels the program runs (fused attention, GEMMs, collectives with their bytes) per step, per call, or per
token (the engine's decode loop runs until its rows end: counted once, a token of each row); its matmul FLOPs
beside the model's formula (attention behind a custom call is not counted, nor a product of one row that XLA
computes as a reduction); the compile time. If XLA had to rematerialise to stay under the card's memory, the
program as written does not fit, and it says so. What a compile without the hardware cannot see: autotuning (GEMM
and fusion choices may differ a little on the card) and cuDNN's workspaces, which are not in the buffer sizes.

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
DECODERS = ("engine", "server")  # sized by chat_rl's flags and --slots/--chunk


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="", help="a config name or .toml path (default: the stages' defaults)")
    p.add_argument("--target", default="cpu", help=f"the hardware to compile for: {', '.join(aot.TARGETS)}")
    p.add_argument("--devices", type=int, default=0, help="devices of the target mesh (default: 8 GPUs or CPUs, "
                                                          "a v5p-8 slice's 4 chips, 8 v5e/v6e chips)")
    p.add_argument("--stages", default=",".join(TRAINING_STAGES + DECODERS),
                   help="comma-separated training stages and decoders")
    p.add_argument("--slots", type=int, default=8, help="server: rows decoded together (chat_web's --slots)")
    p.add_argument("--chunk", type=int, default=16, help="server: decode steps per call (chat_web's --chunk)")
    p.add_argument("--vocab_size", type=int, default=0, help="default: the config's tok_train.vocab_size, else 65536")
    return p


def stage_args(config, stages, overrides):
    """{stage: its parsed flags} as the launcher would pass them for a loaded `config` and the `--key=value`
    overrides; base_train's are always there (they define the model)."""
    plan = pipeline.plan({**config, "stages": list(dict.fromkeys(("base_train", *stages)))}, overrides)
    return {stage: pipeline.stage_parser(stage).parse_args(argv) for stage, argv in plan}


def served_stage(config):
    """The training stage whose model a config ends with: the one its decoders run (dtype, remat)."""
    return next((s for s in reversed(config.get("stages", [])) if s in TRAINING_STAGES), "base_train")


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
    """The train step lowered for `mesh` from shapes alone and compiled: (compiled, {"parts": [(label, bytes per
    device)] of its arguments, "formula_flops": per device}, compile seconds)."""
    import jax
    from jax.sharding import NamedSharding

    from jaxchat import sharding
    from jaxchat.optim import hyperparams
    from jaxchat.train import abstract_train_state, train_step

    accum, rows, T, weighted = shapes
    with jax.set_mesh(mesh):
        state = abstract_train_state(model_config, optim_config)
        state = state.replace(params=_placed(state.params, mesh), opt_state=_placed(state.opt_state, mesh))
        batch_sharding = NamedSharding(mesh, sharding.logical_to_spec((None, "batch", None)))
        tokens = jax.ShapeDtypeStruct((accum, rows, T), jax.numpy.int32, sharding=batch_sharding)
        batch = {"inputs": tokens, "targets": tokens}
        if weighted:
            batch["weights"] = jax.ShapeDtypeStruct((accum, rows, T), jax.numpy.float32, sharding=batch_sharding)
        compiled, compile_s = _compile(train_step.lower(state, batch, hyperparams()), mesh)
    formula = state.model.estimate_flops() * accum * rows * T // mesh.size  # per device, as MFU counts it
    parts = [("parameters", _local_bytes(state.params)), ("optimizer state", _local_bytes(state.opt_state)),
             ("batch", _local_bytes(batch))]
    return compiled, {"parts": parts, "formula_flops": formula}, compile_s


def engine_shape(args, sequence_len):
    """(prompts, prompt bucket, rows, new tokens) of one RL step's rollouts (chat_rl's flags) under the active
    mesh, as the engine sizes them: prompts fill the context but for the new tokens."""
    from jaxchat.engine import prefill_shape
    P, T, rows = prefill_shape(args.examples_per_step, args.num_samples, sequence_len - args.max_new_tokens)
    return P, T, rows, args.max_new_tokens


def compile_engine(model_config, shape, mesh):
    """The engine's prefill and decode loop (jaxchat.engine) at `shape` (engine_shape), weights replicated:
    [(name, compiled, {"parts": [(label, bytes per device)]}, compile seconds)]."""
    import jax

    from jaxchat import engine
    from jaxchat.decoding import empty_rows

    P, T, rows, new_tokens = shape
    with jax.set_mesh(mesh):
        graphdef, weights = _decoding_weights(model_config, mesh)
        tokens, start = _replicated(mesh, ((P, T), "int32"), ((P,), "int32"))
        prefill, prefill_s = _compile(engine._prefill.lower(graphdef, weights, tokens, start, rows, new_tokens), mesh)

        def rows_after_prefill(weights, tokens, start):
            logits, cache = engine._prefill(graphdef, weights, tokens, start, rows, new_tokens)
            return empty_rows(cache, logits, new_tokens)

        decode_rows = _rows_placed(jax.eval_shape(rows_after_prefill, weights, tokens, start), mesh)
        stop, = _replicated(mesh, ((), "int32"))
        decode, decode_s = _compile(engine._decode.lower(graphdef, _fake_ids(), weights, decode_rows, stop), mesh)
    prefill_figures = {"parts": [("weights", _local_bytes(weights)), ("prompts", _local_bytes(tokens))],
                       "formula_flops": _forward_flops(model_config, P * T, mesh), "unit": "call"}
    return [("prefill", prefill, prefill_figures, prefill_s),
            ("decode loop", decode,
             {"parts": _decode_parts(weights, decode_rows), "formula_flops": _forward_flops(model_config, rows, mesh),
              "unit": "token"}, decode_s)]


def compile_server(model_config, slots, chunk, mesh):
    """The web server's prefill of a whole-context prompt and its decode step over all rows and the whole context
    (jaxchat.serving), weights replicated: [(name, compiled, {"parts": ...}, compile seconds)]."""
    import jax
    import jax.numpy as jnp

    from jaxchat import serving
    from jaxchat.decoding import empty_rows
    from jaxchat.kv_cache import KVCache

    context, dtype = model_config.sequence_len, jnp.dtype(model_config.compute_dtype)
    with jax.set_mesh(mesh):
        graphdef, weights = _decoding_weights(model_config, mesh)
        held, cache_len = serving.cache_shape(slots, chunk, context)
        tokens, start = _replicated(mesh, ((1, context), "int32"), ((1,), "int32"))
        prefill, prefill_s = _compile(serving._prefill_one.lower(graphdef, weights, tokens, start), mesh)
        rows = jax.eval_shape(lambda: empty_rows(KVCache.create(model_config, held, cache_len, dtype),
                                                 jnp.zeros((held, model_config.vocab_size)), chunk))
        rows = _rows_placed(rows, mesh)
        lowered = serving._decode_rows.lower(graphdef, _fake_ids(), weights, rows, held, context + chunk)
        decode, decode_s = _compile(lowered, mesh)
    prefill_figures = {"parts": [("weights", _local_bytes(weights)), ("prompt", _local_bytes(tokens))],
                       "formula_flops": _forward_flops(model_config, context, mesh), "unit": "call"}
    return [("prefill", prefill, prefill_figures, prefill_s),
            (f"decode call ({held} rows × up to {chunk} tokens)", decode,
             {"parts": _decode_parts(weights, rows), "formula_flops": _forward_flops(model_config, held * chunk, mesh),
              "unit": "call"}, decode_s)]


def _forward_flops(model_config, tokens, mesh):
    """The forward pass's share (a third) of the model's training FLOPs for `tokens` tokens, per device."""
    from flax import nnx

    from jaxchat.model import GPT
    model = nnx.eval_shape(lambda: GPT(model_config, rngs=nnx.Rngs(0)))
    return model.estimate_flops() * tokens // 3 // mesh.size


def _fake_ids():
    """Special token ids for a compile: the decode step compares tokens with them, their values do not change it."""
    from jaxchat.decoding import SpecialTokens
    return SpecialTokens(*range(6))


def _decoding_weights(model_config, mesh):
    """(graphdef, weights as decoding holds them, shapes only): kernels in the compute dtype, on every device."""
    import jax
    from flax import nnx

    from jaxchat.decoding import _HashedOnce, decoding_dtypes
    from jaxchat.model import GPT

    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(model_config, rngs=nnx.Rngs(0))))
    state = jax.eval_shape(lambda s: decoding_dtypes(s, model_config.compute_dtype), state)
    return _HashedOnce(graphdef), _placed(state, mesh, replicate=True)


def _placed(tree, mesh, replicate=False):
    """An NNX state of shapes with each Variable's value given its sharding: as Flax resolves its logical names,
    or replicated."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    def place(v):
        where = NamedSharding(mesh, PartitionSpec()) if replicate else nnx.get_named_sharding(v, mesh).get_value()
        return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=where))

    return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _rows_placed(rows, mesh):
    """Decode rows (shapes) with every array split as decoding pins them (`sharding.row_names`)."""
    import jax
    from jax.sharding import NamedSharding

    from jaxchat import sharding
    where = lambda x: NamedSharding(mesh, sharding.logical_to_spec(sharding.row_names(x)))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where(x)), rows)


def _replicated(mesh, *shapes):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    everywhere = NamedSharding(mesh, PartitionSpec())
    return [jax.ShapeDtypeStruct(shape, dtype, sharding=everywhere) for shape, dtype in shapes]


def _decode_parts(weights, rows):
    cache = _local_bytes(rows.cache)
    return [("weights", _local_bytes(weights)), ("KV cache", cache), ("rows' state", _local_bytes(rows) - cache)]


def _compile(lowered, mesh):
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options=aot.compile_options(mesh))
    return compiled, time.perf_counter() - t0


def _local_bytes(tree):
    """Bytes per device of a tree of shapes with shardings."""
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def report(figures, usable, unit="step"):
    """The lines printed for one compiled program; `unit`: what one run of it is (a step, a call, a token)."""
    gib = lambda b: f"{b / GIB:.2f} GiB"
    parts = figures["parts"] + [("temporaries (activations, grads)", figures["temp"]),
                                ("outputs not donated", figures["outputs"]), ("peak", figures["peak"])]
    lines = [f"  {label:<34} {gib(b):>12}" for label, b in parts]
    if usable:
        label, limit = usable
        verdict = "fits" if figures["peak"] <= limit and not figures["rematerialized"] else "does NOT fit"
        lines.append(f"  {verdict} {label} ({limit / GIB:.1f} GiB usable)")
    if figures["rematerialized"]:
        lines.append(f"  XLA rematerialised {figures['rematerialized']} instructions to stay under the device's "
                     "memory: the program as written does not fit")
    per = lambda counts: ", ".join(f"{n} × {name}" for name, n in sorted(counts.items())) or "none"
    lines.append(f"  custom calls per {unit}: {per(figures['custom_calls'])}")
    if figures["gemm_fusions"]:
        lines.append(f"  GEMM fusions per {unit}: {per(figures['gemm_fusions'])}")
    moved = ", ".join(f"{n} × {kind} ({b / 2**20:,.1f} MiB)" for kind, (n, b) in sorted(figures["collectives"].items()))
    lines.append(f"  collectives per {unit}: {moved or 'none'}")
    lines.append(f"  matmul FLOPs per {unit}: {figures['flops']:.3e} in the program, {figures['formula_flops']:.3e} by "
                 "the model's formula")
    return lines


def main(argv=None):
    args, overrides = build_parser().parse_known_args(argv)
    aot.check_target(args.target)
    stages = [s for s in args.stages.split(",") if s]
    if unknown := [s for s in stages if s not in TRAINING_STAGES + DECODERS]:
        raise UserError(f"--stages: {', '.join(unknown)} not among {', '.join(TRAINING_STAGES + DECODERS)}")
    generation = aot.TPU_TARGETS.get(args.target, (None,))[0]
    devices = args.devices or (4 if generation == "v5p" else 8)
    # Fake CPU devices are a flag of XLA's CPU client, read when JAX first starts a backend: set it before that.
    # Compile-only GPU and TPU devices need no backend of their own; the host's CPU one is enough.
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
        if args.target == "cpu":  # the CPU scheduler that trades memory for concurrency would overstate the peak
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_"
                                       f"scheduler=false --xla_force_host_platform_device_count={devices}").strip()
    import jax

    from jaxchat.model import config_for_depth
    from jaxchat.run import make_mesh, model_execution, optim_config

    config = pipeline.load_config(args.config) if args.config else {}
    # the decoders are sized by chat_rl's flags (its rollouts) and compute as the config's last training stage does
    flag_stages = [s if s in TRAINING_STAGES else "chat_rl" for s in stages]
    parsed = stage_args(config, [*flag_stages, served_stage(config)], overrides)
    base = parsed["base_train"]
    vocab_size = args.vocab_size or config.get("tok_train", {}).get("vocab_size", 65536)
    target_devices = aot.target_devices(args.target, devices)
    usable = aot.usable_memory(args.target)
    print(f"{args.target}: {devices} × {target_devices[0].device_kind}")
    results = {}
    for stage, flag_stage in zip(stages, flag_stages):
        stage_flags = parsed[flag_stage]
        execution = model_execution(stage_flags)
        if stage in DECODERS:  # never in fp8 (evaluations and samples leave it out too)
            execution = {**model_execution(parsed[served_stage(config)]), "fp8": False}
        model_config = config_for_depth(base.depth, vocab_size, base.max_seq_len, n_kv_head=base.n_kv_head or None,
                                        head_dim=base.head_dim, recipe=base.model, **execution)
        mesh = make_mesh(stage_flags, devices=target_devices)
        fp8 = " fp8" if model_config.fp8 else ""
        head = f"\n{stage}: d{base.depth} {model_config.compute_dtype}{fp8} | mesh {dict(mesh.shape)} | "
        if stage == "engine":
            with jax.set_mesh(mesh):
                P, T, rows, new = shape = engine_shape(stage_flags, base.max_seq_len)
            print(head + f"{P} prompts × {T} tokens, {rows} rows × {new} new tokens | compiling ...", flush=True)
            programs = compile_engine(model_config, shape, mesh)
        elif stage == "server":
            print(head + f"{args.slots} slots, chunk {args.chunk}, context {base.max_seq_len} | compiling ...",
                  flush=True)
            programs = compile_server(model_config, args.slots, args.chunk, mesh)
        else:
            shapes = step_shapes(stage, stage_flags, base.max_seq_len, devices)
            optim = optim_config(stage_flags)
            accum, rows, T, _ = shapes
            print(head + f"device batch {rows // devices} × {T} tokens × {accum} micro-batches | compiling ...",
                  flush=True)
            programs = [("train step", *compile_train_step(model_config, optim, shapes, mesh))]
        for name, compiled, figures, compile_s in programs:
            figures.update(aot.analyse(compiled), compile_s=compile_s)
            print(f"  {name}: compiled in {compile_s:.0f} s; per device:")
            print("\n".join(report(figures, usable, figures.get("unit", "step"))))
            results[stage if stage in TRAINING_STAGES else f"{stage} {name}"] = figures
    return results


if __name__ == "__main__":
    run_main(main)

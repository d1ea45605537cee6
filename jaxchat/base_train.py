"""Pretrain the base model: `python -m jaxchat.base_train [--depth=20 ...]` (flags as nanochat's base_train).

The loop runs num_iterations + 1 times: every step first evaluates / samples / saves when due, the last one does only
that. Metrics are fetched one step late, so the host never stalls the device. Checkpoints hold everything the loop
needs (model, optimizer, data-loader position, EMA loss, timers), so `--resume` continues exactly: on CPU the resumed
run's losses equal the uninterrupted run's bit for bit.
"""
import argparse
import dataclasses
import json
import os
import time

import jax
from flax import nnx
from tqdm import tqdm

from jaxchat import sharding
from jaxchat.checkpoint_manager import Checkpointer, check_model_config, checkpoint_dir
from jaxchat.common import UserError, get_base_dir, run_main
from jaxchat.dataloader import DataLoader
from jaxchat.loss_eval import evaluate_bpb
from jaxchat.model import config_for_depth
from jaxchat.optim import OptimConfig, get_lr_multiplier, get_muon_momentum, hyperparams
from jaxchat.engine import Engine
from jaxchat.tensorboard import SummaryWriter
from jaxchat.tokenizer import get_token_bytes, get_tokenizer
from jaxchat.train import TrainState, check_finite, init_train_state, model_and_optimizer, train_step

# settings a resumed run must share with the run it continues (anything else, e.g. eval_every, may change)
RESUME_KEYS = ("dtype", "num_iterations", "target_flops", "target_param_data_ratio", "total_batch_size", "rows",
               "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip", "warmup_ratio",
               "warmdown_ratio", "final_lr_frac", "data_dir")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per device, nanochat's MFU basis
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then "
                  "tomorrow will be", "The opposite of hot is", "My lord, I", "To be, or not to be"]


def sample_greedy(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=16):
    """Each prompt continued greedily by the engine, all in one batch; returns prompt + continuation texts."""
    ids = [tokenizer.encode(p, prepend=tokenizer.get_bos_token_id()) for p in prompts]
    results, _ = Engine(model, tokenizer).generate_batch(ids, max_tokens=max_tokens, temperature=0.0)
    return [tokenizer.decode(r[1:]) for r in results]


def build_parser():
    p = argparse.ArgumentParser(description="Pretrain a jaxchat base model.")
    add = lambda name, **kw: p.add_argument(f"--{name.replace('_', '-')}", f"--{name}", **kw)
    add("depth", type=int, default=20, help="the one dial: model_dim = 64·depth")
    add("head_dim", type=int, default=128)
    add("n_kv_head", type=int, default=0, help="key/value heads (GQA); 0 = as many as query heads")
    add("max_seq_len", type=int, default=2048)
    add("dtype", default="float32", choices=["float32", "bfloat16"], help="matmul dtype (params stay fp32)")
    add("mesh_data", type=int, default=1, help="size of the mesh's data axis; the rest of the devices go to fsdp")
    add("num_iterations", type=int, default=-1, help="explicit horizon (> target_flops > ratio)")
    add("target_flops", type=float, default=-1.0)
    add("target_param_data_ratio", type=int, default=20, help="Chinchilla: tokens = ratio × params")
    add("device_batch_size", type=int, default=32, help="rows per device per micro-batch (the OOM knob)")
    add("total_batch_size", type=int, default=524288, help="tokens per optimizer step")
    add("embedding_lr", type=float, default=0.2)
    add("unembedding_lr", type=float, default=0.004)
    add("matrix_lr", type=float, default=0.02)
    add("weight_decay", type=float, default=0.0)
    add("grad_clip", type=float, default=1.0)
    add("warmup_ratio", type=float, default=0.0)
    add("warmdown_ratio", type=float, default=0.2)
    add("final_lr_frac", type=float, default=0.0)
    add("eval_every", type=int, default=250)
    add("eval_tokens", type=int, default=20 * 524288)
    add("sample_every", type=int, default=2000)
    add("save_every", type=int, default=-1, help="-1: only at the end")
    add("keep", type=int, default=2, help="checkpoints kept")
    add("model_tag", default="", help="checkpoint directory name (default d<depth>)")
    add("resume", type=int, default=0, help="1: continue from the latest checkpoint of this model tag")
    add("overwrite", type=int, default=0, help="1: a fresh run may replace this model tag's old checkpoints")
    add("data_dir", default="", help="pretraining shards (default: $JAXCHAT_BASE_DIR/base_data)")
    add("seed", type=int, default=0)
    add("run", default="", help="TensorBoard run name (default: the model tag)")
    return p


def horizon(args, num_params, flops_per_token):
    """nanochat's precedence: num_iterations > target_flops > target_param_data_ratio."""
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        return round(args.target_flops / (flops_per_token * args.total_batch_size))
    if args.target_param_data_ratio > 0:
        return args.target_param_data_ratio * num_params // args.total_batch_size
    raise UserError("no training horizon: set num_iterations, target_flops or target_param_data_ratio")


def restore_train_state(ckpt, step, config, optim_config, mesh, seed):
    """The (model, optimizer) state of a checkpoint, laid out on `mesh`."""
    graphdef, abstract = nnx.split(nnx.eval_shape(model_and_optimizer(config, optim_config, seed)))
    model_state, optim_state, meta = ckpt.restore(step, abstract[0], abstract[1], mesh=mesh)
    return TrainState(graphdef, nnx.State({0: model_state, 1: optim_state})), meta


def main(argv=None):
    args = build_parser().parse_args(argv)
    tokenizer, token_bytes = get_tokenizer(), get_token_bytes()
    try:
        mesh = sharding.make_mesh((args.mesh_data, -1))
    except ValueError as e:
        raise UserError(f"--mesh_data={args.mesh_data}: {e}") from None
    n_dev = mesh.devices.size
    config = config_for_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len, n_kv_head=args.n_kv_head or None,
                              head_dim=args.head_dim, compute_dtype=args.dtype)
    optim_config = OptimConfig(embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
                               matrix_lr=args.matrix_lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip)
    T, rows = args.max_seq_len, args.device_batch_size * n_dev
    accum, rem = divmod(args.total_batch_size, rows * T)
    if accum < 1 or rem:
        raise UserError(f"total_batch_size {args.total_batch_size} must be a multiple of device_batch_size × "
                        f"max_seq_len × devices = {args.device_batch_size} × {T} × {n_dev} = {rows * T}")
    model_tag = args.model_tag or f"d{args.depth}"
    ckpt = Checkpointer(checkpoint_dir("base", model_tag), max_to_keep=args.keep)

    # ---- state: fresh or resumed --------------------------------------------------------------------------------
    loop = {"smooth_loss": 0.0, "min_val_bpb": float("inf"), "total_training_time": 0.0, "val_bpb": None}
    loader_state, step = None, 0
    if args.resume:
        if ckpt.latest_step() is None:
            raise UserError(f"--resume: no checkpoint to resume in {ckpt.directory}")
        meta = ckpt.restore_meta()
        check_model_config(meta, config, ckpt.directory)
        saved = {**meta["user_config"], "rows": meta["rows"]}
        changed = {k: (saved.get(k), v) for k, v in {**vars(args), "rows": rows}.items() if k in RESUME_KEYS
                   and saved.get(k) != v}
        if changed:
            raise UserError(f"--resume: {ckpt.directory} was trained with other settings: " + ", ".join(
                f"{k} saved {a} vs now {b}" for k, (a, b) in changed.items()) + " (resume with the same ones)")
        state, meta = restore_train_state(ckpt, meta["step"], config, optim_config, mesh, args.seed)
        step, loader_state, loop = meta["step"], meta["loader_state"], meta["loop"]
    else:
        if ckpt.all_steps() and not args.overwrite:
            raise UserError(f"{ckpt.directory} already holds checkpoints (steps {ckpt.all_steps()}): --resume=1 "
                            f"continues that run, --overwrite=1 replaces it, --model_tag=NAME starts another")
        for old_step in ckpt.all_steps():
            ckpt.manager.delete(old_step)
        state = init_train_state(config, optim_config, mesh, seed=args.seed)
    model = state.model
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    num_iterations = horizon(args, num_params, flops_per_token)
    loader = DataLoader(tokenizer, rows, T, "train", args.data_dir or None, state=loader_state)
    eval_steps = max(1, args.eval_tokens // (rows * T))
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
    print(f"{jax.default_backend()} × {n_dev} ({kind}), mesh {dict(mesh.shape)} | {model_tag}: {config}")
    print(f"params {num_params:,} | FLOPs/token {flops_per_token:.4g} | {num_iterations} steps × {args.total_batch_size:,}"
          f" tokens ({accum} micro-batches of {rows}×{T}) = {num_iterations * args.total_batch_size:,} tokens | "
          f"total {num_iterations * args.total_batch_size * flops_per_token:.3g} FLOPs")
    if step == 0:
        sharding.print_sharding_table(model, mesh)
    writer = SummaryWriter(os.path.join(get_base_dir(), "runs", args.run or f"base_{model_tag}"))
    user_config = vars(args)

    def save(step):
        meta = {"model_config": dataclasses.asdict(config), "user_config": user_config, "rows": rows,
                "loader_state": loader.get_state(), "loop": loop, "num_iterations": num_iterations}
        ckpt.save(step, state.state[0], state.state[1], json.loads(json.dumps(meta)))

    losses = {}  # step -> the step's loss, for this invocation (tests compare runs with them)

    def log_step(s, metrics, lrm, dt):
        loss = losses[s] = check_finite(metrics["loss"], s)
        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * loss
        debiased = loop["smooth_loss"] / (1 - 0.9 ** (s + 1))
        if s - start_step > 10:  # the first steps of a process include compilation (nanochat: step > 10)
            loop["total_training_time"] += dt
        tok_s = args.total_batch_size / dt
        mfu = 100 * flops_per_token * tok_s / (peak * n_dev) if peak else None
        values = {"train/loss": debiased, "train/lrm": lrm, "train/tok_per_sec": tok_s,
                  "train/grad_norm": float(metrics["grad_norm"]), "train/dt": dt, "train/epoch": loader.epoch}
        if mfu is not None:
            values["train/mfu"] = mfu
        writer.scalars(s, values)
        bar.set_postfix_str(f"loss {debiased:.4f} | {tok_s:,.0f} tok/s" + (f" | mfu {mfu:.1f}%" if mfu else ""))
        bar.update(1)

    bar = tqdm(total=num_iterations, initial=step, desc=f"base_train {model_tag}", unit="step")
    start_step, pending, last_fetch = step, None, time.perf_counter()
    with jax.set_mesh(mesh):
        while True:
            last = step >= num_iterations
            do_eval = last or (args.eval_every > 0 and step % args.eval_every == 0)
            do_sample = args.sample_every > 0 and (last or (step > 0 and step % args.sample_every == 0))
            do_save = last or (args.save_every > 0 and step % args.save_every == 0 and step != start_step)
            if pending and (do_eval or do_sample or do_save):  # bring the logs up to date first
                log_step(*pending, time.perf_counter() - last_fetch)
                pending, last_fetch = None, time.perf_counter()
            if do_eval:
                with DataLoader(tokenizer, rows, T, "val", args.data_dir or None) as val:
                    bpb = evaluate_bpb(state.model, iter(val), eval_steps, token_bytes, mesh)
                loop["val_bpb"], loop["min_val_bpb"] = bpb, min(loop["min_val_bpb"], bpb)
                writer.scalars(step, {"val/bpb": bpb})
                tqdm.write(f"step {step:05d} | val bpb {bpb:.6f}")
            if do_sample:
                samples = sample_greedy(state.model, tokenizer, SAMPLE_PROMPTS, max_tokens=16)
                writer.text(step, "samples", "\n\n".join(samples))
                tqdm.write("\n".join(f"  {p!r} -> {s[len(p):]!r}" for p, s in zip(SAMPLE_PROMPTS, samples)))
            if do_save:
                save(step)
            if last:
                break
            batch = sharding.shard_batch(loader.next_stacked(accum), mesh, batch_axis=1)
            lrm = get_lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
            if pending is None:  # step time starts here, not before an eval, a sample or a save
                last_fetch = time.perf_counter()
            state, metrics = train_step(state, batch, hyperparams(lrm, get_muon_momentum(step)))
            if pending:  # the step just dispatched runs on the device while the host logs the previous one
                now = time.perf_counter()
                log_step(*pending, now - last_fetch)
                last_fetch = now
            pending = (step, metrics, lrm)
            step += 1
    bar.close()
    ckpt.close()
    writer.close()
    hours = loop["total_training_time"] / 3600
    print(f"done: {num_iterations} steps | min val bpb {loop['min_val_bpb']:.6f} | training time {hours * 60:.2f} min "
          f"| checkpoints in {ckpt.directory}")
    return {"losses": losses, "val_bpb": loop["val_bpb"], "min_val_bpb": loop["min_val_bpb"], "num_params": num_params,
            "num_iterations": num_iterations, "total_training_time": loop["total_training_time"]}


if __name__ == "__main__":
    run_main(main)

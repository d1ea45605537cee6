"""Pretrain the base model: `python -m jaxchat.base_train [--depth=20 ...]` (flags as nanochat's base_train).

At each step the loop saves when due, then evaluates val bpb, CORE and samples when due; after the last step it
saves, then evaluates and samples (a crash in the final evaluation loses nothing). Checkpoints hold everything the loop needs (model,
optimizer, data-loader position, EMA loss, timers), so `--resume=1` continues exactly: on CPU the resumed run's
losses equal the uninterrupted run's bit for bit.
"""
import argparse

import jax
from flax import nnx
from tqdm import tqdm

from jaxchat import core_eval, sharding
from jaxchat.common import (SWITCH, UserError, count_or_unset, fraction, non_negative_float, non_negative_int, number,
                            positive_int)
from jaxchat.dataloader import DistributedDataLoader
from jaxchat.distributed import run_main
from jaxchat.engine import SAMPLE_PROMPTS, sample_greedy
from jaxchat.hardware import peak_flops
from jaxchat.loss_eval import evaluate_bpb
from jaxchat.model import GPT, config_for_depth
from jaxchat.optim import (MUON_MOMENTUM, get_lr_multiplier, get_muon_momentum, get_muon_weight_decay, hyperparams,
                           scaled_weight_decay)
from jaxchat.run import (NANOCHAT_EVAL_TOKENS, TrainingRun, add_training_flags, batch_rows, devices_line, eval_tokens,
                         model_execution, optim_config, stage_main)
from jaxchat.tokenizer import get_tokenizer
from jaxchat.train import init_train_state, train_step

# flags a resumed run must share with the run it continues (anything else, e.g. eval_every, may change)
RESUME_KEYS = ("model", "dtype", "num_iterations", "target_flops", "target_param_data_ratio", "optimizer", "embedding_lr",
               "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay", "grad_clip", "warmup_steps",
               "warmdown_ratio", "final_lr_frac", "data_dir")
# what a run saved before these flags existed trained with (its warmup_ratio was 0 in every jaxchat config)
PREDATES = {"model": "2025", "optimizer": "2025", "scalar_lr": 0.5, "warmup_steps": 0}
# The defaults of the flags that differ between --optimizer recipes: nanochat's base_train of October 2025 and of
# 2026. --weight_decay is the AdamW groups' in 2025, Muon's (cautious, scaled, cosine-scheduled) in 2026.
RECIPE_DEFAULTS = {
    "2025": dict(embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0, grad_clip=1.0, warmup_steps=0,
                 warmdown_ratio=0.2, final_lr_frac=0.0),
    "2026": dict(embedding_lr=0.3, unembedding_lr=0.008, weight_decay=0.28, grad_clip=0.0, warmup_steps=40,
                 warmdown_ratio=0.65, final_lr_frac=0.05),
}


class RecipeParser(argparse.ArgumentParser):
    """--optimizer not given is --model's recipe, and the flags not given take that optimizer's defaults
    (RECIPE_DEFAULTS): `--model=2026` alone is nanochat's 2026 run."""

    def parse_known_args(self, args=None, namespace=None):
        args, rest = super().parse_known_args(args, namespace)
        args.optimizer = args.optimizer or args.model
        for name, default in RECIPE_DEFAULTS[args.optimizer].items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        return args, rest


def build_parser():
    p = RecipeParser(description="Pretrain a jaxchat base model.")
    add = add_training_flags(p, device_batch_size=32, eval_every=250)
    add("optimizer", choices=list(RECIPE_DEFAULTS),
        help="nanochat's optimizer and schedules of October 2025 (Muon, 2 AdamW groups, clipping) or 2026 "
             "(MuonAdamW: Polar Express, NorMuon, cautious weight decay, 6 AdamW groups, batch-scaled LRs); "
             "default: --model's")
    p.set_defaults(**dict.fromkeys(RECIPE_DEFAULTS["2025"]))  # unset: the recipe's
    add("scalar_lr", type=non_negative_float, default=0.5, help="2026: the residual and x0 lambdas' AdamW LR")
    add("model", default="2025", choices=("2025", "2026"),
        help="nanochat's GPT of October 2025 or of 2026 (value embeddings, sliding windows SSSL, smear, backout, "
             "residual and x0 lambdas, q·k ×1.2, RoPE base 100K, vocab padded to 64, its init and width rule)")
    add("depth", type=positive_int, default=20, help="the one dial: model_dim = 64·depth (2026: rounded up to a "
                                                      "multiple of head_dim)")
    add("head_dim", type=positive_int, default=128)
    add("n_kv_head", type=non_negative_int, default=0, help="key/value heads (GQA); 0 = as many as query heads")
    add("max_seq_len", type=positive_int, default=2048)
    add("target_flops", type=number(float, 1, unset=-1), default=-1.0,
        help="horizon when num_iterations is -1 (-1: unset)")
    add("target_param_data_ratio", type=count_or_unset, default=20,
        help="Chinchilla: tokens = ratio × params (the default horizon; -1: unset)")
    add("total_batch_size", type=positive_int, default=524288, help="tokens per optimizer step")
    add("grad_clip", type=non_negative_float, help="0: off (default: the recipe's, 1.0 / 0)")
    add("warmup_steps", type=non_negative_int, help="LR warmup (default: the recipe's, 0 / 40)")
    add("warmdown_ratio", type=fraction, help="LR warmdown, a fraction of the run (default: 0.2 / 0.65)")
    add("final_lr_frac", type=fraction, help="LR multiplier at the end of the warmdown (default: 0 / 0.05)")
    add("eval_tokens", type=count_or_unset, default=-1, help="val tokens per bpb evaluation (-1: a tenth of the "
                                                             f"run's training tokens, at most {NANOCHAT_EVAL_TOKENS:,})")
    add("sample_every", type=count_or_unset, default=2000, help="-1: never")
    add("core_metric_every", type=count_or_unset, default=2000, help="CORE every N steps and at the end (-1: never)")
    add("core_metric_max_per_task", type=count_or_unset, default=500,
        help="CORE examples per task during training (-1: all)")
    add("eval_bundle", default="", help="CORE bundle directory (default: $JAXCHAT_EVAL_BUNDLE, else the base dir's)")
    add("download_bundle", **SWITCH, default=1, help="fetch nanochat's CORE bundle when there is none (0: never; "
                                                      "a bundle already there is used)")
    add("data_dir", default="", help="pretraining shards (default: $JAXCHAT_BASE_DIR/base_data)")
    return p


def horizon(args, num_params, flops_per_token):
    """nanochat's precedence: num_iterations > target_flops > target_param_data_ratio (-1: unset). A horizon of
    no step is refused: the run would end before it began."""
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        steps, given = round(args.target_flops / (flops_per_token * args.total_batch_size)), "target_flops"
    elif args.target_param_data_ratio > 0:
        steps, given = args.target_param_data_ratio * num_params // args.total_batch_size, "target_param_data_ratio"
    else:
        raise UserError("no training horizon: set num_iterations, target_flops or target_param_data_ratio")
    if steps < 1:
        raise UserError(f"{given}={getattr(args, given):g} is less than one step of {args.total_batch_size:,} tokens: "
                        f"raise it, or set num_iterations")
    return steps


def core_during_training(args):
    """The CORE bundle for --core_metric_every, or None: a side measurement, so a bundle that cannot be had
    (offline, say) is said once and training goes on without it."""
    if args.core_metric_every <= 0:
        return None
    try:
        return core_eval.find_bundle(args.eval_bundle or None, bool(args.download_bundle))
    except UserError as e:
        print(f"CORE during training skipped: {str(e).splitlines()[0]}")
        return None


def scaling_params(config):
    """nanochat's scaling parameters, the transformer matrices and the unembedding (abstract: no arrays)."""
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    return sum(x.size for name in ("h", "lm_head") for x in jax.tree.leaves(params[name]))


def muon_weight_decay(args, config, reference_config):
    """Muon's weight decay before its cosine schedule: 2026, --weight_decay × √(B/2¹⁹) × (D_REF/D), D the run's
    target tokens (target_param_data_ratio × scaling parameters) and D_REF the d12 reference's; 2025: none."""
    if args.optimizer != "2026":
        return 0.0
    ratio = args.target_param_data_ratio
    target_tokens = int(ratio * scaling_params(config))
    return scaled_weight_decay(args.weight_decay, args.total_batch_size, target_tokens,
                               ratio * scaling_params(reference_config))


def schedule(args, num_iterations, weight_decay):
    """step -> its hyperparams: the LR multiplier, Muon momentum and Muon weight decay of --optimizer's recipe."""
    return lambda step: hyperparams(
        get_lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac),
        get_muon_momentum(step, **MUON_MOMENTUM[args.optimizer], num_iterations=num_iterations,
                          warmdown_ratio=args.warmdown_ratio),
        get_muon_weight_decay(step, num_iterations, weight_decay))


def main(argv=None):
    return stage_main(build_parser, train, argv)


def train(args):
    tokenizer = get_tokenizer()
    config_at = lambda depth: config_for_depth(depth, tokenizer.get_vocab_size(), args.max_seq_len,
                                               n_kv_head=args.n_kv_head or None, head_dim=args.head_dim,
                                               recipe=args.model, **model_execution(args))
    config = config_at(args.depth)
    optim = optim_config(args)
    T = args.max_seq_len
    rows, accum = batch_rows(args, args.total_batch_size, row_len=T)
    model_tag = args.model_tag or f"d{args.depth}"
    settings = {"device_batch_size": args.device_batch_size, "max_seq_len": T, "total_batch_size": args.total_batch_size,
                "batch_rows": rows}
    loop_state = {"min_val_bpb": float("inf"), "val_bpb": None, "core_metric": []}
    fresh = lambda: (init_train_state(config, optim, args.seed), tokenizer, {})
    with TrainingRun("base", model_tag, args, settings, loop_state, optim=optim, resume_keys=RESUME_KEYS, fresh=fresh,
                     model_config=config, tokenizer=tokenizer, predates=PREDATES) as run:
        loop = run.loop_state
        num_params, flops_per_token = run.model.num_params(), run.model.estimate_flops()
        num_iterations = horizon(args, num_params, flops_per_token)
        run.meta["num_iterations"] = num_iterations
        hyper = schedule(args, num_iterations, muon_weight_decay(args, config, config_at(12)))
        loader = DistributedDataLoader(tokenizer, rows, T, "train", args.data_dir or None,
                                       state=run.dataloader_state_dict)
        val_steps = max(1, eval_tokens(args.eval_tokens, args.total_batch_size, num_iterations) // (rows * T))
        token_bytes = tokenizer.token_bytes()
        bundle = core_during_training(args)
        per_device = peak_flops(jax.devices()[0].device_kind)  # None where unknown (CPUs): no MFU
        peak = per_device * jax.device_count() if per_device else None
        print(f"{devices_line()} | {run.model_tag}: {config}")
        print(f"params {num_params:,} | FLOPs/token {flops_per_token:.4g} | {num_iterations} steps × "
              f"{args.total_batch_size:,} tokens ({accum} micro-batches of {rows}×{T}) = "
              f"{num_iterations * args.total_batch_size:,} tokens | total "
              f"{num_iterations * args.total_batch_size * flops_per_token:.3g} FLOPs")
        if run.step == 0:
            sharding.print_sharding_table(run.model)

        for step in run.steps(num_iterations, loader.get_state, flops_per_token, peak):
            if run.last or run.due(args.eval_every):  # val bpb
                with DistributedDataLoader(tokenizer, rows, T, "val", args.data_dir or None) as val:
                    bpb = evaluate_bpb(run.model, val, val_steps, token_bytes, global_rows=rows)
                loop["val_bpb"], loop["min_val_bpb"] = bpb, min(loop["min_val_bpb"], bpb)
                run.writer.scalars(step, {"val/bpb": bpb})
                tqdm.write(f"step {step:05d} | val bpb {bpb:.6f}")
            if bundle is not None and step > 0 and run.due(args.core_metric_every):
                # CORE during training, for "time to a CORE score": against the step, the training time and FLOPs
                out = core_eval.evaluate_model(run.model, tokenizer, args.core_metric_max_per_task, bundle)
                loop["core_metric"].append({"step": step, "total_training_time": loop["total_training_time"],
                                            "total_training_flops": step * args.total_batch_size * flops_per_token,
                                            "CORE": out["core_metric"]})
                run.writer.scalars(step, {"core_metric": out["core_metric"]})
                tqdm.write(f"step {step:05d} | CORE {out['core_metric']:.4f}")
            if step > 0 and run.due(args.sample_every):
                samples = sample_greedy(run.model, tokenizer, SAMPLE_PROMPTS, max_tokens=16)
                run.writer.text(step, "samples", "\n\n".join(samples))
                tqdm.write("\n".join(f"  {p!r} -> {s[len(p):]!r}" for p, s in zip(SAMPLE_PROMPTS, samples)))
            if run.last:
                break
            batch = sharding.shard_batch(loader.next_stacked(accum), batch_axis=1, global_rows=rows)
            step_hyper = hyper(step)
            run.state, metrics = train_step(run.state, batch, step_hyper)
            run.log(step, metrics, args.total_batch_size, {
                "train/lrm": float(step_hyper["lr_multiplier"]), "train/grad_norm": metrics["grad_norm"],
                "train/muon_momentum": float(step_hyper["muon_momentum"]),
                "train/muon_weight_decay": float(step_hyper["muon_weight_decay"]), "train/epoch": loader.epoch,
                "total_training_flops": (step + 1) * args.total_batch_size * flops_per_token})
        loader.close()

        minutes = loop["total_training_time"] / 60
        print(f"done: {num_iterations} steps | min val bpb {loop['min_val_bpb']:.6f} | training time {minutes:.2f} "
              f"min | checkpoints in {run.ckpt.directory}")
        tok_s = args.total_batch_size / run.seconds_per_step if run.seconds_per_step else None
        run.report("Base model training", {
            "parameters": num_params, "FLOPs per token": flops_per_token, "iterations": num_iterations,
            "training tokens": num_iterations * args.total_batch_size,
            "tokens : params ratio": num_iterations * args.total_batch_size / num_params,
            "min val bpb": loop["min_val_bpb"], "final val bpb": loop["val_bpb"],
            "CORE during training": loop["core_metric"] or "not measured (no bundle, or --core_metric_every=-1)",
            "tok/s": tok_s, "MFU %": 100 * flops_per_token * tok_s / peak if peak and tok_s else None,
            "total training FLOPs": num_iterations * args.total_batch_size * flops_per_token,
            "total training time (s)": loop["total_training_time"]})
    return {"losses": run.losses, "val_bpb": loop["val_bpb"], "min_val_bpb": loop["min_val_bpb"],
            "num_params": num_params, "num_iterations": num_iterations,
            "total_training_time": loop["total_training_time"], "core_metric": loop["core_metric"]}


if __name__ == "__main__":
    run_main(main)

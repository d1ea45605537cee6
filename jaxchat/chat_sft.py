"""Supervised fine-tuning: `python -m jaxchat.chat_sft [--source mid] [--model_tag d20]` (nanochat's chat_sft).

One conversation per row, padded; only the assistant's tokens are supervised (its text, its python calls and
<|assistant_end|>; not the tool outputs). `target_examples_per_step` conversations per optimizer step, every learning
rate × `init_lr_frac` (0.02) and then linearly to 0 over one pass of the mixture. Val loss every `eval_every` steps;
MMLU / ARC-Easy accuracy every `eval_metrics_every` steps (when their data can be had). Checkpoints in
`chatsft_checkpoints/<tag>/` hold the model, the optimizer and the data position: `--resume=1` continues exactly.
"""
import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from jaxchat import sharding
from jaxchat.chat_data import PaddedLoader
from jaxchat.common import UserError, count_or_unset, non_negative_int, positive_int
from jaxchat.distributed import run_main
from jaxchat.mixtures import MIXTURE_KEYS, build_mixture, describe
from jaxchat.optim import hyperparams
from jaxchat.run import add_chat_flags, batch_rows, chat_run, devices_line, make_mesh
from jaxchat.task_eval import run_chat_eval
from jaxchat.train import check_finite, train_step


def build_parser():
    p = argparse.ArgumentParser(description="Supervised fine-tuning of a jaxchat model.")
    add = add_chat_flags(p, "mid", device_batch_size=4, init_lr_frac=0.02, eval_every=100)
    add("num_epochs", type=positive_int, default=1)
    add("target_examples_per_step", type=positive_int, default=32, help="conversations per optimizer step")
    add("max_seq_len", type=non_negative_int, default=0,
        help="longest conversation in tokens (0: the model's context)")
    add("eval_steps", type=positive_int, default=100, help="val batches per val-loss evaluation")
    add("eval_metrics_every", type=count_or_unset, default=200,
        help="MMLU / ARC-Easy accuracy every N steps (-1: never)")
    add("eval_metrics_max_problems", type=positive_int, default=1024)
    add("extra_jsonl", default="", help="your own conversations (JSONL files, comma-separated) to add to the mix")
    add("mixture", default="", help="NAME=N,...: N conversations of these parts of the training mixture (0: none)")
    return p


@nnx.jit
def loss_sum(model, inputs, targets):
    """(Σ loss, supervised tokens) of a batch (accum, B, T), for val loss over many batches."""
    total = jax.lax.map(lambda b: model.loss(b[0], b[1], reduction="sum"), (inputs, targets))
    return jnp.sum(total), jnp.sum(targets != -1)


def val_loss(model, loader, steps):
    total, count = 0.0, 0
    for _ in tqdm(range(steps), desc="val loss", unit="batch", leave=False):
        batch = sharding.shard_batch(loader.next_stacked(1), batch_axis=1)
        s, n = loss_sum(model, batch["inputs"], batch["targets"])
        total, count = total + float(s), count + int(n)
    return total / max(count, 1)


def chat_metrics(model, tokenizer, max_problems, unavailable):
    """MMLU and ARC-Easy accuracy (nanochat's quick SFT metrics); tasks that cannot be had are noted once."""
    out = {}
    for name in ("MMLU", "ARC-Easy"):
        if name in unavailable:
            continue
        try:
            out[name] = run_chat_eval(name, model, tokenizer, None, batch_size=32, max_problems=max_problems)
        except UserError as e:
            unavailable[name] = str(e).splitlines()[0]
            tqdm.write(f"{name} accuracy not measured: {unavailable[name]}")
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    with jax.set_mesh(make_mesh(args)):
        return train(args)


def train(args):
    rows, accum = batch_rows(args, args.target_examples_per_step)
    train_task, sizes, missing = build_mixture("sft", "train", args.extra_jsonl, args.mixture)
    val_task, val_sizes, val_missing = build_mixture("sft", "val")
    print(describe("sft", "train", sizes, missing) + "\n" + describe("sft", "val", val_sizes, val_missing))
    settings = {"device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
                "target_examples_per_step": args.target_examples_per_step, "batch_rows": rows}
    with chat_run("sft", args, settings, {"val_loss": None}, MIXTURE_KEYS) as run:
        if run.finished:
            return None
        tokenizer = run.tokenizer
        T = args.max_seq_len or run.model.config.sequence_len
        num_iterations = args.num_iterations if args.num_iterations > 0 else \
            max(1, len(train_task) // args.target_examples_per_step * args.num_epochs)
        loader = PaddedLoader(tokenizer, train_task, rows, T, "assistant", state=run.dataloader_state_dict)
        print(f"{devices_line()} | sft {run.model_tag} from {args.source} step {run.meta['source_step']} | "
              f"{num_iterations} steps × {args.target_examples_per_step} conversations ({accum} micro-batches of "
              f"{rows}) | T ≤ {T}")
        unavailable, losses, train_time = {}, {}, 0.0

        def evaluate(step, last):
            if last or (args.eval_every > 0 and step % args.eval_every == 0):
                val = PaddedLoader(tokenizer, val_task, rows, T, "assistant")
                run.loop_state["val_loss"] = val_loss(run.model, val, args.eval_steps)
                run.writer.scalars(step, {"val/loss": run.loop_state["val_loss"]})
                tqdm.write(f"step {step:05d} | val loss {run.loop_state['val_loss']:.4f}")
            if args.eval_metrics_every > 0 and (last or step % args.eval_metrics_every == 0):
                metrics = chat_metrics(run.model, tokenizer, args.eval_metrics_max_problems, unavailable)
                run.writer.scalars(step, {f"val/{k.lower().replace('-', '_')}_acc": v for k, v in metrics.items()})
                if metrics:
                    tqdm.write(f"step {step:05d} | " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items()))

        bar = tqdm(total=num_iterations, initial=run.step, desc=f"chat_sft {run.model_tag}", unit="step")
        step = run.step
        while step < num_iterations:
            evaluate(step, last=False)
            if args.save_every > 0 and step % args.save_every == 0 and step != run.start_step:
                run.save(step, loader.get_state())
            t0 = time.perf_counter()
            batch = loader.next_stacked(accum)
            tokens = int((batch["targets"] != -1).sum())
            lrm = args.init_lr_frac * (1 - step / num_iterations)
            run.state, metrics = train_step(run.state, sharding.shard_batch(batch, batch_axis=1), hyperparams(lrm, 0.95))
            loss = losses[step] = check_finite(metrics["loss"], step)
            dt = time.perf_counter() - t0
            train_time, tok_s = train_time + dt, tokens / dt
            smooth = run.smooth_loss(step, loss)
            run.writer.scalars(step, {"train/loss": smooth, "train/lrm": lrm, "train/num_tokens": tokens,
                                      "train/tok_per_sec": tok_s, "train/epoch": loader.epoch,
                                      "train/cropped": loader.cropped})
            bar.set_postfix_str(f"loss {smooth:.4f} | lrm {lrm:.4f} | {tok_s:,.0f} supervised tok/s")
            bar.update(1)
            step += 1
        run.save(step, loader.get_state(), final=True)  # before the final evaluation: a crash there loses nothing
        evaluate(step, last=True)
        bar.close()
        run.report("Chat SFT", {
            "source": f"{args.source} step {run.meta['source_step']}", "mixture": sizes, "left out": missing,
            "iterations": num_iterations, "conversations": num_iterations * args.target_examples_per_step,
            "seconds per step": train_time / (step - run.start_step) if step > run.start_step else None,
            "final train loss": smooth if losses else None, "final val loss": run.loop_state["val_loss"],
            "cropped conversations": f"{loader.cropped} of {loader.seen}"})
    print(f"done: {num_iterations} steps | val loss {run.loop_state['val_loss']:.4f} | cropped conversations "
          f"{loader.cropped} of {loader.seen} | checkpoints in {run.ckpt.directory}")
    return {"losses": losses, "val_loss": run.loop_state["val_loss"], "num_iterations": num_iterations,
            "cropped": loader.cropped, "missing": missing}


if __name__ == "__main__":
    run_main(main)

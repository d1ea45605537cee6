"""Supervised fine-tuning: `python -m jaxchat.chat_sft [--source mid] [--model_tag d20]` (nanochat's chat_sft).

One conversation per row, padded; only the assistant's tokens are supervised (its text, its python calls and
<|assistant_end|>; not the tool outputs). `target_examples_per_step` conversations per optimizer step, every learning
rate × `init_lr_frac` (0.02) and then linearly to 0 over one pass of the mixture. Val loss every `eval_every` steps;
MMLU / ARC-Easy accuracy every `eval_metrics_every` steps (when their data can be had). Checkpoints in
`chatsft_checkpoints/<tag>/` hold the model, the optimizer and the data position: `--resume=1` continues exactly.
"""
import argparse

from tqdm import tqdm

from jaxchat import sharding
from jaxchat.chat_data import PaddedLoader
from jaxchat.common import UserError, count_or_unset, non_negative_int, positive_int
from jaxchat.distributed import run_main
from jaxchat.loss_eval import evaluate_loss
from jaxchat.mixtures import MIXTURE_KEYS, build_mixture, describe
from jaxchat.optim import hyperparams
from jaxchat.run import add_chat_flags, batch_rows, chat_run, devices_line, stage_main
from jaxchat.task_eval import run_chat_eval
from jaxchat.train import train_step


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
    return stage_main(build_parser, train, argv)


def train(args):
    rows, accum = batch_rows(args, args.target_examples_per_step)
    train_task, sizes, missing = build_mixture("sft", "train", args.extra_jsonl, args.mixture)
    val_task, val_sizes, val_missing = build_mixture("sft", "val")
    print(describe("sft", "train", sizes, missing) + "\n" + describe("sft", "val", val_sizes, val_missing))
    settings = {"device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
                "target_examples_per_step": args.target_examples_per_step, "batch_rows": rows}
    with chat_run("sft", args, settings, {"val_loss": None}, MIXTURE_KEYS) as run:
        tokenizer = run.tokenizer
        T = args.max_seq_len or run.model.config.sequence_len
        num_iterations = args.num_iterations if args.num_iterations > 0 else \
            max(1, len(train_task) // args.target_examples_per_step * args.num_epochs)
        loader = PaddedLoader(tokenizer, train_task, rows, T, "assistant", state=run.dataloader_state_dict)
        print(f"{devices_line()} | sft {run.model_tag} from {args.source} step {run.meta['source_step']} | "
              f"{num_iterations} steps × {args.target_examples_per_step} conversations ({accum} micro-batches of "
              f"{rows}) | T ≤ {T}")
        unavailable = {}  # chat tasks that cannot be had: said once

        for step in run.steps(num_iterations, loader.get_state):
            if run.last or run.due(args.eval_every):  # val loss
                val = PaddedLoader(tokenizer, val_task, rows, T, "assistant")
                run.loop_state["val_loss"] = evaluate_loss(run.model, val, args.eval_steps)
                run.writer.scalars(step, {"val/loss": run.loop_state["val_loss"]})
                tqdm.write(f"step {step:05d} | val loss {run.loop_state['val_loss']:.4f}")
            if run.due(args.eval_metrics_every):
                metrics = chat_metrics(run.model, tokenizer, args.eval_metrics_max_problems, unavailable)
                run.writer.scalars(step, {f"val/{k.lower().replace('-', '_')}_acc": v for k, v in metrics.items()})
                if metrics:
                    tqdm.write(f"step {step:05d} | " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items()))
            if run.last:
                break
            batch = loader.next_stacked(accum)
            supervised = int((batch["targets"] != -1).sum())
            lrm = args.init_lr_frac * (1 - step / num_iterations)
            run.state, metrics = train_step(run.state, sharding.shard_batch(batch, batch_axis=1), hyperparams(lrm, 0.95))
            run.log(step, metrics, batch["inputs"].size, {
                "train/lrm": lrm, "train/num_tokens": supervised, "train/epoch": loader.epoch,
                "train/cropped": loader.cropped}, postfix=f"lrm {lrm:.4f}")

        run.report("Chat SFT", {
            "source": f"{args.source} step {run.meta['source_step']}", "mixture": sizes, "left out": missing,
            "iterations": num_iterations, "conversations": num_iterations * args.target_examples_per_step,
            "seconds per step": run.seconds_per_step, "final train loss": run.train_loss,
            "final val loss": run.loop_state["val_loss"],
            "cropped conversations": f"{loader.cropped} of {loader.seen}"})
    print(f"done: {num_iterations} steps | val loss {run.loop_state['val_loss']:.4f} | cropped conversations "
          f"{loader.cropped} of {loader.seen} | checkpoints in {run.ckpt.directory}")
    return {"losses": run.losses, "val_loss": run.loop_state["val_loss"], "num_iterations": num_iterations,
            "cropped": loader.cropped, "missing": missing}


if __name__ == "__main__":
    run_main(main)

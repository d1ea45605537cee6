"""Midtraining: `python -m jaxchat.mid_train [--model_tag d20]` (nanochat's mid_train): the base model learns the chat
format, special tokens and tool calls from a mixture of conversations.

Conversations are rendered and packed whole into rows of max_seq_len + 1 tokens (BOS-aligned best fit, padding
instead of splitting); every real token is a target (nanochat's midtraining), except padding and a row's next BOS.
Schedule: learning-rate multiplier 1.0 for the first 80% of the run, then linearly to 0 (nanochat intends this; its
code ramps the wrong way); Muon momentum 0.85 -> 0.95 over 300 steps. The run is one pass over the mixture (or
`--num_iterations`). Val bpb on the validation mixture every `eval_every` steps. `--resume=1` continues exactly.
"""
import argparse

from tqdm import tqdm

from jaxchat import sharding
from jaxchat.chat_data import PackedLoader
from jaxchat.common import count_or_unset, non_negative_int, positive_int
from jaxchat.distributed import run_main
from jaxchat.loss_eval import evaluate_bpb
from jaxchat.mixtures import MIXTURE_KEYS, build_mixture, describe
from jaxchat.optim import get_muon_momentum, hyperparams
from jaxchat.run import add_chat_flags, batch_rows, chat_run, devices_line, eval_tokens, source_config, stage_main
from jaxchat.train import train_step


def build_parser():
    p = argparse.ArgumentParser(description="Midtrain a jaxchat base model on conversations.")
    add = add_chat_flags(p, "base", device_batch_size=32, init_lr_frac=1.0, eval_every=150)
    add("max_seq_len", type=non_negative_int, default=0, help="row length (default: the model's context)")
    add("total_batch_size", type=positive_int, default=524288, help="tokens per optimizer step")
    add("eval_tokens", type=count_or_unset, default=-1, help="val tokens per val-bpb evaluation (-1: a tenth of the "
                                                             "run's tokens, at most nanochat's 20 × 524,288)")
    add("extra_jsonl", default="", help="your own conversations (JSONL files, comma-separated) to add to the mix")
    add("mixture", default="", help="NAME=N,...: N conversations of these parts of the training mixture (0: none)")
    return p


def get_lr_multiplier(progress):
    """1.0 until 80% of the run, then linearly down to 0 (nanochat's midtraining schedule, ramping *down*)."""
    return 1.0 if progress < 0.8 else max(0.0, 1 - (progress - 0.8) / 0.2)


def main(argv=None):
    return stage_main(build_parser, train, argv)


def train(args):
    train_task, sizes, missing = build_mixture("mid", "train", args.extra_jsonl, args.mixture)
    val_task, val_sizes, val_missing = build_mixture("mid", "val")
    print(describe("mid", "train", sizes, missing) + "\n" + describe("mid", "val", val_sizes, val_missing))
    T = args.max_seq_len or source_config(args)["sequence_len"]
    rows, accum = batch_rows(args, args.total_batch_size, row_len=T)
    settings = {"device_batch_size": args.device_batch_size, "max_seq_len": T, "total_batch_size": args.total_batch_size,
                "batch_rows": rows}
    with chat_run("mid", args, settings, {"val_bpb": None}, MIXTURE_KEYS) as run:
        tokenizer, token_bytes = run.tokenizer, run.tokenizer.token_bytes()
        loader = PackedLoader(tokenizer, train_task, rows, T, "all", state=run.dataloader_state_dict)
        epoch_len = len(train_task)
        progress = lambda step: step / args.num_iterations if args.num_iterations > 0 else loader.position / epoch_len
        val_steps = max(1, eval_tokens(args.eval_tokens, args.total_batch_size, args.num_iterations) // (rows * T))
        print(f"{devices_line()} | mid {run.model_tag} from {args.source} step {run.meta['source_step']} | "
              f"{'%d steps' % args.num_iterations if args.num_iterations > 0 else 'one pass'} × "
              f"{args.total_batch_size:,} tokens ({accum} micro-batches of {rows}×{T})")

        last = args.num_iterations if args.num_iterations > 0 else lambda step: progress(step) >= 1.0
        for step in run.steps(last, loader.get_state):
            if run.last or run.due(args.eval_every):  # val bpb
                val = PackedLoader(tokenizer, val_task, rows, T, "all")
                run.loop_state["val_bpb"] = evaluate_bpb(run.model, val, val_steps, token_bytes)
                run.writer.scalars(step, {"val/bpb": run.loop_state["val_bpb"]})
                tqdm.write(f"step {step:05d} | val bpb {run.loop_state['val_bpb']:.4f}")
            if run.last:
                break
            lrm = args.init_lr_frac * get_lr_multiplier(progress(step))
            batch = sharding.shard_batch(loader.next_stacked(accum), batch_axis=1)
            run.state, metrics = train_step(run.state, batch, hyperparams(lrm, get_muon_momentum(step)))
            run.log(step, metrics, args.total_batch_size, {
                "train/lrm": lrm, "train/progress": progress(step + 1), "train/cropped": loader.cropped},
                postfix=f"lrm {lrm:.3f} | epoch {progress(step + 1):.3f}")

        run.report("Midtraining", {
            "source": f"{args.source} step {run.meta['source_step']}", "mixture": sizes, "left out": missing,
            "iterations": step, "training tokens": step * args.total_batch_size,
            "tok/s": args.total_batch_size / run.seconds_per_step if run.seconds_per_step else None,
            "final train loss": run.train_loss,
            "final val bpb": run.loop_state["val_bpb"], "cropped conversations": f"{loader.cropped} of {loader.seen}"})
    print(f"done: {step} steps | val bpb {run.loop_state['val_bpb']:.4f} | cropped conversations {loader.cropped} of "
          f"{loader.seen} | checkpoints in {run.ckpt.directory}")
    return {"losses": run.losses, "val_bpb": run.loop_state["val_bpb"], "num_steps": step, "cropped": loader.cropped}


if __name__ == "__main__":
    run_main(main)

"""Evaluate a base model: `python -m jaxchat.base_eval [--eval core,bpb,sample] [--model-tag d20] [--step N]`.

core: the CORE metric (core_eval.py) on `--max-per-task` examples per task (-1: all), the bundle from `--eval-bundle`,
$JAXCHAT_EVAL_BUNDLE or $JAXCHAT_BASE_DIR/eval_bundle (downloaded unless --download-bundle=0, which skips CORE
with a note when there is no bundle). bpb: bits per byte on `split_tokens` tokens of the train and val splits
(nanochat's base_loss). sample: greedy continuations of fixed prompts. Results go to stdout and
`$JAXCHAT_BASE_DIR/base_eval/<tag>_<step>.json` (CORE also to `<tag>_<step>.csv`, as nanochat's).
"""
import argparse
import os

import jax

from jaxchat import core_eval, distributed
from jaxchat.checkpoint_manager import load_model
from jaxchat.common import (SWITCH, UserError, count_or_unset, flag_adder, get_base_dir, non_negative_int, positive_int,
                            step_or_last)
from jaxchat.dataloader import DistributedDataLoader
from jaxchat.distributed import run_main
from jaxchat.engine import SAMPLE_PROMPTS, sample_greedy
from jaxchat.loss_eval import evaluate_bpb
from jaxchat.report_card import get_report, write_results
from jaxchat.run import make_mesh

EVALS = ("core", "bpb", "sample")


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a jaxchat base model.")
    add = flag_adder(p)
    add("eval", default="core,bpb,sample", help=f"comma-separated: {', '.join(EVALS)}")
    add("model_tag", default="", help="default: the largest d<N> in base_checkpoints")
    add("step", type=step_or_last, default=-1, help="default: the last")
    add("device_batch_size", type=positive_int, default=32)
    add("split_tokens", type=positive_int, default=20 * 524288, help="tokens per split for bpb")
    add("max_seq_len", type=non_negative_int, default=0, help="default: the model's sequence_len")
    add("data_dir", default="")
    add("max_per_task", type=count_or_unset, default=-1, help="CORE examples per task (-1 = all)")
    add("eval_bundle", default="", help="CORE bundle directory (default: $JAXCHAT_EVAL_BUNDLE, else the base dir's)")
    add("download_bundle", **SWITCH, default=1, help="fetch nanochat's CORE bundle when there is none; 0: skip CORE")
    add("mesh_data", type=positive_int, default=1)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    evals = [e for e in args.eval.split(",") if e]
    if unknown := [e for e in evals if e not in EVALS]:
        raise UserError(f"--eval: unknown {unknown}; choose from {', '.join(EVALS)}")
    bundle = core_eval.find_bundle(args.eval_bundle or None, bool(args.download_bundle)) if "core" in evals else None
    core_skipped = "core" in evals and bundle is None
    if core_skipped:
        evals.remove("core")
    with jax.set_mesh(make_mesh(args)):
        model, tokenizer, meta = load_model("base", args.model_tag or None, None if args.step < 0 else args.step)
        tag = meta["model_tag"]
        results = {"step": meta["step"], "model_config": meta["model_config"]}
        if "bpb" in evals:
            T = args.max_seq_len or model.config.sequence_len
            rows = args.device_batch_size * jax.device_count()
            steps = max(1, args.split_tokens // (rows * T))
            token_bytes = tokenizer.token_bytes()
            for split in ("train", "val"):
                with DistributedDataLoader(tokenizer, rows, T, split, args.data_dir or None) as loader:
                    results[f"{split}_bpb"] = evaluate_bpb(model, loader, steps, token_bytes, global_rows=rows)
                print(f"{split} bpb: {results[f'{split}_bpb']:.6f} ({steps} × {rows} × {T} tokens)")
        if "sample" in evals:
            results["samples"] = sample_greedy(model, tokenizer, SAMPLE_PROMPTS, max_tokens=16)
            for text in results["samples"]:
                print(f"  {text!r}")
        if "core" in evals:
            results["core"] = core_eval.evaluate_model(model, tokenizer, args.max_per_task, bundle)
    name = f"{tag}_{meta['step']:06d}"
    if "core" in results and distributed.is_writer():
        csv_path = core_eval.write_csv(os.path.join(get_base_dir(), "base_eval", name + ".csv"), results["core"])
        print(f"CORE metric: {results['core']['core_metric']:.4f} (per task in {csv_path})")
    write_results("base_eval", name, results)
    get_report().log("Base model evaluation", report_data(tag, results, core_skipped))
    return results


def report_data(tag, results, core_skipped):
    data = {"model": f"base {tag} step {results['step']}"}
    if "core" in results:
        data["CORE"] = results["core"]["core_metric"]
        data["CORE per task"] = [{"task": t, "accuracy": a, "centered": results["core"]["centered_results"][t]}
                                 for t, a in results["core"]["results"].items()]
    elif core_skipped:
        data["CORE skipped"] = "no CORE bundle on disk, and downloading it was off"
    data.update({f"{split} bpb": results[f"{split}_bpb"] for split in ("train", "val") if f"{split}_bpb" in results})
    if "samples" in results:
        data["samples"] = "\n".join(results["samples"])
    return data


if __name__ == "__main__":
    run_main(main)

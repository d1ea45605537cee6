"""Evaluate a base model: `python -m jaxchat.base_eval [--eval bpb,sample] [--model-tag d20] [--step N]`.

bpb: bits per byte on `split_tokens` tokens of the train and val splits (nanochat's base_loss). sample: greedy
continuations of fixed prompts. Results go to stdout and `$JAXCHAT_BASE_DIR/base_eval/<tag>_<step>.json`.
"""
import argparse
import json
import os

import jax

from jaxchat import sharding
from jaxchat.base_train import SAMPLE_PROMPTS, sample_greedy
from jaxchat.checkpoint_manager import load_model
from jaxchat.common import UserError, get_base_dir, run_main
from jaxchat.dataloader import DataLoader
from jaxchat.loss_eval import evaluate_bpb
from jaxchat.tokenizer import get_token_bytes, get_tokenizer

EVALS = ("bpb", "sample")


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a jaxchat base model.")
    add = lambda name, **kw: p.add_argument(f"--{name.replace('_', '-')}", f"--{name}", **kw)
    add("eval", default="bpb,sample", help=f"comma-separated: {', '.join(EVALS)}")
    add("model_tag", default="", help="default: the largest d<N> in base_checkpoints")
    add("step", type=int, default=-1, help="default: the last")
    add("device_batch_size", type=int, default=32)
    add("split_tokens", type=int, default=20 * 524288, help="tokens per split for bpb")
    add("max_seq_len", type=int, default=0, help="default: the model's sequence_len")
    add("data_dir", default="")
    add("mesh_data", type=int, default=1)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    evals = [e for e in args.eval.split(",") if e]
    if unknown := [e for e in evals if e not in EVALS]:
        raise UserError(f"--eval: unknown {unknown}; choose from {', '.join(EVALS)}")
    try:
        mesh = sharding.make_mesh((args.mesh_data, -1))
    except ValueError as e:
        raise UserError(f"--mesh_data={args.mesh_data}: {e}") from None
    model, meta = load_model("base", args.model_tag or None, None if args.step < 0 else args.step, mesh=mesh)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise UserError(f"tokenizer vocab {tokenizer.get_vocab_size()} != model vocab {model.config.vocab_size}")
    tag = meta["model_tag"]
    results = {"step": meta["step"], "model_config": meta["model_config"]}
    with jax.set_mesh(mesh):
        if "bpb" in evals:
            T = args.max_seq_len or model.config.sequence_len
            rows = args.device_batch_size * mesh.devices.size
            steps = max(1, args.split_tokens // (rows * T))
            token_bytes = get_token_bytes()
            for split in ("train", "val"):
                with DataLoader(tokenizer, rows, T, split, args.data_dir or None) as loader:
                    results[f"{split}_bpb"] = evaluate_bpb(model, iter(loader), steps, token_bytes, mesh)
                print(f"{split} bpb: {results[f'{split}_bpb']:.6f} ({steps} × {rows} × {T} tokens)")
        if "sample" in evals:
            results["samples"] = sample_greedy(model, tokenizer, SAMPLE_PROMPTS, max_tokens=16)
            for text in results["samples"]:
                print(f"  {text!r}")
    out_dir = os.path.join(get_base_dir(), "base_eval")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{tag}_{meta['step']:06d}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"results written to {out}")
    return results


if __name__ == "__main__":
    run_main(main)

"""jaxchat beside transformers on one exported (or published) NanoChat model directory: same ids, logits, greedy.

    python -m jaxchat.hf export -i sft -g tiny --out /tmp/hf_tiny
    python bench/hf_parity.py /tmp/hf_tiny --torch-python /path/to/venv-with-torch/bin/python
    python bench/hf_parity.py /tmp/hf_r20 --random-depth 20 --kv-heads 5 --torch-python ...   # a random d20 shape

With --random-depth, DIR is first written: a model of that depth (nanochat's shape rule, GQA with --kv-heads) with
random weights (N(0, --scale²): large enough that the logits vary, small enough that the softcap is not saturated)
and the tokenizer at $JAXCHAT_BASE_DIR/tokenizer, exported as `jaxchat.hf export` does.

The transformers side (torch, transformers, numpy; no jaxchat) runs as a child process of `--torch-python` (default:
this interpreter, for an environment that has both), so jaxchat's own environment needs no torch. It tokenizes the
prompts with AutoTokenizer (raw text after <|bos|>, and a conversation through the chat template), computes fp32
logits and greedy continuations with `generate(do_sample=False)`. The jaxchat side imports the directory with
`jaxchat.hf import` into a temporary base dir (the path a user takes), tokenizes the same prompts its own way, and
computes the same in fp32 (matmuls at full precision). Printed and written to --out (JSON): whether the ids agree,
max |Δlogit| per prompt, whether the greedy continuations are identical. Goal: ≤ 1e-4, identical.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

TEXTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n   ",
         "In 1905, Albert Einstein published 4 papers; 東京 and 😀 are here too:"]
CONVERSATION = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is 12 * 7? Think step by step."}]


def transformers_side(directory, new_tokens, out):
    """Runs under --torch-python: ids, logits and greedy continuations of every prompt, as transformers gives them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    bos, end = tokenizer.convert_tokens_to_ids("<|bos|>"), tokenizer.convert_tokens_to_ids("<|assistant_end|>")
    prompts = [[bos] + tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS]
    if tokenizer.chat_template:  # a converted published model may have none
        chat = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompts.append(list(chat["input_ids"]))
    arrays = {}
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            x = torch.tensor([ids])
            arrays[f"ids{i}"] = np.array(ids)
            arrays[f"logits{i}"] = model(x).logits[0].float().numpy()
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=[end, bos], pad_token_id=bos)  # where jaxchat's engine stops
            arrays[f"greedy{i}"] = gen[0, len(ids):].numpy()
    np.savez(out, **arrays, versions=np.array([torch.__version__, __import__("transformers").__version__]))


def jaxchat_side(directory, new_tokens, chat):
    """The same prompts through jaxchat (with the conversation when `chat`): (ids, logits, greedy) per prompt."""
    os.environ["JAXCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="hf_parity_")
    import jax
    import jax.numpy as jnp
    from flax import nnx
    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxchat.checkpoint_manager import load_model
    from jaxchat.hf.convert import import_model
    from jaxchat.kv_cache import KVCache
    import_model(directory, "parity", "sft")
    model, tokenizer, _ = load_model("sft", "parity")
    stops = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in TEXTS]
    if chat:
        prompts.append(tokenizer.render_for_completion({"messages": [*CONVERSATION, {"role": "assistant", "content": ""}]}))
    forward = nnx.jit(lambda m, idx: m(idx))
    decode = nnx.jit(lambda m, idx, cache: m.decode(idx, cache))
    results = []
    for ids in prompts:
        logits = np.asarray(forward(model, jnp.array([ids]))[0])
        cache = KVCache.create(model.config, 1, len(ids) + new_tokens)
        step_logits, cache = decode(model, jnp.array([ids]), cache)
        greedy = []
        while len(greedy) < new_tokens:  # stop where transformers' generate stops: at an eos id, kept
            greedy.append(int(jnp.argmax(step_logits[0, -1])))
            if greedy[-1] in stops:
                break
            step_logits, cache = decode(model, jnp.array([[greedy[-1]]]), cache)
        results.append((ids, logits, greedy))
    return results


def write_random(directory, depth, kv_heads, scale):
    """A random-weight jaxchat model of `depth`, exported to `directory` (through a checkpoint in a temporary base
    dir, the path `jaxchat.hf export` takes)."""
    import dataclasses
    import jax
    from flax import nnx
    from jaxchat.checkpoint_manager import Checkpointer, checkpoint_dir
    from jaxchat.hf.convert import export
    from jaxchat.model import GPT, config_for_depth
    from jaxchat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    os.environ["JAXCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="hf_parity_random_")
    config = config_for_depth(depth, tokenizer.get_vocab_size(), 2048, n_kv_head=kv_heads)
    model = GPT(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    with Checkpointer(checkpoint_dir("sft", "random")) as ckpt:
        ckpt.save(0, nnx.state(model), None, {"model_config": dataclasses.asdict(config)}, tokenizer)
    export("sft", "random", None, directory, overwrite=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("directory")
    p.add_argument("--torch-python", default=sys.executable, help="a Python with torch and transformers")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--out", default="hf_parity.json")
    p.add_argument("--random-depth", type=int, default=0, help="first write DIR: a random model of this depth")
    p.add_argument("--kv-heads", type=int, default=None, help="with --random-depth: key/value heads (GQA)")
    p.add_argument("--scale", type=float, default=0.03, help="with --random-depth: the weights' standard deviation")
    p.add_argument("--side", default="jaxchat", choices=("jaxchat", "transformers"), help=argparse.SUPPRESS)
    p.add_argument("--npz", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    directory = os.path.abspath(args.directory)
    if args.side == "transformers":
        transformers_side(directory, args.new_tokens, args.npz)
        return
    if args.random_depth:
        write_random(directory, args.random_depth, args.kv_heads, args.scale)
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "transformers.npz")
        subprocess.run([args.torch_python, os.path.abspath(__file__), directory, "--side", "transformers", "--npz", npz,
                        "--new-tokens", str(args.new_tokens)], check=True)
        theirs = dict(np.load(npz))
    ours = jaxchat_side(directory, args.new_tokens, chat="ids3" in theirs)
    rows = []
    for i, (ids, logits, greedy) in enumerate(ours):
        same_ids = ids == theirs[f"ids{i}"].tolist()
        row = {"prompt": (TEXTS + ["chat template"])[i][:40], "tokens": len(ids), "same_ids": same_ids,
               "greedy_identical": greedy == theirs[f"greedy{i}"].tolist(), "greedy_tokens": len(greedy)}
        if same_ids:
            row["max_abs_dlogit"] = float(np.max(np.abs(logits - theirs[f"logits{i}"])))
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False))
    torch_version, transformers_version = theirs["versions"].tolist()
    import jax
    summary = {"directory": directory, "torch": torch_version, "transformers": transformers_version,
               "jax": jax.__version__, "max_abs_dlogit": max(r.get("max_abs_dlogit", float("inf")) for r in rows),
               "all_ids_equal": all(r["same_ids"] for r in rows),
               "all_greedy_identical": all(r["greedy_identical"] for r in rows), "prompts": rows}
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    print(f"max |Δlogit| {summary['max_abs_dlogit']:.3g} (goal ≤ 1e-4), ids equal: {summary['all_ids_equal']}, "
          f"greedy identical: {summary['all_greedy_identical']}  -> {args.out}")


if __name__ == "__main__":
    main()

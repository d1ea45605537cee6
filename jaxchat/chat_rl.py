"""Reinforcement learning on GSM8K: `python -m jaxchat.chat_rl [--source sft] [--model_tag d20]` (nanochat's chat_rl).

nanochat's "GRPO", effectively REINFORCE with a group baseline (spec §8.4): each step takes `examples_per_step`
training problems, samples `num_samples` completions of each through the engine (calculator tool on; all problems in
one on-device decode, rows sharded over the mesh), rewards 1 for a correct '#### n' answer, and takes one optimizer
step on −Σ advantage · log p(token) over the sampled tokens, divided by their number (prompt and forced tool-output
tokens carry no gradient); advantage = reward − the mean reward of the problem's group. Learning rates × `init_lr_frac`
then linearly to 0. pass@k on held-out problems every `eval_every` steps. Offline without GSM8K, the synthetic
calculator problems (Arithmetic) stand in, and the run says so. Sampling seeds derive from the step, so
`--resume=1` continues exactly.
"""
import argparse

import jax
import numpy as np
from tqdm import tqdm

from jaxchat import sharding
from jaxchat.chat_eval import completion_prompt
from jaxchat.common import UserError, run_main
from jaxchat.engine import Engine
from jaxchat.finetune import StageRun, add_flags, flag_adder, batch_shape, devices_line, make_mesh
from jaxchat.optim import hyperparams
from jaxchat.rl_batch import advantages, rollout_batch
from jaxchat.tokenizer import get_tokenizer
from jaxchat.train import check_finite, train_step


def build_parser():
    p = add_flags(argparse.ArgumentParser(description="RL of a jaxchat chat model on GSM8K."), "sft",
                  device_batch_size=8, init_lr_frac=0.05, eval_every=60)
    add = flag_adder(p)
    add("num_epochs", type=int, default=1)
    add("examples_per_step", type=int, default=16, help="problems per optimizer step")
    add("num_samples", type=int, default=16, help="completions per problem (the group)")
    add("max_new_tokens", type=int, default=256)
    add("temperature", type=float, default=1.0)
    add("top_k", type=int, default=50)
    add("eval_examples", type=int, default=400, help="held-out problems for pass@k")
    add("eval_samples", type=int, default=8, help="pass@k for k = 1..this")
    return p


def load_tasks():
    """(train, test, name): GSM8K when it can be had, else the synthetic calculator problems."""
    from jaxchat.tasks.arithmetic import Arithmetic
    from jaxchat.tasks.gsm8k import GSM8K
    try:
        return GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test"), "GSM8K"
    except UserError as e:
        tqdm.write(f"GSM8K is not available ({str(e).splitlines()[0]}); using the synthetic Arithmetic problems")
        return Arithmetic(size=8000, split="train"), Arithmetic(size=1000, split="test"), "Arithmetic"


def rollouts(engine, tokenizer, task, indices, num_samples, args, seed):
    """Sample num_samples completions of each problem (one batched engine call); returns the engine's
    (sequences, masks), the rewards, and the prompt lengths."""
    conversations = [task[i] for i in indices]
    room = engine.model.config.sequence_len - args.max_new_tokens  # a long problem keeps its end (cropped left)
    prompts = [completion_prompt(tokenizer, c, max(room, 2)) for c in conversations]
    sequences, masks = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=args.max_new_tokens,
                                             temperature=args.temperature, top_k=args.top_k, seed=seed)
    rewards = [task.reward(conversations[r // num_samples], tokenizer.decode(seq[len(prompts[r // num_samples]):]))
               for r, seq in enumerate(sequences)]
    return sequences, masks, np.asarray(rewards, np.float32)


def pass_at_k(engine, tokenizer, task, n, samples, args, seed):
    """{k: fraction of the first n problems solved by at least one of their first k samples}, k = 1..samples."""
    solved = np.zeros((n, samples), bool)
    for i0 in range(0, n, args.examples_per_step):
        idx = list(range(i0, min(i0 + args.examples_per_step, n)))
        _, _, rewards = rollouts(engine, tokenizer, task, idx, samples, args, seed + i0)
        solved[i0:i0 + len(idx)] = rewards.reshape(len(idx), samples) > 0
    return {k: float(np.mean(solved[:, :k].any(axis=1))) for k in range(1, samples + 1)}


def main(argv=None):
    args = build_parser().parse_args(argv)
    tokenizer = get_tokenizer()
    mesh = make_mesh(args)
    rows, accum = batch_shape(args, mesh, args.examples_per_step * args.num_samples)
    train, test, data_name = load_tasks()
    run = StageRun("rl", args, mesh, {"reward": None, "pass@1": None}, rows)
    num_steps = args.num_iterations if args.num_iterations > 0 else \
        max(1, len(train) // args.examples_per_step * args.num_epochs)
    eval_n = min(args.eval_examples, len(test))
    pad = tokenizer.encode_special("<|assistant_end|>")
    print(f"{devices_line(mesh)} | rl {run.model_tag} from {args.source} step {run.source_step} on {data_name} | "
          f"{num_steps} steps × {args.examples_per_step} problems × {args.num_samples} samples "
          f"({accum} micro-batches of {rows} rows)")
    rewards_log = {}
    bar = tqdm(total=num_steps, initial=run.step, desc=f"chat_rl {run.model_tag}", unit="step")
    step, start = run.step, run.step
    with jax.set_mesh(mesh):
        while True:
            last = step >= num_steps
            engine = Engine(run.state.model, tokenizer, mesh=mesh)  # this step's weights
            if last or (args.eval_every > 0 and step % args.eval_every == 0):
                passes = pass_at_k(engine, tokenizer, test, eval_n, args.eval_samples, args, seed=1_000_000)
                run.loop["pass@1"] = passes[1]
                run.writer.scalars(step, {f"val/pass@{k}": v for k, v in passes.items()})
                tqdm.write(f"step {step:05d} | {data_name} pass@1 {passes[1]:.4f} | pass@{args.eval_samples} "
                           f"{passes[args.eval_samples]:.4f} ({eval_n} problems)")
            if last or (args.save_every > 0 and step % args.save_every == 0 and step != start):
                run.save(step, {"step": step})
            if last:
                break
            indices = [(step * args.examples_per_step + i) % len(train) for i in range(args.examples_per_step)]
            sequences, masks, rewards = rollouts(engine, tokenizer, train, indices, args.num_samples, args, seed=step)
            batch = rollout_batch(sequences, masks, advantages(rewards, args.num_samples), pad)
            batch = {k: v.reshape(accum, rows, *v.shape[1:]) for k, v in batch.items()}
            lrm = args.init_lr_frac * (1 - step / num_steps)
            run.state, metrics = train_step(run.state, sharding.shard_batch(batch, mesh, batch_axis=1),
                                            hyperparams(lrm, 0.95))
            check_finite(metrics["loss"], step)
            rewards_log[step] = run.loop["reward"] = float(rewards.mean())
            seq_len = float(np.mean([len(s) for s in sequences]))
            run.writer.scalars(step, {"train/reward": rewards.mean(), "train/sequence_length": seq_len, "train/lrm": lrm,
                                      "train/objective": -float(metrics["loss"])})
            bar.set_postfix_str(f"reward {rewards.mean():.3f} | len {seq_len:.0f}")
            bar.update(1)
            step += 1
    bar.close()
    run.close()
    print(f"done: {num_steps} steps | {data_name} pass@1 {run.loop['pass@1']:.4f} | checkpoints in {run.ckpt.directory}")
    return {"rewards": rewards_log, "pass@1": run.loop["pass@1"], "num_steps": num_steps, "data": data_name}


if __name__ == "__main__":
    run_main(main)

"""Reinforcement learning on GSM8K: `python -m jaxchat.chat_rl [--source sft] [--model_tag d20]` (nanochat's chat_rl).

nanochat's "GRPO", effectively REINFORCE with a group baseline: each step takes `examples_per_step` training
problems, samples `num_samples` completions of each through the engine (calculator tool on; all problems in one
on-device decode, rows sharded over the mesh), rewards 1 for a correct '#### n' answer, and takes one optimizer
step on −Σ advantage · log p(token) over the sampled tokens, divided by their number; advantage = reward − the mean
reward of the problem's group. Only tokens the model sampled are supervised: the engine's mask is 0 on the prompt
and on forced tool-output tokens, and padding is never supervised. Every supervised token of a row carries the
row's advantage as its loss weight in the one `train.train_step`, so the step's loss Σ adv·CE / N is −(the
token-level policy-gradient objective). Learning rates × `init_lr_frac`, then linearly to 0. pass@k on held-out
problems every `eval_every` steps. Offline without GSM8K, the synthetic calculator problems (Arithmetic) stand in,
and the run says so. Sampling seeds derive from the step, so `--resume=1` continues exactly.
"""
import argparse

import numpy as np
from tqdm import tqdm

from jaxchat import distributed, sharding
from jaxchat.common import UserError, non_negative_float, number, pad_bucket, positive_int
from jaxchat.distributed import run_main
from jaxchat.engine import Engine
from jaxchat.optim import hyperparams
from jaxchat.run import add_chat_flags, batch_rows, chat_run, devices_line, stage_main
from jaxchat.sampling import MAX_TOP_K
from jaxchat.train import train_step


def build_parser():
    p = argparse.ArgumentParser(description="RL of a jaxchat chat model on GSM8K.")
    add = add_chat_flags(p, "sft", device_batch_size=8, init_lr_frac=0.05, eval_every=60)
    add("num_epochs", type=positive_int, default=1)
    add("examples_per_step", type=positive_int, default=16, help="problems per optimizer step")
    add("num_samples", type=positive_int, default=16, help="completions per problem (the group)")
    add("max_new_tokens", type=positive_int, default=256)
    add("temperature", type=non_negative_float, default=1.0)
    add("top_k", type=number(int, 0, MAX_TOP_K), default=50, help="0: off")
    add("eval_examples", type=positive_int, default=400, help="held-out problems for pass@k")
    add("eval_samples", type=positive_int, default=8, help="pass@k for k = 1..this")
    return p


def load_tasks():
    """(train, test, name): GSM8K when it can be had, else the synthetic calculator problems."""
    from jaxchat.tasks.arithmetic import Arithmetic
    from jaxchat.tasks.gsm8k import GSM8K
    try:
        tasks, error = (GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test"), "GSM8K"), None
    except UserError as e:
        tasks, error = None, e
    if distributed.everyone("gsm8k", error is None):  # every process trains on the same problems
        return tasks
    reason = str(error).splitlines()[0] if error else "not on every process"
    tqdm.write(f"GSM8K is not available ({reason}); using the synthetic Arithmetic problems")
    return Arithmetic(size=8000, split="train"), Arithmetic(size=1000, split="test"), "Arithmetic"


def rollouts(engine, tokenizer, task, indices, num_samples, args, seed):
    """Sample num_samples completions of each problem (one batched engine call); returns the engine's
    (sequences, masks) and the rewards."""
    conversations = [task[i] for i in indices]
    room = engine.model.config.sequence_len - args.max_new_tokens  # a long problem keeps its end (cropped left)
    prompts = [tokenizer.render_for_completion(c, max(room, 2)) for c in conversations]
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


def advantages(rewards, num_samples):
    """reward − mean reward of its group; `rewards` flat, prompt-major groups of `num_samples` (no σ-scaling,
    as nanochat). float32 (rows,)."""
    r = np.asarray(rewards, np.float32).reshape(-1, num_samples)
    return (r - r.mean(axis=1, keepdims=True)).reshape(-1)


def rollout_batch(sequences, masks, advantages, pad_id, width=None):
    """{"inputs", "targets", "weights"}: int32, int32, float32 (rows, W). `sequences`/`masks` as from
    `Engine.generate_batch` (prompt + sampled tokens; mask 0 on prompt and forced tokens). Targets are −1 where
    the target token's mask is 0 and on padding. W = `width`, else the longest sequence − 1 rounded up to a
    power of two (≥ 16), so that few shapes compile."""
    longest = max(len(s) for s in sequences) - 1
    W = width or pad_bucket(longest)
    if longest > W:
        raise ValueError(f"a sequence needs {longest} positions, more than width {W}")
    rows = len(sequences)
    inputs = np.full((rows, W), pad_id, np.int32)
    targets = np.full((rows, W), -1, np.int32)
    for r, (seq, mask) in enumerate(zip(sequences, masks)):
        assert len(seq) == len(mask), (len(seq), len(mask))
        seq, mask = np.asarray(seq, np.int32), np.asarray(mask)
        n = len(seq) - 1
        inputs[r, :n] = seq[:-1]
        targets[r, :n] = np.where(mask[1:] == 1, seq[1:], -1)  # position t predicts token t+1
    # The whole row carries its advantage; only supervised positions reach the loss.
    weights = np.repeat(np.asarray(advantages, np.float32)[:, None], W, axis=1)
    return {"inputs": inputs, "targets": targets, "weights": weights}


def main(argv=None):
    return stage_main(build_parser, train, argv)


def train(args):
    rows, accum = batch_rows(args, args.examples_per_step * args.num_samples)
    train_task, test_task, data_name = load_tasks()
    settings = {"device_batch_size": args.device_batch_size, "examples_per_step": args.examples_per_step,
                "num_samples": args.num_samples, "batch_rows": rows}
    with chat_run("rl", args, settings, {"reward": None, "pass@1": None}) as run:
        tokenizer, loop = run.tokenizer, run.loop_state
        num_steps = args.num_iterations if args.num_iterations > 0 else \
            max(1, len(train_task) // args.examples_per_step * args.num_epochs)
        eval_n = min(args.eval_examples, len(test_task))
        pad = tokenizer.encode_special("<|assistant_end|>")
        print(f"{devices_line()} | rl {run.model_tag} from {args.source} step {run.meta['source_step']} on "
              f"{data_name} | {num_steps} steps × {args.examples_per_step} problems × {args.num_samples} samples "
              f"({accum} micro-batches of {rows} rows)")
        pass_log, rewards_log = {}, {}  # step -> pass@1, step -> mean reward: this invocation's

        # the data position is the step: its problems and its sampling seed derive from it
        for step in run.steps(num_steps, lambda: {"step": run.step}):
            engine = Engine(run.model, tokenizer)  # this step's weights, for its eval and its rollouts
            if run.last or run.due(args.eval_every):  # pass@k on held-out problems
                passes = pass_at_k(engine, tokenizer, test_task, eval_n, args.eval_samples, args, seed=1_000_000)
                loop["pass@1"] = pass_log[step] = passes[1]
                run.writer.scalars(step, {f"val/pass@{k}": v for k, v in passes.items()})
                tqdm.write(f"step {step:05d} | {data_name} pass@1 {passes[1]:.4f} | pass@{args.eval_samples} "
                           f"{passes[args.eval_samples]:.4f} ({eval_n} problems)")
            if run.last:
                break
            indices = [(step * args.examples_per_step + i) % len(train_task) for i in range(args.examples_per_step)]
            sequences, masks, rewards = rollouts(engine, tokenizer, train_task, indices, args.num_samples, args,
                                                 seed=step)
            batch = rollout_batch(sequences, masks, advantages(rewards, args.num_samples), pad)
            batch = {k: v.reshape(accum, rows, *v.shape[1:]) for k, v in batch.items()}
            lrm = args.init_lr_frac * (1 - step / num_steps)
            run.state, metrics = train_step(run.state, sharding.shard_batch(batch, batch_axis=1),
                                            hyperparams(lrm, 0.95))
            rewards_log[step] = loop["reward"] = float(rewards.mean())
            seq_len = float(np.mean([len(s) for s in sequences]))
            run.log(step, metrics, batch["inputs"].size, {
                "train/reward": rewards_log[step], "train/sequence_length": seq_len, "train/lrm": lrm,
                "train/objective": -metrics["loss"]}, postfix=f"reward {rewards_log[step]:.3f} | len {seq_len:.0f}")

        run.report("Chat RL", {
            "source": f"{args.source} step {run.meta['source_step']}", "data": data_name, "iterations": num_steps,
            "rollouts per step": f"{args.examples_per_step} problems × {args.num_samples} samples",
            "mean reward, first and last step of this run": [rewards_log[min(rewards_log)], rewards_log[max(rewards_log)]]
            if rewards_log else None,
            f"pass@1 at temperature {args.temperature} ({eval_n} test problems), by step": pass_log})
    print(f"done: {num_steps} steps | {data_name} pass@1 {loop['pass@1']:.4f} | checkpoints in {run.ckpt.directory}")
    return {"rewards": rewards_log, "pass@1": loop["pass@1"], "num_steps": num_steps, "data": data_name}


if __name__ == "__main__":
    run_main(main)

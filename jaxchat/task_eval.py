"""Scoring a chat model on tasks, as nanochat scores them (the library of `chat_eval`, and SFT's quick metrics).

- categorical (ARC-Easy, ARC-Challenge, MMLU): a batch of prompts (each ending in <|assistant_start|>), one forward
  pass, the logits at each prompt's last position restricted to that problem's answer letters; the best letter is
  the answer.
- generative (GSM8K, HumanEval, SpellingBee): `num_samples` completions per problem through the engine (many
  problems per on-device decode), a problem passes if any completion passes (pass@k).
ChatCORE = mean over tasks of (accuracy − baseline) / (1 − baseline). Under a mesh (`jax.set_mesh`), a batch's rows
are split over its batch axes.
"""
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxchat import distributed, sharding
from jaxchat.common import UserError, pad_bucket


def _task_registry(sandbox="boundary"):
    """name -> task constructor (tasks load their data when created, so modules are imported only here).
    `sandbox`: where HumanEval runs the model's programs (jaxchat.execution)."""
    from jaxchat.tasks.arc import ARC
    from jaxchat.tasks.arithmetic import Arithmetic
    from jaxchat.tasks.gsm8k import GSM8K
    from jaxchat.tasks.humaneval import HumanEval
    from jaxchat.tasks.mmlu import MMLU
    from jaxchat.tasks.spellingbee import SpellingBee
    return {
        "ARC-Easy": lambda: ARC(subset="ARC-Easy", split="test"),
        "ARC-Challenge": lambda: ARC(subset="ARC-Challenge", split="test"),
        "MMLU": lambda: MMLU(subset="all", split="test"),
        "GSM8K": lambda: GSM8K(subset="main", split="test"),
        "HumanEval": lambda: HumanEval(sandbox=sandbox),
        "SpellingBee": lambda: SpellingBee(size=256, split="test"),
        "Arithmetic": lambda: Arithmetic(size=500, split="test"),  # jaxchat's offline stand-in for GSM8K
    }


# the tasks of nanochat's report card and their random-guess accuracy (4-way multiple choice, open answers)
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
ALL_TASKS = list(BASELINES)
EXTRA_TASKS = ["Arithmetic"]  # not part of ChatCORE


def chatcore(results):
    """Mean baseline-centered accuracy of the tasks in `results` {name: accuracy}."""
    centered = [(acc - BASELINES.get(name, 0.0)) / (1.0 - BASELINES.get(name, 0.0)) for name, acc in results.items()]
    return sum(centered) / len(centered)


@nnx.jit
def _logits_at(model, tokens, positions):
    """The next-token logits (B, V) at one position per row (the last prompt token): the head runs on those rows'
    hidden states only."""
    x = jnp.take_along_axis(model.hidden(tokens), positions[:, None, None], axis=1)  # (B, 1, D)
    return model.logits(x)[:, 0]


def run_categorical_eval(task, tokenizer, model, batch_size=32, max_problems=None):
    """Accuracy of the letter with the highest logit, among the problem's letters, after its prompt. Under a mesh
    (`jax.set_mesh`), a batch's rows are split over its batch axes."""
    n = len(task) if max_problems is None else min(len(task), max_problems)
    bos, context = tokenizer.get_bos_token_id(), model.config.sequence_len
    letter_ids, passed = {}, 0
    bar = tqdm(range(0, n, batch_size), desc=type(task).__name__, unit="batch", leave=False)
    for i0 in bar:
        conversations = [task[i] for i in range(i0, min(i0 + batch_size, n))]
        prompts = [tokenizer.render_for_completion(c, context) for c in conversations]
        rows = sharding.round_up_to_shards(batch_size)  # one shape for every batch
        width = pad_bucket(max(map(len, prompts)), context, minimum=1)  # one compile per bucket
        tokens = np.full((rows, width), bos, np.int32)
        for r, p in enumerate(prompts):
            tokens[r, :len(p)] = p
        positions = np.array([len(p) - 1 for p in prompts] + [0] * (rows - len(prompts)), np.int32)
        logits = sharding.to_host(_logits_at(model, *sharding.shard_batch((tokens, positions))))
        for row, conversation in enumerate(conversations):
            letters = conversation["letters"]
            for letter in letters:
                if letter not in letter_ids:
                    ids = tokenizer.encode(letter)
                    if len(ids) != 1:
                        raise UserError(f"answer letter {letter!r} is {len(ids)} tokens for this tokenizer, not 1")
                    letter_ids[letter] = ids[0]
            best = int(np.argmax(logits[row, [letter_ids[l] for l in letters]]))
            passed += int(task.evaluate(conversation, letters[best]))
        bar.set_postfix_str(f"{passed}/{min(i0 + batch_size, n)}")
    return passed / max(n, 1)


def run_generative_eval(task, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                        max_problems=None, batch_size=32, seed=42):
    """pass@num_samples: `batch_size` problems per engine call, every completion checked (in threads: HumanEval
    runs each program in a sandboxed subprocess)."""
    n = len(task) if max_problems is None else min(len(task), max_problems)
    context = engine.model.config.sequence_len
    passed = 0
    bar = tqdm(total=n, desc=type(task).__name__, unit="problem", leave=False)
    with ThreadPoolExecutor(8) as pool:
        for i0 in range(0, n, batch_size):
            conversations = [task[i] for i in range(i0, min(i0 + batch_size, n))]
            prompts = [tokenizer.render_for_completion(c, context - 1) for c in conversations]
            results, _ = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                               temperature=temperature, top_k=top_k, seed=seed + i0)
            jobs = [(conversations[r // num_samples], tokenizer.decode(seq[len(prompts[r // num_samples]):]))
                    for r, seq in enumerate(results)]
            outcomes = list(pool.map(lambda job: task.evaluate(*job), jobs))
            for p in range(len(conversations)):
                passed += int(any(outcomes[p * num_samples:(p + 1) * num_samples]))
            bar.update(len(conversations))
            bar.set_postfix_str(f"{passed}/{bar.n}")
    bar.close()
    return passed / max(n, 1)


def run_chat_eval(task_name, model, tokenizer, engine, batch_size=32, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None, sandbox="boundary"):
    """nanochat's entry point: build the task by name and score it."""
    registry = _task_registry(sandbox)
    if task_name not in registry:
        raise UserError(f"unknown task {task_name!r}; tasks: {', '.join(registry)}")
    try:
        task, error = registry[task_name](), None
    except UserError as e:  # its data or its sandbox cannot be had
        task, error = None, e
    if not distributed.everyone(f"task/{task_name}", error is None):
        raise error or UserError(f"{task_name} cannot be had on another process")
    if task.eval_type == "categorical":
        return run_categorical_eval(task, tokenizer, model, batch_size, max_problems)
    return run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k,
                               max_problems, batch_size)

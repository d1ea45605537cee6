"""Chat evals: ChatCORE, categorical letter restriction, batched generative pass@k, the CLI with skipped tasks."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat import chat_eval, execution, task_eval
from jaxchat.checkpoint_manager import Checkpointer, checkpoint_dir
from jaxchat.common import UserError, get_base_dir
from jaxchat.engine import Engine
from jaxchat.model import GPT, GPTConfig
from jaxchat.report_card import get_report
from jaxchat.tokenizer import RustBPETokenizer

from test_model import randomize


@pytest.fixture(scope="module")
def tok():
    text = " ".join(f"What is {i} plus {i % 7}? The answer is {i + i % 7}. Choose A, B, C or D." for i in range(400))
    return RustBPETokenizer.train_from_iterator([text], 300)


def make_model(seed=0):
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return randomize(GPT(config, rngs=nnx.Rngs(0)), seed=seed, scale=0.5)


class LetterTask:
    """Multiple choice over a few letters; the gold letter cycles."""
    eval_type = "categorical"

    def __init__(self, n=7, letters=("A", "B", "C", "D")):
        self.n, self.letters = n, list(letters)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        question = "What is " + " plus ".join(str(j) for j in range(i + 1)) + "?"  # prompts of different lengths
        gold = self.letters[i % len(self.letters)]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": gold}],
                "letters": self.letters}

    def evaluate(self, conversation, letter):
        return int(letter == conversation["messages"][-1]["content"])


class EchoTask:
    """Generative: passes when the completion contains the problem's target word."""
    eval_type = "generative"

    def __init__(self, n=5):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}

    def evaluate(self, conversation, completion):
        return int(conversation["messages"][-1]["content"] in completion)


def test_chatcore_reproduces_nanochats_readme():
    """nanochat README (SFT column): ARC-E 0.3876, ARC-C 0.2807, MMLU 0.3151, GSM8K 0.0455, HumanEval 0.0854."""
    sft = {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455, "HumanEval": 0.0854}
    assert round(task_eval.chatcore(sft), 4) == 0.0884
    mid = {"ARC-Easy": 0.3561, "ARC-Challenge": 0.2875, "MMLU": 0.3111, "GSM8K": 0.0250, "HumanEval": 0.0671}
    assert round(task_eval.chatcore(mid), 4) == 0.0730


@pytest.mark.slow
def test_categorical_restricts_to_the_letters(tok):
    """Batched (padded, bucketed) scoring equals scoring each problem alone, and the answer is always the best of
    the problem's own letters, even when another token has a higher logit."""
    model, task = make_model(), LetterTask(n=7, letters=("A", "B"))
    want, off_letters = 0, 0
    for i in range(len(task)):
        conversation = task[i]
        ids = tok.render_for_completion(conversation)
        logits = np.asarray(model(jnp.asarray([ids]))[0, -1])
        off_letters += int(np.argmax(logits) not in (tok.encode("A")[0], tok.encode("B")[0]))
        letter = "AB"[int(logits[tok.encode("B")[0]] > logits[tok.encode("A")[0]])]
        want += task.evaluate(conversation, letter)
    assert off_letters > 0  # the unrestricted argmax is some other token: the restriction matters
    for batch_size in (1, 3, 8):
        assert task_eval.run_categorical_eval(task, tok, model, batch_size=batch_size) == want / len(task)
    assert task_eval.run_categorical_eval(task, tok, model, batch_size=3, max_problems=2) == \
        task_eval.run_categorical_eval(task, tok, model, batch_size=1, max_problems=2)


def test_categorical_needs_single_token_letters(tok):
    with pytest.raises(UserError, match="not 1"):
        task_eval.run_categorical_eval(LetterTask(n=2, letters=("A", "the answer")), tok, make_model(), 2)


class FakeEngine:
    """generate_batch stand-in: sample s of problem p says "p" only when s == p % 3 (pass@k any-of)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.calls = model, tokenizer, []

    def generate_batch(self, prompts, num_samples, **kw):
        self.calls.append(len(prompts))
        out = []
        for p, prompt in enumerate(prompts):
            problem = int(self.tokenizer.decode(prompt).split("Say ")[1].split("<")[0])
            for s in range(num_samples):
                text = str(problem) if s == problem % 3 else "no"
                out.append(prompt + self.tokenizer.encode(text))
        return out, None


def test_generative_pass_at_k_is_any_of(tok):
    engine = FakeEngine(make_model(), tok)
    task = EchoTask(n=5)
    assert task_eval.run_generative_eval(task, tok, engine, num_samples=3, batch_size=2) == 1.0
    assert engine.calls == [2, 2, 1]  # problems batched into the engine
    assert task_eval.run_generative_eval(task, tok, FakeEngine(make_model(), tok), num_samples=1) == 2 / 5  # problems 0 and 3


@pytest.mark.slow
def test_generative_batched_equals_one_at_a_time(tok):
    """With the real engine, greedy: scoring 5 problems 4 at a time gives the per-problem outcomes of 1 at a time."""
    model = make_model(seed=2)
    engine = Engine(model, tok)

    class Greedy(EchoTask):
        def evaluate(self, conversation, completion):  # a property of the completion the model actually wrote
            return int(len(completion) % 2 == 0)

    task = Greedy(n=5)
    one = [task_eval.run_generative_eval(task, tok, engine, max_new_tokens=8, max_problems=i + 1, batch_size=1)
           for i in range(5)]
    batched = task_eval.run_generative_eval(task, tok, engine, max_new_tokens=8, batch_size=4)
    assert batched == one[-1]


@pytest.mark.slow
def test_cli_reports_skipped_tasks_and_no_chatcore(tok, monkeypatch, capsys):
    tok.save(os.path.join(get_base_dir(), "tokenizer"))
    model = make_model()
    ckpt = Checkpointer(checkpoint_dir("sft", "tiny"))
    ckpt.save(3, nnx.state(model), {"dummy": jnp.zeros(())},
              {"model_config": dataclasses.asdict(model.config)}, tok)
    ckpt.close()

    def unavailable():
        raise UserError("no data for this task here (offline)")

    monkeypatch.setattr(task_eval, "_task_registry", lambda sandbox: {
        "ARC-Easy": lambda: LetterTask(n=4), "GSM8K": lambda: EchoTask(n=3), "MMLU": unavailable})
    out = chat_eval.main(["-g", "tiny", "-a", "ARC-Easy|GSM8K|MMLU", "-m", "4"])
    assert set(out["results"]) == {"ARC-Easy", "GSM8K"} and out["skipped"] == {"MMLU": "no data for this task here (offline)"}
    assert out["chatcore"] is None and out["step"] == 3
    printed = capsys.readouterr().out
    assert "MMLU: skipped (no data" in printed and "ChatCORE: not computed" in printed
    with open(os.path.join(get_base_dir(), "chat_eval", "sft_tiny_000003.json")) as f:
        assert json.load(f)["results"] == out["results"]
    with pytest.raises(UserError, match="unknown task"):
        chat_eval.main(["-g", "tiny", "-a", "ARC-Hard"])
    # several stages in one call (the report's MID / SFT / RL columns): each evaluated, saved and reported
    ckpt = Checkpointer(checkpoint_dir("mid", "tiny"))
    ckpt.save(5, nnx.state(model), {"dummy": jnp.zeros(())}, {"model_config": dataclasses.asdict(model.config)}, tok)
    ckpt.close()
    last = chat_eval.main(["-i", "mid,sft", "-g", "tiny", "-a", "ARC-Easy|MMLU", "-m", "4"])
    assert last["source"] == "sft" and last["results"]["ARC-Easy"] == out["results"]["ARC-Easy"]
    sections = get_report().sections()
    assert sections["chat-evaluation-mid"]["data"]["model"] == "mid tiny step 5"  # same weights, same accuracy
    assert sections["chat-evaluation-mid"]["data"]["results"] == {"ARC-Easy": out["results"]["ARC-Easy"]}
    assert sections["chat-evaluation-sft"]["data"]["skipped"] == {"MMLU": "no data for this task here (offline)"}
    with pytest.raises(UserError, match=r"-i: unknown source\(s\) \['sfft'\]"):
        chat_eval.main(["-i", "mid,sfft", "-g", "tiny"])
    capsys.readouterr()
    chat_eval.main(["-i", "sft,rl", "-g", "tiny", "-a", "ARC-Easy", "-m", "4"])  # no RL run: skipped, said why
    assert "rl: skipped (" in capsys.readouterr().out and "chat-evaluation-rl" not in get_report().sections()
    with pytest.raises(UserError, match="none of these stages has a checkpoint"):
        chat_eval.main(["-i", "rl,base", "-g", "tiny"])


@pytest.mark.slow
def test_humaneval_without_the_sandbox_is_skipped_unless_opted_out(tok, monkeypatch):
    tok.save(os.path.join(get_base_dir(), "tokenizer"))
    model = make_model()
    ckpt = Checkpointer(checkpoint_dir("sft", "tiny"))
    ckpt.save(1, nnx.state(model), {"dummy": jnp.zeros(())}, {"model_config": dataclasses.asdict(model.config)}, tok)
    ckpt.close()
    monkeypatch.setattr(execution, "boundary_problem", lambda: "bubblewrap is not installed")
    out = chat_eval.main(["-g", "tiny", "-a", "HumanEval", "-m", "4", "-x", "2"])
    assert out["results"] == {} and "bubblewrap is not installed" in out["skipped"]["HumanEval"]
    out = chat_eval.main(["-g", "tiny", "-a", "HumanEval", "-m", "4", "-x", "2", "--unsafe-weak-sandbox"])
    assert out["skipped"] == {} and out["results"] == {"HumanEval": 0.0}  # scored, in the weak sandbox

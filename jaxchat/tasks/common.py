"""The task framework: a Task is a dataset of conversations, often with a way to grade a model's answer.

A conversation is {"messages": [{"role": "user"|"assistant"|"system", "content": str | [parts]}], ...extras},
where assistant parts are {"type": "text"|"python"|"python_output", "text": str}, as the tokenizer renders them.
Tasks are views: `ARC(..., start=0, stop=100, step=2)` is every other one of the first 100 examples.
"""
import math
import operator
import random
import re

from jaxchat.common import UserError


class Task:
    """A lazy view [start:stop:step] over `num_examples()` examples; `task[i]` is `get_example(start + i*step)`.

    Subclasses hold their examples' data in `self.rows` (or override `num_examples`), and set `eval_type`
    ("categorical" or "generative") when they can `evaluate` an answer."""
    eval_type = None

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task view start={start} stop={stop} step={step}: need 0 <= start <= stop, step >= 1")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        raise NotImplementedError

    def __len__(self):
        # like a Python slice, a stop past the end is clamped
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, i):
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a task of {len(self)} examples")
        return self.get_example(self.start + i * self.step)

    def evaluate(self, conversation, assistant_response):
        """1 if `assistant_response` (the model's answer) is correct for `conversation`, else 0."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation")


class TaskMixture(Task):
    """All examples of all tasks in one fixed shuffled order, so every stretch of training sees every task.
    A task listed twice is seen twice as often (oversampling)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(42).shuffle(self.index_map)  # nanochat's order: same tasks, same mixture

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]


class Resized(Task):
    """`n` examples of a task: its first n, or all of it repeated from the start when it has fewer (oversampling)."""

    def __init__(self, task, n, **kwargs):
        super().__init__(**kwargs)
        self.task, self.n = task, n

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return self.task[index % len(self.task)]


class TaskSequence(Task):
    """The tasks one after another (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(task) for task in self.tasks]

    def num_examples(self):
        return sum(self.lengths)

    def get_example(self, index):
        for task, n in zip(self.tasks, self.lengths):
            if index < n:
                return task[index]
            index -= n
        raise IndexError(index)


TEST_SEED_OFFSET = 10_000_000  # above any train size: train and test seeds never meet


class SyntheticTask(Task):
    """`size` generated examples of a split (train|test). Example i comes from its own seed (i for train,
    TEST_SEED_OFFSET + i for test), so any size is free and the splits never share a seed."""

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise UserError(f"{type(self).__name__} split must be train|test, got {split!r}")
        self.size, self.split = size, split

    def num_examples(self):
        return self.size

    def rng(self, index):
        return random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)


def render_mc(question, letters, choices):
    """The multiple-choice prompt. The letter comes after its choice (small models bind it better that way) and
    right after "=" with no space, so the prompt's "A" is the same token as the answer "A" (not " A")."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    return "".join(lines) + "\nRespond only with the letter of the correct answer."


class MultipleChoiceTask(Task):
    """Categorical: the model picks one of `conversation["letters"]`; correct when it is the gold letter."""
    eval_type = "categorical"

    @staticmethod
    def conversation(question, letters, choices, answer, **extra):
        letters = list(letters)
        if answer not in letters:
            raise UserError(f"answer {answer!r} is not one of the letters {letters} (question: {question[:80]!r})")
        messages = [{"role": "user", "content": render_mc(question, letters, choices)},
                    {"role": "assistant", "content": answer}]
        return {"messages": messages, "letters": letters, **extra}

    def evaluate(self, conversation, assistant_response):
        return int(assistant_response == conversation["messages"][-1]["content"])


ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text):
    """The number after the first '#### ' marker, commas dropped (GSM8K's own normalization); None if absent."""
    m = ANSWER_RE.search(text)
    return m.group(1).strip().replace(",", "") if m else None


class FinalAnswerTask(Task):
    """Generative, graded on the '#### n' final answer: the reference is in the gold conversation's last part."""
    eval_type = "generative"

    def evaluate(self, conversation, assistant_response):
        gold = conversation["messages"][-1]["content"]
        gold = gold if isinstance(gold, str) else gold[-1]["text"]
        return int(extract_answer(assistant_response) == extract_answer(gold))

    def reward(self, conversation, assistant_response):
        """The RL reward: 1.0 for a correct final answer, else 0.0."""
        return float(self.evaluate(conversation, assistant_response))


def check_messages(messages):
    """Why `messages` is not a valid conversation, or None: an optional system message, then user/assistant
    alternating (at least one of each), string contents (an assistant's may be a list of parts)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return "expected a list of message objects"
    skip = 1 if messages and messages[0].get("role") == "system" else 0
    if skip and not isinstance(messages[0].get("content"), str):
        return "message 0: a system message's content must be a string"
    if len(messages) - skip < 2:
        return f"a conversation needs at least a user and an assistant message, got {len(messages) - skip}"
    for i, m in enumerate(messages[skip:], skip):
        expected = "user" if (i - skip) % 2 == 0 else "assistant"
        if m.get("role") != expected:
            return f"message {i} has role {m.get('role')!r}, expected {expected!r} (roles must alternate)"
        content = m.get("content")
        parts_ok = expected == "assistant" and isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") in ("text", "python", "python_output")
            and isinstance(p.get("text"), str) for p in content)
        if not (isinstance(content, str) or parts_ok):
            return f"message {i}: content must be a string (or, for the assistant, a list of parts)"
    return None

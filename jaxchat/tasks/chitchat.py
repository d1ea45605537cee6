"""Human chit-chat from the Chit Chat Challenge (PyPI `chitchat-dataset`, MIT): 7,168 two-person conversations.

jaxchat's offline stand-in for SmolTalk: real conversational text that a package registry can deliver. Each
conversation's turns (consecutive messages of one person, joined by newlines) alternate user / assistant; a
conversation left with fewer than two turns is skipped. Split: a fixed 95% / 5% train / test cut of the
conversations in key order, shuffled with seed 42.
"""
import functools
import json
import os
import random

from jaxchat.tasks.common import Task
from jaxchat.tasks.data import TaskDataUnavailable

TEST_FRACTION = 0.05


@functools.cache  # the mixtures build train and test: read the 40 MB file once per process
def _load():
    try:
        import chitchat_dataset
    except ImportError:
        raise TaskDataUnavailable("the chitchat-dataset package is not installed (pip install chitchat-dataset)") from None
    with open(os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json"), encoding="utf-8") as f:
        data = json.load(f)
    conversations = []
    for key in sorted(data):
        turns = ["\n".join(m["text"].strip() for m in turn if m["text"].strip()) for turn in data[key]["messages"]]
        turns = [t for t in turns if t]
        turns = turns[:len(turns) // 2 * 2]  # end on the assistant's turn
        if len(turns) >= 2:
            conversations.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                  for i, t in enumerate(turns)])
    random.Random(42).shuffle(conversations)
    return conversations


class ChitChat(Task):

    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"ChitChat split must be train|test, got {split!r}")
        conversations = _load()
        cut = int(len(conversations) * (1 - TEST_FRACTION))
        self.rows = conversations[:cut] if split == "train" else conversations[cut:]

    def get_example(self, index):
        return {"messages": self.rows[index]}

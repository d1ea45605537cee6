"""The data mixtures of the chat stages: nanochat's, made of whatever parts can be had.

Each part is built when the mixture is; a part whose data cannot be had (offline, no local copy) is left out with the
reason, which the stage prints and logs: a mixture never silently shrinks. Offline, what remains is the shipped
identity conversations, human chit-chat from a PyPI package (ChitChat, in place of SmolTalk), the synthetic tasks
(spelling, calculator arithmetic) and GSM8K from a local copy (`JAXCHAT_GSM8K_DIR`). `--extra_jsonl FILE,...` adds
your own conversations (CustomJSON) to a stage's training mix; `--mixture NAME=N,...` changes how many conversations
a part gives (the `tiny` config leans on the tasks a small model can learn in minutes).
"""
import os

from jaxchat.common import UserError
from jaxchat.tasks.arc import ARC
from jaxchat.tasks.arithmetic import Arithmetic
from jaxchat.tasks.chitchat import ChitChat
from jaxchat.tasks.common import Resized, TaskMixture
from jaxchat.tasks.customjson import CustomJSON
from jaxchat.tasks.gsm8k import GSM8K
from jaxchat.tasks.mmlu import MMLU
from jaxchat.tasks.smoltalk import SmolTalk
from jaxchat.tasks.spellingbee import SimpleSpelling, SpellingBee

MIXTURE_KEYS = ("extra_jsonl", "mixture")  # the flags that choose a stage's data: a resumed run keeps them
IDENTITY = os.path.join(os.path.dirname(__file__), "data", "identity_conversations.jsonl")

MIXTURES = {  # (stage, split) -> [(part name, a function that builds the part)]
    ("mid", "train"): [
        ("SmolTalk", lambda: SmolTalk(split="train")),
        ("MMLU auxiliary_train", lambda: MMLU(subset="auxiliary_train", split="train")),
        ("GSM8K", lambda: GSM8K(subset="main", split="train")),
        ("identity", lambda: CustomJSON(IDENTITY)), ("identity (2nd copy)", lambda: CustomJSON(IDENTITY)),
        ("SimpleSpelling", lambda: SimpleSpelling(size=200_000, split="train")),
        ("SpellingBee", lambda: SpellingBee(size=80_000, split="train")),
        ("Arithmetic", lambda: Arithmetic(size=20_000, split="train")),
        ("ChitChat", lambda: ChitChat(split="train"))],
    ("mid", "val"): [
        ("SmolTalk test", lambda: SmolTalk(split="test")),
        ("MMLU test", lambda: MMLU(subset="all", split="test", stop=5200)),
        ("GSM8K test", lambda: GSM8K(subset="main", split="test", stop=420)),
        ("SpellingBee test", lambda: SpellingBee(size=500, split="test")),
        ("Arithmetic test", lambda: Arithmetic(size=500, split="test")),
        ("ChitChat test", lambda: ChitChat(split="test"))],
    ("sft", "train"): [
        ("ARC-Easy", lambda: ARC(subset="ARC-Easy", split="train")),
        ("ARC-Challenge", lambda: ARC(subset="ARC-Challenge", split="train")),
        ("GSM8K", lambda: GSM8K(subset="main", split="train")),
        ("SmolTalk", lambda: SmolTalk(split="train", stop=10_000)),
        ("identity", lambda: CustomJSON(IDENTITY)),
        ("SimpleSpelling", lambda: SimpleSpelling(size=300, split="train")),
        ("SpellingBee", lambda: SpellingBee(size=300, split="train")),
        ("Arithmetic", lambda: Arithmetic(size=2_000, split="train")),
        ("ChitChat", lambda: ChitChat(split="train"))],
    ("sft", "val"): [
        ("SmolTalk test", lambda: SmolTalk(split="test")),
        ("GSM8K test", lambda: GSM8K(subset="main", split="test", stop=420)),
        ("SpellingBee test", lambda: SpellingBee(size=200, split="test")),
        ("Arithmetic test", lambda: Arithmetic(size=200, split="test")),
        ("ChitChat test", lambda: ChitChat(split="test"))],
}


def parse_sizes(stage, text):
    """--mixture "NAME=N,NAME=N" -> {part: N}, each NAME a part of the stage's training mixture."""
    names = [name for name, _ in MIXTURES[(stage, "train")]]
    sizes = {}
    for item in filter(None, text.split(",")):
        name, _, n = item.partition("=")
        if name not in names or not n.isdigit():
            raise UserError(f"--mixture {item!r}: expected NAME=N with NAME one of {', '.join(names)}")
        sizes[name] = int(n)
    return sizes


def build_mixture(stage, split, extra_jsonl="", mixture=""):
    """(TaskMixture, {part: size}, {part: why it was left out}). `mixture` ("Arithmetic=20000,SimpleSpelling=0"):
    how many conversations to take of some parts of the training mixture: their first N, repeated when they have
    fewer; 0 leaves a part out."""
    parts = list(MIXTURES[(stage, split)])
    if split == "train":
        parts += [(f"your {path}", lambda p=path: CustomJSON(p)) for path in filter(None, extra_jsonl.split(","))]
    resize = parse_sizes(stage, mixture) if split == "train" else {}
    tasks, sizes, missing = [], {}, {}
    for name, make in parts:
        if resize.get(name) == 0:
            continue
        try:
            task = make()
        except UserError as e:
            missing[name] = str(e).splitlines()[0]
            continue
        if name in resize:
            task = Resized(task, resize[name])
        tasks.append(task)
        sizes[name] = len(task)
    if not tasks:
        raise UserError(f"no data for the {stage} {split} mixture: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    return TaskMixture(tasks), sizes, missing


def describe(stage, split, sizes, missing):
    lines = [f"{stage} {split} mixture: {sum(sizes.values()):,} conversations: "
             + ", ".join(f"{k} {v:,}" for k, v in sizes.items())]
    lines += [f"  left out {k}: {v}" for k, v in missing.items()]
    return "\n".join(lines)

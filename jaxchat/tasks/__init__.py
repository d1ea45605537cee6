"""Chat tasks: datasets of conversations for SFT/RL mixtures and chat evals (see common.py for the framework)."""
from jaxchat.tasks.arc import ARC
from jaxchat.tasks.common import (FinalAnswerTask, MultipleChoiceTask, Task, TaskMixture, TaskSequence,
                                  extract_answer, render_mc)
from jaxchat.tasks.customjson import CustomJSON
from jaxchat.tasks.data import TaskDataUnavailable, load_hub_dataset
from jaxchat.tasks.gsm8k import GSM8K
from jaxchat.tasks.humaneval import HumanEval
from jaxchat.tasks.mmlu import MMLU
from jaxchat.tasks.smoltalk import SmolTalk
from jaxchat.tasks.spellingbee import SimpleSpelling, SpellingBee

__all__ = ["ARC", "CustomJSON", "FinalAnswerTask", "GSM8K", "HumanEval", "MMLU", "MultipleChoiceTask", "SimpleSpelling",
           "SmolTalk", "SpellingBee", "Task", "TaskDataUnavailable", "TaskMixture", "TaskSequence", "extract_answer",
           "load_hub_dataset", "render_mc"]

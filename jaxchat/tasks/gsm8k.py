"""GSM8K: grade-school math word problems with worked solutions. Hub: openai/gsm8k (main / socratic).

The solutions mark calculator steps as <<48/2=24>>; we turn each into a python tool call (the expression, which the
model learns to write) followed by its python_output (the result, which the tool writes at inference time).
Also reads the original openai/grade-school-math files ({split}.jsonl, {split}_socratic.jsonl) from
GSM8K(data_dir=DIR) or $JAXCHAT_GSM8K_DIR, in the same shuffled order as the hub copy."""
import os
import re

from jaxchat.common import UserError
from jaxchat.tasks.common import FinalAnswerTask
from jaxchat.tasks.data import TaskDataUnavailable, load_hub_dataset, read_rows, shuffled


def solution_parts(answer):
    """A GSM8K solution text → assistant parts: text, then python/python_output for every <<expr=result>>."""
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, eq, result = piece[2:-2].rpartition("=")
            if not eq:  # no "=": a bare expression with no shown result
                expr, result = result, ""
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(FinalAnswerTask):

    def __init__(self, subset="main", split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise UserError(f"GSM8K({subset!r}, {split!r}): subset is main|socratic, split train|test")
        if local := data_dir or os.environ.get("JAXCHAT_GSM8K_DIR"):
            path = os.path.join(local, f"{split}.jsonl" if subset == "main" else f"{split}_socratic.jsonl")
            if not os.path.exists(path):
                raise TaskDataUnavailable(f"GSM8K: {path} not found (the directory given by data_dir or "
                                          f"JAXCHAT_GSM8K_DIR should hold openai/grade-school-math's data files)")
            self.rows = shuffled(read_rows([path]))
        else:
            self.rows = load_hub_dataset("openai/gsm8k", subset, split)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": solution_parts(row["answer"])}]}

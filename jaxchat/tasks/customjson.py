"""Conversations from your own JSONL file: one conversation per line, as a JSON list of messages
[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}] (or an object {"messages": [...]}).
nanochat uses this for its identity conversations (who the model is, who made it)."""
import json
import os

from jaxchat.common import UserError
from jaxchat.tasks.common import Task, check_messages
from jaxchat.tasks.data import TaskDataUnavailable


class CustomJSON(Task):

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        if not os.path.exists(filepath):
            raise TaskDataUnavailable(f"conversation file {filepath} not found (JSONL, one list of messages a line)")
        self.rows = []
        with open(filepath, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    messages = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{filepath}:{lineno}: not valid JSON ({e})") from None
                if isinstance(messages, dict) and "messages" in messages:
                    messages = messages["messages"]
                if why := check_messages(messages):
                    raise UserError(f"{filepath}:{lineno}: {why}")
                self.rows.append(messages)
        if not self.rows:
            raise UserError(f"{filepath} holds no conversations")

    def get_example(self, index):
        return {"messages": self.rows[index]}

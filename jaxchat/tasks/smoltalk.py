"""SmolTalk: general chat conversations (Hugging Face's smol-smoltalk, sized for small models).
Hub: HuggingFaceTB/smol-smoltalk; train 460K conversations, test 24K. Some start with a system message."""
from jaxchat.common import UserError
from jaxchat.tasks.common import Task, check_messages
from jaxchat.tasks.data import load_hub_dataset


class SmolTalk(Task):

    def __init__(self, split, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise UserError(f"SmolTalk split must be train|test, got {split!r}")
        self.rows = load_hub_dataset("HuggingFaceTB/smol-smoltalk", "default", split, data_dir=data_dir)

    def get_example(self, index):
        messages = self.rows[index]["messages"]
        if why := check_messages(messages):  # checked when read: 460K rows are too many to check up front
            raise UserError(f"SmolTalk {index}: {why}")
        return {"messages": messages}

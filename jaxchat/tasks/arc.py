"""ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 lettered choices.
Hub: allenai/ai2_arc, subsets ARC-Easy / ARC-Challenge."""
from jaxchat.common import UserError
from jaxchat.tasks.common import MultipleChoiceTask
from jaxchat.tasks.data import load_hub_dataset


class ARC(MultipleChoiceTask):

    def __init__(self, subset, split, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge") or split not in ("train", "validation", "test"):
            raise UserError(f"ARC({subset!r}, {split!r}): subset is ARC-Easy|ARC-Challenge, "
                            f"split train|validation|test")
        self.rows = load_hub_dataset("allenai/ai2_arc", subset, split, data_dir=data_dir)

    def get_example(self, index):
        row = self.rows[index]
        # letters come from the data: most questions use A-D, a few A-E or 1-4
        return self.conversation(row["question"], row["choices"]["label"], row["choices"]["text"], row["answerKey"])

"""MMLU: four-choice questions on 57 subjects. Hub: cais/mmlu.

nanochat HEAD asks for subset "all" with splits auxiliary_train|validation|dev|test; the October version asked for
subset "auxiliary_train", split "train", whose rows wrap the real row in a "train" field. Both are accepted."""
from jaxchat.common import UserError
from jaxchat.tasks.common import MultipleChoiceTask
from jaxchat.tasks.data import load_hub_dataset


class MMLU(MultipleChoiceTask):
    letters = ("A", "B", "C", "D")

    def __init__(self, subset, split, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        ok = (subset == "all" and split in ("auxiliary_train", "validation", "dev", "test")) or \
             (subset == "auxiliary_train" and split == "train")
        if not ok:
            raise UserError(f"MMLU({subset!r}, {split!r}): use subset 'all' with split auxiliary_train|validation|"
                            f"dev|test (or subset 'auxiliary_train' with split 'train')")
        self.rows = load_hub_dataset("cais/mmlu", subset, split, data_dir=data_dir)

    def get_example(self, index):
        row = self.rows[index]
        row = row.get("train", row)  # unwrap the auxiliary_train subset's extra layer
        if len(row["choices"]) != 4:
            raise UserError(f"MMLU row {index} has {len(row['choices'])} choices, expected 4")
        return self.conversation(row["question"], self.letters, row["choices"], self.letters[row["answer"]],
                                 subject=row["subject"])

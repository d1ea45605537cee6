"""Synthetic word problems solved with the calculator tool, graded on the '#### n' answer like GSM8K.

Made for offline runs (no dataset hub): the same skills GSM8K teaches in miniature — read a short problem, call the
calculator (<|python_start|>expr<|python_end|>), read its output, state the answer — with an exact reward for RL.
"""
from jaxchat.engine import use_calculator
from jaxchat.tasks.common import FinalAnswerTask, SyntheticTask

NAMES = ["Ada", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kai", "Lena", "Maya", "Noor"]
THINGS = ["apples", "books", "coins", "stickers", "marbles", "pencils", "cookies", "stamps", "shells", "cards"]
# (question template, calculator expression); "//" so the tool prints an int, as the answer is written
PROBLEMS = [
    ("{name} has {a} {things} and buys {b} more. How many {things} does {name} have now?", "{a}+{b}"),
    ("{name} had {a} {things} and gave away {b}. How many {things} are left?", "{a}-{b}"),
    ("{name} buys {b} boxes with {a} {things} in each. How many {things} is that in total?", "{a}*{b}"),
    ("{name} shares {c} {things} equally among {b} friends. How many {things} does each friend get?", "{c}//{b}"),
    ("What is {a} plus {b}?", "{a}+{b}"),
    ("What is {a} times {b}?", "{a}*{b}"),
    ("What is {a} minus {b}?", "{a}-{b}"),
]


class Arithmetic(SyntheticTask, FinalAnswerTask):
    """`size` problems of one split; the assistant calls the calculator, then answers '#### n'."""

    def get_example(self, index):
        rng = self.rng(index)
        question, expr = rng.choice(PROBLEMS)
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        if expr == "{a}-{b}" and a < b:
            a, b = b, a
        values = dict(name=rng.choice(NAMES), things=rng.choice(THINGS), a=a, b=b, c=a * b)
        expression = expr.format(**values)
        result = use_calculator(expression)  # the tool's own output, exactly what inference will show the model
        parts = [{"type": "text", "text": "Let me calculate: "},
                 {"type": "python", "text": expression},
                 {"type": "python_output", "text": str(result)},
                 {"type": "text", "text": f"\n\nThe answer is {result}.\n\n#### {result}"}]
        return {"messages": [{"role": "user", "content": question.format(**values)},
                             {"role": "assistant", "content": parts}]}

"""Synthetic spelling tasks, so a small model learns what letters its tokens are made of.

SpellingBee: "how many r in strawberry?" answered by spelling the word out and counting by hand, then checking with
a python tool call ('strawberry'.count('r')), then '#### 3'. Mixing both habits gives RL something to refine.
SimpleSpelling: "Spell the word: cat" -> "cat:c,a,t", the hard part of the above in concentrated form.

Each example comes from its own seed (SyntheticTask); nanochat's October seed -(i+1) made test item i train item i+1.
"""
import functools
import os
import random

from jaxchat.common import UserError, get_base_dir
from jaxchat.download import BadFile, download_file
from jaxchat.tasks.common import FinalAnswerTask, SyntheticTask
from jaxchat.tasks.data import TaskDataUnavailable

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"  # ~370K words

# Many phrasings (and languages) of the same question, so the model learns the task, not one sentence.
TEMPLATES = [
    "How many {letter} does the word {word} have",
    "How many times does the letter {letter} occur in {word}",
    "Count the {letter}s in {word}",
    "How many {letter}'s does {word} contain",
    "Please count the letter {letter} in {word}",
    "What is the number of {letter} in the word {word}",
    "In {word}, how often does {letter} appear",
    "How often does {letter} show up in {word}",
    "Can you tell me how many {letter} are in {word}",
    "I need the count of {letter} in {word}",
    "Quick question: how many {letter} in {word}",
    "How many copies of the letter {letter} are in {word}",
    "Number of times {letter} appears in {word}",
    "Count the occurrences of {letter} in the word {word}",
    "How many {letter} can you find in {word}",
    "Tell me how many times {letter} is in {word}",
    "{word}: how many {letter}",
    "Look at the word {word}. How many {letter} does it have",
    "Could you count how many {letter} there are in {word}",
    "What's the {letter} count for {word}",
    "How many {letter} appear in the spelling of {word}",
    "If you spell {word}, how many {letter} do you get",
    "Letter {letter} in {word}: how many times",
    "How many instances of the letter {letter} does {word} have",
    "Count every {letter} in {word}",
    "Determine the number of {letter} in {word}",
    "Find how many {letter} are in {word}",
    "How many {letter} is {word} spelled with",
    "¿Cuántas veces está la letra {letter} en {word}?",
    "¿Cuántas {letter} tiene la palabra {word}?",
    "Cuenta cuántas {letter} hay en {word}",
    "¿Cuántas letras {letter} hay en {word}?",
    "{word}这个单词里有几个{letter}",
    "请数一数{word}中有多少个{letter}",
    "{word}中字母{letter}出现了几次",
    "{word}包含多少个{letter}",
    "{word}에는 {letter}가 몇 개 있어요",
    "{word}에 들어 있는 {letter}의 개수를 세어 주세요",
    "{word}에서 {letter}는 몇 번 나와요",
    "Combien de {letter} y a-t-il dans {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}",
    "Compte le nombre de {letter} dans {word}",
    "Wie viele {letter} hat das Wort {word}",
    "Wie oft steht {letter} in {word}",
    "Zähle, wie oft {letter} in {word} vorkommt",
    "{word}という単語に{letter}はいくつありますか",
    "{word}の中の{letter}の数を数えてください",
    "{word}には{letter}が何回出てきますか",
]


def _looks_like_words(path):
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("ascii", errors="replace").split()
    if not head or not all(w.isalpha() for w in head[:-1]):  # the last one may be cut mid-line
        raise BadFile("not a word list (one alphabetic word per line)")


def load_words(path=None):
    """The word list: `path` or $JAXCHAT_WORD_LIST if given; else dwyl's words_alpha.txt (downloaded once into the
    base dir); else, offline, the english-words package's list. Logs which one is used."""
    path = path or os.environ.get("JAXCHAT_WORD_LIST")
    if path and not os.path.exists(path):
        raise TaskDataUnavailable(f"word list {path} not found (one word per line; given by word_list= or "
                                  f"JAXCHAT_WORD_LIST)")
    return _load_words(path or os.path.join(get_base_dir(), "words_alpha.txt"), bool(path))


@functools.lru_cache(maxsize=8)  # the mixtures build several spelling tasks: try the network once per process
def _load_words(path, given):
    if not given:
        try:
            download_file(WORD_LIST_URL, path, check=_looks_like_words, attempts=2, what="word list")
        except UserError as e:
            try:  # offline, the closest list to words_alpha: english-words' web2 (Webster's 2nd), lowercase alphabetic
                from english_words import get_english_words_set
            except ImportError:
                raise TaskDataUnavailable(f"{e}\nor: pip install english-words==2.0.2, or give a word list "
                                          f"with JAXCHAT_WORD_LIST=FILE") from None
            words = tuple(sorted(w for w in get_english_words_set(["web2"], alpha=True, lower=True) if w.isascii()))
            print(f"word list: {WORD_LIST_URL} is unavailable, using the english-words package's web2 list "
                  f"({len(words)} words); spelling examples differ from nanochat's")
            return words
    with open(path, encoding="utf-8") as f:
        words = tuple(w for w in (line.strip() for line in f) if w)
    if not words:
        raise UserError(f"word list {path} is empty")
    print(f"word list: {path} ({len(words)} words)")
    return words


class SpellingBee(SyntheticTask, FinalAnswerTask):
    """Count a letter in a word; `size` examples per split, each made from its own seed."""

    def __init__(self, size=1000, split="train", word_list=None, **kwargs):
        super().__init__(size, split, **kwargs)
        self.words = load_words(word_list)

    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        # mostly a letter of the word, sometimes any letter (so "0" is a possible answer)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        template = rng.choice(TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()  # people in a hurry skip the shift key
        letter_q, word_q = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = template.format(letter=f"{letter_q}{letter}{letter_q}", word=f"{word_q}{word}{word_q}")
        if rng.random() < 0.5:
            question += "?"
        count = word.count(letter)
        # "i:c" with no space: " a" and "a" are different tokens, and the spelled-out letters must be the latter
        steps, running = [], 0
        for i, char in enumerate(word, 1):
            running += char == letter
            steps.append(f"{i}:{char} hit! count={running}" if char == letter else f"{i}:{char}")
        manual = (f"We need to count the letter '{letter}' in the word '{word}'. Let me spell it out first:\n\n"
                  f"{word}:{','.join(word)}\n\nNow letter by letter, counting '{letter}':\n" + "\n".join(steps) +
                  f"\n\nCounting by hand gives {running}.")
        parts = [{"type": "text", "text": manual},
                 {"type": "text", "text": "\n\nLet me verify this with Python:\n\n"},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\n\nPython also says {count}.\n\nMy final answer is:\n\n#### {count}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}


class SimpleSpelling(SyntheticTask):
    """Spell a word as "word:w,o,r,d"."""
    eval_type = "generative"

    def __init__(self, size=1000, split="train", word_list=None, **kwargs):
        super().__init__(size, split, **kwargs)
        self.words = list(load_words(word_list))
        random.Random(42).shuffle(self.words)  # a different word order from SpellingBee's

    def get_example(self, index):
        word = self.rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

    def evaluate(self, conversation, assistant_response):
        return int(assistant_response.strip() == conversation["messages"][-1]["content"])

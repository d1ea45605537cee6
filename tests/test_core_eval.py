"""CORE: scoring rules on a scripted bigram model, few-shot and shuffle seeds, cropping, batched == one at a time on a
real GPT, the bundle (parsing, download from a local server, damage), base_eval end to end. Offline, toy data only."""
import dataclasses
import http.server
import io
import json
import math
import os
import random
import threading
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat import base_eval, core_eval
from jaxchat.checkpoint_manager import Checkpointer, checkpoint_dir
from jaxchat.common import UserError, get_base_dir
from jaxchat.model import GPT, GPTConfig
from jaxchat.tokenizer import RustBPETokenizer

from _harness import run_python
from test_model import randomize

V = 128
MC = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " "}
SCHEMA = {**MC, "task_type": "schema"}
LM = {**MC, "task_type": "language_modeling"}


@pytest.fixture(autouse=True)
def _no_user_bundle(monkeypatch):
    monkeypatch.delenv("JAXCHAT_EVAL_BUNDLE", raising=False)


class CharTokenizer:
    """One token per character (id = code point); BOS = 0."""

    def get_bos_token_id(self):
        return 0

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([] if prepend is None else [prepend]) + [ord(c) for c in text]


class Bigram(nnx.Module):
    """logits[t] = table[ids[t]], rows of log-probabilities: the loss of every next token is scripted."""

    def __init__(self, losses, sequence_len=64):
        """losses {(prev char, next char): nats}; unscripted next tokens share the rest of the probability, so an
        unscripted row is uniform (loss ln V, argmax = BOS = never right)."""
        table = np.full((V, V), -math.log(V))
        for a in {a for a, _ in losses}:
            scripted = {ord(b): loss for (x, b), loss in losses.items() if x == a}
            rest = (1 - sum(math.exp(-x) for x in scripted.values())) / (V - len(scripted))
            assert rest > 0, f"scripted losses after {a!r} leave no probability"
            table[ord(a)] = math.log(rest)
            for b, loss in scripted.items():
                table[ord(a), b] = -loss
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))
        self.config = GPTConfig(sequence_len=sequence_len, vocab_size=V)

    def __call__(self, ids):
        return self.table[...][ids]

    def token_losses(self, ids, targets):
        """Per token (cross-entropy, argmax), as GPT.token_losses returns them."""
        logits = self(ids)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return nll, jnp.argmax(logits, -1).astype(jnp.int32)


def correct(model, data, meta, **kw):
    return core_eval.example_correct(model, CharTokenizer(), data, meta, **kw).tolist()


# ---- scoring rules ---------------------------------------------------------------------------------------------

def test_multiple_choice_lowest_mean_not_sum():
    # "Q xy": ' '->x 2.0, x->y 0.1: mean 1.05, sum 2.1; "Q z": ' '->z 1.5: mean 1.5, sum 1.5. Mean picks "xy".
    model = Bigram({(" ", "x"): 2.0, ("x", "y"): 0.1, (" ", "z"): 1.5})
    data = [{"query": "Q", "choices": ["xy", "z"], "gold": 0}, {"query": "Q", "choices": ["z", "xy"], "gold": 0}]
    assert correct(model, data, MC) == [1.0, 0.0]
    assert core_eval.evaluate_task(model, CharTokenizer(), data, MC) == 0.5


def test_spans_prefix_and_suffix():
    assert core_eval.answer_spans([[0, 1, 2, 3], [0, 1, 5]], "multiple_choice") == [(2, 4), (2, 3)]
    assert core_eval.answer_spans([[0, 7, 8, 9], [0, 6, 6, 8, 9]], "schema") == [(2, 4), (3, 5)]
    assert core_eval.answer_spans([[0, 4], [0, 4, 5, 6]], "language_modeling") == [(2, 4)]
    with pytest.raises(ValueError, match="prefix"):
        core_eval.answer_spans([[0, 4, 9], [0, 4, 5, 6]], "language_modeling")


def test_schema_scores_the_common_suffix():
    # "A c" vs "B c": the span is " c" (the common suffix), so A->' ' (0.5 vs 3.0) decides; the contexts' own
    # tokens are not scored (BOS->B is cheaper than BOS->A, which would flip a whole-sequence score)
    model = Bigram({("A", " "): 0.5, ("B", " "): 3.0, ("\0", "A"): 9.0, ("\0", "B"): 0.01})
    data = [{"context_options": ["A", "B"], "continuation": "c", "gold": 0},
            {"context_options": ["A", "B"], "continuation": "c", "gold": 1}]
    assert correct(model, data, SCHEMA) == [1.0, 0.0]


def test_language_modeling_needs_every_token():
    # the stripped delimiter belongs to the span: "ab" | " cd" must be predicted as ' ', 'c', 'd'
    model = Bigram({("b", " "): 0.1, (" ", "c"): 0.1, ("c", "d"): 0.1})
    data = [{"context": "ab ", "continuation": "cd"}, {"context": "ab", "continuation": "ce"},
            {"context": "xb", "continuation": "cd"}, {"context": "ab", "continuation": "c"}]
    assert correct(model, data, LM) == [1.0, 0.0, 1.0, 1.0]
    assert correct(Bigram({(" ", "c"): 0.1, ("c", "d"): 0.1}), data[:1], LM) == [0.0]  # ' ' not predicted


def test_render_prompts():
    shot = {"query": "q1", "choices": ["a", "b"], "gold": 1}
    assert core_eval.render_prompts({"query": "q0", "choices": ["x", "y"]}, "multiple_choice", ": ", [shot, shot]) \
        == ["q1: b\n\nq1: b\n\nq0: x", "q1: b\n\nq1: b\n\nq0: y"]
    shot = {"context_options": ["c1", "c2"], "continuation": "k", "gold": 0}
    assert core_eval.render_prompts({"context_options": ["u", "v"], "continuation": "w"}, "schema", " ", [shot]) \
        == ["c1 k\n\nu w", "c1 k\n\nv w"]
    shot = {"context": " ctx \n", "continuation": "ans"}
    assert core_eval.render_prompts({"context": "Q? ", "continuation": "A"}, "language_modeling", "\nAnswer: ",
                                    [shot]) == ["ctx\nAnswer: ans\n\nQ?\nAnswer:", "ctx\nAnswer: ans\n\nQ?\nAnswer: A"]


def test_fewshot_selection_is_nanochats():
    for n, k in [(2, 1), (5, 3), (11, 10), (40, 10), (1000, 3), (30000, 10)]:
        for idx in {0, 1, n // 2, n - 1}:
            want = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
            got = core_eval.fewshot_indices(n, idx, k)
            assert got == want and idx not in got
    # and they are what precedes the item: 3 examples, 1 shot each
    data = [{"context": f"c{i}", "continuation": f"{i}"} for i in range(3)]
    rows = core_eval.prepare_task(CharTokenizer(), data, {**LM, "num_fewshot": 1}, 100)
    for idx, (tokens, _, _, owner) in enumerate(rows):
        j = core_eval.fewshot_indices(3, idx, 1)[0]
        assert owner == idx and "".join(map(chr, tokens[1:])) == f"c{j} {j}\n\nc{idx} {idx}"


def test_shuffle_1337_and_crop(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(50)) + "\n")
    order = list(range(50))
    random.Random(1337).shuffle(order)
    assert [d["i"] for d in core_eval.load_task_data(path, 10)] == order[:10]
    assert [d["i"] for d in core_eval.load_task_data(path, -1)] == order


def test_left_crop():
    assert core_eval.crop_left(list(range(10)), 7, 10, 4) == ([6, 7, 8, 9], 1, 4)
    assert core_eval.crop_left(list(range(10)), 5, 10, 4) == ([6, 7, 8, 9], 1, 4)  # no prediction for position 0
    assert core_eval.crop_left(list(range(5)), 2, 5, 8) == (list(range(5)), 2, 5)
    # an over-long prompt keeps its tail and is still scored right
    model = Bigram({("b", " "): 0.1, (" ", "c"): 0.1, ("c", "d"): 0.1}, sequence_len=8)
    data = [{"context": "z" * 30 + "ab", "continuation": "cd"}, {"context": "z" * 30 + "ab", "continuation": "ce"}]
    rows = core_eval.prepare_task(CharTokenizer(), data, LM, 8)
    assert [("".join(map(chr, t)), s, e) for t, s, e, _ in rows] == [("zzzab cd", 5, 8), ("zzzab ce", 5, 8)]
    assert correct(model, data, LM) == [1.0, 0.0]
    mc = Bigram({(" ", "x"): 0.5, (" ", "z"): 1.5}, sequence_len=6)
    assert correct(mc, [{"query": "long query " * 5 + "Q", "choices": ["x", "z"], "gold": 0}], MC) == [1.0]


@pytest.mark.slow
def test_batched_equals_one_at_a_time_on_a_gpt():
    config = GPTConfig(sequence_len=48, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = randomize(GPT(config, rngs=nnx.Rngs(0)), seed=1, scale=0.5)
    rng = random.Random(0)
    word = lambda: "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 9)))
    tasks = [({**MC, "num_fewshot": 2}, [{"query": word() * 3, "choices": [word() for _ in range(rng.randint(2, 4))],
                                          "gold": rng.randint(0, 1)} for _ in range(12)]),
             (SCHEMA, [{"context_options": [word(), word()], "continuation": word(), "gold": rng.randint(0, 1)}
                       for _ in range(9)]),
             ({**LM, "num_fewshot": 1}, [{"context": word(), "continuation": word()} for _ in range(10)])]
    tok = CharTokenizer()
    for meta, data in tasks:
        rows = core_eval.prepare_task(tok, data, meta, config.sequence_len)
        if meta["task_type"] == "language_modeling":  # make half the continuations the model's greedy ones
            rows = [greedy_span(model, r) if i % 2 else r for i, r in enumerate(rows)]
        ref_loss, ref_exact = [], []
        for tokens, s, e, _ in rows:  # one sequence per forward (padded with junk: causal, so it cannot matter)
            logits = alone(model, tokens)
            ref_loss.append(nll_of(logits, tokens)[s - 1:e - 1].mean())
            ref_exact.append(bool(np.all(logits.argmax(-1)[s - 1:e - 1] == tokens[s:e])))
        for batch_tokens in (64, 4096):  # many small batches / one big one
            loss, exact = core_eval.score_rows(model, rows, 0, config.sequence_len, batch_tokens)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
            assert exact.tolist() == ref_exact
        if meta["task_type"] == "language_modeling":
            assert 0 < sum(ref_exact) < len(rows)
        else:
            assert meta is SCHEMA or any(len(r[0]) == config.sequence_len for r in rows)  # cropped prompts too


def greedy_span(model, row):
    """The row with its span replaced by the model's greedy continuation."""
    tokens, s, e, owner = row
    tokens = tokens.copy()
    for t in range(s, e):
        tokens[t] = alone(model, tokens[:t])[-1].argmax()
    return tokens, s, e, owner


def alone(model, tokens, length=48):
    """Logits (len, V) of one sequence, padded to one shape (one compile) with a token that is not BOS."""
    padded = np.full((1, length), 7, np.int32)
    padded[0, :len(tokens)] = tokens
    return np.asarray(_logits(model, jnp.asarray(padded)))[0, :len(tokens)]


@nnx.jit
def _logits(model, ids):
    return model(ids)


def nll_of(logits, tokens):
    logits = logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return lse[:-1] - logits[np.arange(len(tokens) - 1), tokens[1:]]


def test_plan_batches_shapes():
    assert [core_eval.bucket_len(n, 2048) for n in (1, 17, 200, 257, 384, 385, 520, 769, 1500, 3000)] == [
        16, 32, 256, 384, 384, 512, 768, 1024, 1536, 2048]
    lengths = [3, 200, 17, 16, 64, 65, 40, 300, 1000] * 5
    plan = core_eval.plan_batches(lengths, 512, shards=2, batch_tokens=256)
    assert sorted(i for _, _, m in plan for i in m) == list(range(len(lengths)))
    for rows, bucket, members in plan:
        assert rows % 2 == 0 and len(members) <= rows and rows * bucket <= 2 * max(256, bucket)
        assert bucket in (16, 32, 64, 128, 256, 384, 512) and all(min(lengths[i], 512) <= bucket for i in members)


# ---- the bundle ------------------------------------------------------------------------------------------------

CORE_YAML = """# a comment, as in the real file
icl_tasks:
- label: mc_task
  dataset_uri: cat_a/mc.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
  continuation_delimiter: " "
- label: schema_task
  dataset_uri: cat_b/schema.jsonl
  num_fewshot: [0]
  icl_task_type: schema
- label: lm_task
  dataset_uri: cat_b/lm.jsonl
  num_fewshot: [1]
  icl_task_type: language_modeling
  continuation_delimiter: "\\nAnswer: "
  has_categories: true
"""
META_CSV = ("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
            'mc_task,x,multiple choice,0,2,25,,"MC, a description with a comma"\n'
            "schema_task,x,schema,0,2,50,,d\nlm_task,x,language modeling,1,2,0,,d\nunused,x,x,0,1,10,,d\n")
TASK_DATA = {
    "cat_a/mc.jsonl": [{"query": "Q", "choices": ["xy", "z"], "gold": 0}] * 3 + [
        {"query": "Q", "choices": ["z", "xy"], "gold": 0}],
    "cat_b/schema.jsonl": [{"context_options": ["A", "B"], "continuation": "c", "gold": g} for g in (0, 1)],
    "cat_b/lm.jsonl": [{"context": "ab", "continuation": "cd"}] * 2,
}


def make_bundle(root):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write(CORE_YAML)
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write(META_CSV)
    for uri, rows in TASK_DATA.items():
        path = os.path.join(root, "eval_data", uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(root)


def test_bundle_parsing(tmp_path):
    tasks, baselines = core_eval.load_bundle(make_bundle(tmp_path / "b"))
    assert [(t["label"], t["task_type"], t["num_fewshot"], t["continuation_delimiter"]) for t in tasks] == [
        ("mc_task", "multiple_choice", 0, " "), ("schema_task", "schema", 0, " "),
        ("lm_task", "language_modeling", 1, "\nAnswer: ")]
    assert tasks[2]["path"] == str(tmp_path / "b" / "eval_data" / "cat_b" / "lm.jsonl")
    assert baselines == {"mc_task": 25.0, "schema_task": 50.0, "lm_task": 0.0, "unused": 10.0}
    os.remove(tmp_path / "b" / "eval_data" / "cat_b" / "lm.jsonl")
    with pytest.raises(UserError, match="incomplete: missing .*lm.jsonl"):
        core_eval.load_bundle(str(tmp_path / "b"))
    (tmp_path / "b" / "eval_meta_data.csv").write_text(META_CSV.replace("mc_task,x", "other,x"))
    with pytest.raises(UserError, match="no random baseline for mc_task"):
        core_eval.load_bundle(str(tmp_path / "b"))
    with pytest.raises(UserError, match="no CORE eval bundle at .*nowhere"):
        core_eval.get_eval_bundle(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_centered_core_and_csv(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    model = Bigram({(" ", "x"): 2.0, ("x", "y"): 0.1, (" ", "z"): 1.5, ("A", " "): 0.5, ("B", " "): 3.0,
                    (":", " "): 0.1, (" ", "c"): 0.5, ("c", "d"): 0.1})
    out = core_eval.evaluate_model(model, CharTokenizer(), bundle_dir=bundle)
    assert out["results"] == {"mc_task": 0.75, "schema_task": 0.5, "lm_task": 1.0}
    assert out["centered_results"] == pytest.approx({"mc_task": (0.75 - 0.25) / 0.75, "schema_task": 0.0,
                                                     "lm_task": 1.0})
    assert out["core_metric"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert core_eval.evaluate_model(model, CharTokenizer(), 1, bundle)["results"]["schema_task"] in (0.0, 1.0)
    lines = open(core_eval.write_csv(str(tmp_path / "o" / "m_000001.csv"), out)).read().splitlines()
    rows = [[c.strip() for c in line.split(",")] for line in lines]
    assert rows[0] == ["Task", "Accuracy", "Centered"] and rows[1] == ["mc_task", "0.750000", "0.666667"]
    assert rows[-1] == ["CORE", "", f"{out['core_metric']:.6f}"] and len(rows) == 5


class ZipServer:
    """Serves `self.body` at any path from 127.0.0.1; counts the requests."""

    def __init__(self):
        self.body, self.hits, server = b"", 0, self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"


@pytest.fixture
def server():
    s = ZipServer()
    yield s
    s.httpd.shutdown()


def zip_of(directory, prefix="eval_bundle/"):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for root, _, files in os.walk(directory):
            for name in files:
                path = os.path.join(root, name)
                z.write(path, prefix + os.path.relpath(path, directory))
    return buf.getvalue()


def test_bundle_download(tmp_path, server):
    server.body = zip_of(make_bundle(tmp_path / "src"))
    with pytest.raises(core_eval.BundleMissing, match="downloading is off"):
        core_eval.get_eval_bundle(download=False, url=server.url)
    assert server.hits == 0
    path = core_eval.get_eval_bundle(url=server.url, backoff=0)
    assert path == os.path.join(get_base_dir(), "eval_bundle") and server.hits == 1
    assert len(core_eval.load_bundle(path)[0]) == 3
    assert core_eval.get_eval_bundle(url=server.url) == path and server.hits == 1  # no second download
    base = get_base_dir()  # no temporary directory left behind
    assert not [n for n in os.listdir(base) if n.startswith(".eval_bundle.") and os.path.isdir(os.path.join(base, n))]


def test_corrupt_bundle_download(tmp_path, server):
    good = zip_of(make_bundle(tmp_path / "src"))
    server.body = good[:len(good) // 2] + bytes(len(good) - len(good) // 2)
    with pytest.raises(UserError, match="could not download the CORE eval bundle.*corrupt"):
        core_eval.get_eval_bundle(url=server.url, attempts=2, backoff=0)
    assert not os.path.exists(os.path.join(get_base_dir(), "eval_bundle"))
    server.body = zip_of(tmp_path / "src" / "eval_data")  # a valid zip without core.yaml
    with pytest.raises(UserError, match="no core.yaml"):
        core_eval.get_eval_bundle(url=server.url, attempts=1, backoff=0)
    os.makedirs(os.path.join(get_base_dir(), "eval_bundle"))  # a leftover directory is not silently used
    with pytest.raises(UserError, match="holds no core.yaml"):
        core_eval.get_eval_bundle(url=server.url)


# ---- base_eval -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_base_eval_core_end_to_end(tmp_path, capsys):
    text = " ".join(f"Q xy z A B c ab cd {i} the cat sat on the mat" for i in range(300))
    tok = RustBPETokenizer.train_from_iterator([text], 300)
    tok.save(os.path.join(get_base_dir(), "tokenizer"))
    config = GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = randomize(GPT(config, rngs=nnx.Rngs(0)), seed=2)
    ckpt = Checkpointer(checkpoint_dir("base", "toy"))
    ckpt.save(5, nnx.state(model), {"dummy": jnp.zeros(())}, {"model_config": dataclasses.asdict(config)}, tok)
    ckpt.close()
    bundle = make_bundle(tmp_path / "b")
    res = base_eval.main(["--eval=core", "--max-per-task=3", f"--eval-bundle={bundle}", "--model-tag=toy"])
    core = res["core"]
    assert set(core["results"]) == {"mc_task", "schema_task", "lm_task"}
    assert core["core_metric"] == pytest.approx(sum(core["centered_results"].values()) / 3)
    csv_path = os.path.join(get_base_dir(), "base_eval", "toy_000005.csv")
    assert open(csv_path).read().splitlines()[-1].startswith("CORE")
    assert json.load(open(csv_path[:-4] + ".json"))["core"] == core
    assert "CORE metric" in capsys.readouterr().out
    # no bundle and downloads off: one line, and the other evals go on
    res = base_eval.main(["--eval=core", "--download-bundle=0", "--model-tag=toy"])
    assert "core" not in res and "CORE skipped: no eval bundle" in capsys.readouterr().out
    with pytest.raises(UserError, match="no CORE eval bundle"):
        base_eval.main(["--eval=core", f"--eval-bundle={tmp_path / 'missing'}", "--model-tag=toy"])


MESH_CHECK = """
import jax, numpy as np
from flax import nnx
from jaxchat import core_eval, sharding
from jaxchat.model import GPT, GPTConfig
from test_core_eval import CharTokenizer, MC, LM
from test_model import randomize
config = GPTConfig(sequence_len=48, vocab_size=128, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
make = lambda: randomize(GPT(config, rngs=nnx.Rngs(0)), seed=3, scale=0.5)
mesh = sharding.make_mesh((2, 2))
with jax.set_mesh(mesh):
    sharded = sharding.create_sharded(make)
plain = make()
data = [{"query": "q" * i, "choices": ["ab", "c", "dd"], "gold": i % 3} for i in range(1, 12)]
rows = core_eval.prepare_task(CharTokenizer(), data, MC, 48)
with jax.set_mesh(mesh):
    assert sharding.batch_shards() == 4
    got = core_eval.score_rows(sharded, rows, 0, 48, 32)[0]
want = core_eval.score_rows(plain, rows, 0, 48, 32)[0]
np.testing.assert_allclose(got, want, rtol=1e-4)
lm = [{"context": "x" * i, "continuation": "yz"} for i in range(9)]
for d, m in ((data, MC), (lm, LM)):
    with jax.set_mesh(mesh):
        a = core_eval.example_correct(sharded, CharTokenizer(), d, m)
    assert a.tolist() == core_eval.example_correct(plain, CharTokenizer(), d, m).tolist()
print("ok")
"""


@pytest.mark.slow
def test_sharded_batches_on_four_devices():
    out = run_python(["-c", MESH_CHECK], devices=4, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

"""Importing nanochat's own checkpoint files without torch: a model file written by torch.save (fixture) whose
logits transformers' NanoChat computed are the reference; the tokenizer pickle; refusals of code and of newer
architectures (newer nanochat's extra tensors are refused as transformers' extra tensors are: test_hf)."""
import io
import json
import os
import pickle
import re
import shutil
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxchat.hf import convert, nanochat_checkpoint
from jaxchat.hf.__main__ import main as hf_main
from jaxchat.checkpoint_manager import load_model
from jaxchat.common import UserError, get_base_dir
from jaxchat.distributed import run_main
from jaxchat.tokenizer import RustBPETokenizer
from _hub import hub  # noqa: F401 (a fixture)
from test_hf import training_text

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "nanochat_d1")
IDS = [321, 5, 17, 100, 250, 300, 42, 7, 99, 1]  # as tests/fixtures/make_nanochat_fixture.py


@pytest.fixture
def tokenizer():
    return RustBPETokenizer.train_from_iterator([training_text()], 330)


def nanochat_dir(path, tokenizer, tokenizer_dir=None):
    """The fixture's model and meta in `path`, and tokenizer.pkl pickled as nanochat pickles it (a tiktoken
    Encoding) in `tokenizer_dir` (default: beside them)."""
    shutil.copytree(FIXTURE, path, ignore=shutil.ignore_patterns("*.npy"))
    os.makedirs(tokenizer_dir or path, exist_ok=True)
    with open(os.path.join(tokenizer_dir or path, "tokenizer.pkl"), "wb") as f:
        pickle.dump(tokenizer.enc, f)
    return str(path)


@pytest.mark.slow
def test_import_matches_transformers_logits(tokenizer, tmp_path):
    directory = nanochat_dir(tmp_path / "d1", tokenizer)
    hf_main(["import", directory, "-g", "d1", "-i", "sft"])
    model, tok, meta = load_model("sft", "d1")
    assert tok.fingerprint() == tokenizer.fingerprint() and tok.get_bos_token_id() == IDS[0]
    assert (model.config.n_layer, model.config.n_head, model.config.n_kv_head, model.config.n_embd) == (1, 2, 1, 32)
    logits = np.asarray(model(jnp.array([IDS]))[0])
    reference = np.load(os.path.join(FIXTURE, "transformers_logits.npy"))
    assert np.abs(reference).max() > 1  # logits that vary: a real comparison
    np.testing.assert_allclose(logits, reference, atol=2e-5, rtol=0)
    state = nanochat_checkpoint.load_state_dict(os.path.join(directory, "model_000005.pt"))
    assert state["transformer.wte.weight"].dtype == ml_dtypes.bfloat16  # stored as nanochat stores it on GPU
    np.testing.assert_array_equal(np.asarray(model.wte[...]), state["transformer.wte.weight"].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(model.h[0].mlp.c_fc.kernel[...]), state["transformer.h.0.mlp.c_fc.weight"].T)


def test_nanochat_base_dir_layout_and_steps(tokenizer, tmp_path):
    """In nanochat's own base dir the tokenizer is <base>/tokenizer/; the last step is the default, -s picks one."""
    base = tmp_path / "nanochat"
    directory = nanochat_dir(base / "chatsft_checkpoints" / "d1", tokenizer, base / "tokenizer")
    for name in ("model", "meta"):  # an older step 2 beside step 5
        ext = "pt" if name == "model" else "json"
        shutil.copy(os.path.join(directory, f"{name}_000005.{ext}"), os.path.join(directory, f"{name}_000002.{ext}"))
    config, _, _, where = nanochat_checkpoint.read(directory)
    assert where.endswith("model_000005.pt") and config["hidden_size"] == 32
    assert nanochat_checkpoint.read(directory, step=2)[3].endswith("model_000002.pt")
    with pytest.raises(UserError, match=r"no nanochat checkpoint at step 3 .*steps with both: \[2, 5\]"):
        nanochat_checkpoint.read(directory, step=3)


class Exploit:
    def __reduce__(self):
        return os.system, ("touch exploited",)


@pytest.mark.parametrize("damage, message", [
    ("tokenizer_code", r"refusing to load (posix|os)\.system"),
    ("model_code", r"refusing to load (posix|os)\.system"),
    ("truncated", "cannot read .*model_000005.pt as a nanochat model file"),
    ("windows", r"newer nanochat architecture than jaxchat's \({'window_pattern': 'SSSL'}\)"),
    ("no_tokenizer", "no tokenizer.pkl for"),
])
def test_bad_nanochat_files_are_one_clear_error(tokenizer, tmp_path, monkeypatch, damage, message):
    monkeypatch.chdir(tmp_path)
    directory = nanochat_dir(tmp_path / "d1", tokenizer)
    model_path = os.path.join(directory, "model_000005.pt")
    if damage == "tokenizer_code":
        with open(os.path.join(directory, "tokenizer.pkl"), "wb") as f:
            pickle.dump(Exploit(), f)
    elif damage == "model_code":  # data.pkl inside the torch zip asks for a function
        with zipfile.ZipFile(model_path) as z:
            members = {n: z.read(n) for n in z.namelist()}
        pkl = next(n for n in members if n.endswith("/data.pkl"))
        members[pkl] = pickle.dumps({"transformer.wte.weight": Exploit()}, protocol=2)
        with zipfile.ZipFile(model_path, "w") as z:
            for n, b in members.items():
                z.writestr(n, b)
    elif damage == "truncated":
        with open(model_path, "r+b") as f:
            f.truncate(50_000)
    elif damage == "windows":
        meta_path = os.path.join(directory, "meta_000005.json")
        meta = json.load(open(meta_path))
        meta["model_config"]["window_pattern"] = "SSSL"
        json.dump(meta, open(meta_path, "w"))
    elif damage == "no_tokenizer":
        os.remove(os.path.join(directory, "tokenizer.pkl"))
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: hf_main(["import", directory, "-g", "bad"]))
    err = str(e.value.code)
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not os.path.exists("exploited")


@pytest.mark.slow
def test_import_from_the_hub_as_nanochat_files(tokenizer, tmp_path, hub):
    directory = nanochat_dir(tmp_path / "d1", tokenizer)
    files = {name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)}
    files |= {"token_bytes.pt": b"not fetched", "README.md": b"# d1"}
    commit = hub.add("karpathy/nanochat-d1", files)
    hf_main(["import", "--repo", "karpathy/nanochat-d1", "-g", "d1"])
    model, _, meta = load_model("sft", "d1")
    assert meta["imported_from"] == f"karpathy/nanochat-d1@{commit}"
    fetched = sorted(p.rsplit("/", 1)[1] for p in hub.requests("resolve") if p.startswith("/karpathy"))
    assert sorted(set(fetched)) == ["meta_000005.json", "model_000005.pt", "tokenizer.pkl"]  # not token_bytes.pt
    reference = np.load(os.path.join(FIXTURE, "transformers_logits.npy"))
    np.testing.assert_allclose(np.asarray(model(jnp.array([IDS]))[0]), reference, atol=2e-5, rtol=0)


def write_pt(path, records, monkeypatch):
    """A torch zip file of tensor records {name: (float32 storage values, offset, size, stride)}, pickled with the
    same globals torch uses (a stand-in `torch` module for the dump only): crafted records, good and bad. Values
    given as the name of an earlier record use that tensor as the storage (what a crafted file could try)."""
    import collections
    import sys
    import types
    fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled here")

    class FloatStorage:
        pass

    _rebuild_tensor_v2.__module__, FloatStorage.__module__ = "torch._utils", "torch"
    _rebuild_tensor_v2.__qualname__, FloatStorage.__qualname__ = "_rebuild_tensor_v2", "FloatStorage"
    fake_utils._rebuild_tensor_v2, fake_torch.FloatStorage = _rebuild_tensor_v2, FloatStorage

    class Record:
        def __init__(self, key, n, offset, size, stride):
            self.storage, self.args = ("storage", FloatStorage, key, "cpu", n), (offset, size, stride)

        def __reduce__(self):
            return _rebuild_tensor_v2, (self.storage, *self.args, False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj if isinstance(obj, tuple) and obj[:1] == ("storage",) else None

    state = collections.OrderedDict()
    for i, (name, (values, *rest)) in enumerate(records.items()):
        state[name] = Record(str(i), len(values), *rest)
        if isinstance(values, str):
            state[name].storage = state[values]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", fake_torch)
        m.setitem(sys.modules, "torch._utils", fake_utils)
        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        z.writestr("archive/byteorder", "little")
        for i, (values, *_) in enumerate(records.values()):
            if not isinstance(values, str):
                z.writestr(f"archive/data/{i}", np.asarray(values, np.float32).tobytes())


def test_tensor_records_are_bounded_by_their_storage(tmp_path, monkeypatch):
    path = str(tmp_path / "m.pt")
    values = list(range(12))
    write_pt(path, {"a": (values, 0, (3, 4), (4, 1)), "t": (values, 2, (2, 3), (1, 4))}, monkeypatch)
    state = nanochat_checkpoint.load_state_dict(path)
    np.testing.assert_array_equal(state["a"], np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(state["t"], [[2, 6, 10], [3, 7, 11]])  # element [i, j] = storage[2 + i + 4j]
    for offset, size, stride in [(-2, (2,), (1,)), (0, (13,), (1,)), (0, (2,), (10 ** 12,)), (0, (10 ** 12,), (0,)),
                                 (11, (2,), (1,)), (0, (2, 2), (1,)), ("0", (2,), (1,)), (0, (1,), (2 ** 70,)),
                                 (0, (0, 2 ** 70), (1, 1))]:
        write_pt(path, {"bad": (values, offset, size, stride)}, monkeypatch)
        with pytest.raises(UserError, match="cannot read .* as a nanochat model file"):
            nanochat_checkpoint.load_state_dict(path)
    # a rebuilt tensor used as the storage of the next: its rows would move the offset past the check's elements
    write_pt(path, {"a": (values, 0, (3, 4), (4, 1)), "b": ("a", 2, (6,), (1,))}, monkeypatch)
    with pytest.raises(UserError, match="malformed tensor record"):
        nanochat_checkpoint.load_state_dict(path)

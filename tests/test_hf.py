"""Hugging Face transformers import/export (no torch): round trips, the files' names and layouts as transformers'
NanoChat expects them, tokenizer.json and the chat template against jaxchat's ids, bad directories, the Hub path."""
import dataclasses
import json
import os
import random
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxchat.hf import convert, safetensors
from jaxchat.hf.__main__ import main as hf_main
from jaxchat.checkpoint_manager import Checkpointer, checkpoint_dir, load_model
from jaxchat.common import UserError, get_base_dir
from jaxchat.distributed import run_main
from jaxchat.hf.tokenizer import CHAT_TEMPLATE
from jaxchat.model import GPT, GPTConfig
from jaxchat.tokenizer import RustBPETokenizer, get_tokenizer
from _hub import hub, hub_environment  # noqa: F401 (a fixture)
from test_model import randomize

TEXTS = ["Hello world! 12345 + 678 = 13023", "  leading spaces\n\n\ttabs and   runs   \r\n", "東京は晴れ。😀🚀 café",
         "it's 1999's we'll", "x" * 50, "", " ", "\n"]
CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 * 7?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "},
                                      {"type": "python", "text": "12 * 7"},
                                      {"type": "python_output", "text": "84"},
                                      {"type": "text", "text": " It is 84."}]},
    {"role": "user", "content": "東京 😀 and 3 more?"},
    {"role": "assistant", "content": "Sure:  87.\n"}]}


def training_text():
    rng = random.Random(0)
    words = ["hello", "world", "the", "cat", "東京", "晴れ", "😀", "café", "naïve", "  ", "\n\n", "\t", "it's", " x",
             "Be", "brief", "What", "compute", "Sure"]
    return " ".join(rng.choice(words) + str(rng.randint(0, 999)) for _ in range(20000))


@pytest.fixture
def trained():
    """A tokenizer and a random GQA model saved as sft checkpoint 'small', step 3."""
    tok = RustBPETokenizer.train_from_iterator([training_text()], 330)
    config = GPTConfig(sequence_len=64, vocab_size=330, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = randomize(GPT(config, rngs=nnx.Rngs(0)), seed=3, scale=0.5)
    with Checkpointer(checkpoint_dir("sft", "small")) as ckpt:
        ckpt.save(3, nnx.state(model), None, {"model_config": dataclasses.asdict(config)}, tok)
    return model, tok


def exported(tmp_path, **kw):
    return convert.export("sft", "small", None, str(tmp_path / "out"), **kw)


@pytest.mark.slow
def test_export_import_round_trip(trained, tmp_path):
    model, tok = trained
    out = exported(tmp_path)
    convert.import_model(out, "back", "mid")
    back, back_tok, meta = load_model("mid", "back")
    assert meta["step"] == 0 and meta["imported_from"] == os.path.abspath(out)
    assert back.config == model.config
    ours, theirs = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(back))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, theirs)
    idx = jnp.array([tok.encode(TEXTS[0], prepend="<|bos|>")])
    np.testing.assert_array_equal(np.asarray(model(idx)), np.asarray(back(idx)))
    assert back_tok.fingerprint() == tok.fingerprint()
    assert back_tok.encode(TEXTS) == tok.encode(TEXTS)
    assert back_tok.render_conversation(CONVERSATION) == tok.render_conversation(CONVERSATION)
    # the first model imported into a base dir also provides the default tokenizer
    assert get_tokenizer().fingerprint() == tok.fingerprint()


@pytest.mark.slow
def test_bfloat16_export_rounds_the_weights(trained, tmp_path):
    model, _ = trained
    out = exported(tmp_path, dtype="bfloat16")
    tensors = safetensors.load_dir(out)
    assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    convert.import_model(out, "bf16", "sft")
    back, _, _ = load_model("sft", "bf16")
    want = np.asarray(model.h[0].attn.c_q.kernel[...]).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(back.h[0].attn.c_q.kernel[...]), want)


def test_files_are_what_transformers_nanochat_reads(trained, tmp_path):
    model, tok = trained
    out = exported(tmp_path)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    config = json.load(open(os.path.join(out, "config.json")))
    c = model.config
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"], config["max_position_embeddings"]) == \
        (330, 64, 256, 2, 4, 2, 64)
    assert config["hidden_act"] == "relu2" and config["final_logit_softcapping"] == 15.0
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert config["rms_norm_eps"] == float(np.finfo(np.float32).eps) and not config["tie_word_embeddings"]
    assert config["bos_token_id"] == tok.get_bos_token_id() == config["pad_token_id"]
    assert config["eos_token_id"] == tok.encode_special("<|assistant_end|>")
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    assert generation["eos_token_id"] == [tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()]
    tensors, metadata = safetensors.load_file(os.path.join(out, "model.safetensors"))
    assert metadata == {"format": "pt"}
    # torch Linear weights are (out, in): NanoChatAttention / NanoChatMLP / NanoChatModel / lm_head
    hd = c.n_embd // c.n_head
    shapes = {"model.embed_tokens.weight": (330, 64), "lm_head.weight": (330, 64)}
    for i in range(2):
        shapes |= {f"model.layers.{i}.self_attn.q_proj.weight": (4 * hd, 64),
                   f"model.layers.{i}.self_attn.k_proj.weight": (2 * hd, 64),
                   f"model.layers.{i}.self_attn.v_proj.weight": (2 * hd, 64),
                   f"model.layers.{i}.self_attn.o_proj.weight": (64, 4 * hd),
                   f"model.layers.{i}.mlp.fc1.weight": (256, 64), f"model.layers.{i}.mlp.fc2.weight": (64, 256)}
    assert {name: t.shape for name, t in tensors.items()} == shapes
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.fc1.weight"], np.asarray(model.h[1].mlp.c_fc.kernel[...]).T)
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], np.asarray(model.wte[...]))


def test_tokenizer_json_encodes_like_jaxchat(trained, tmp_path):
    from tokenizers import Tokenizer
    _, tok = trained
    hf_tok = Tokenizer.from_file(os.path.join(exported(tmp_path), "tokenizer.json"))
    assert hf_tok.get_vocab_size() == tok.get_vocab_size()
    for text in TEXTS:
        ids = hf_tok.encode(text, add_special_tokens=False).ids
        assert ids == tok.encode(text), text
        assert hf_tok.decode(ids) == text
    # special tokens written in the text are the special ids there (jaxchat inserts them by id)
    ids = hf_tok.encode("<|bos|>hi<|assistant_end|>", add_special_tokens=False).ids
    assert ids == [tok.get_bos_token_id(), *tok.encode("hi"), tok.encode_special("<|assistant_end|>")]


def render(messages, add_generation_prompt):
    """The chat template as transformers' apply_chat_template runs it (sandboxed Jinja, trim/lstrip blocks)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_chat_template_renders_jaxchat_ids(trained, tmp_path):
    from tokenizers import Tokenizer
    _, tok = trained
    hf_tok = Tokenizer.from_file(os.path.join(exported(tmp_path), "tokenizer.json"))
    encode = lambda text: hf_tok.encode(text, add_special_tokens=False).ids
    messages = CONVERSATION["messages"]
    assert encode(render(messages, False)) == tok.render_conversation(CONVERSATION)[0]
    assert encode(render(messages[:-1], True)) == tok.render_for_completion(CONVERSATION)
    plain = {"messages": [{"role": "user", "content": "hi 5"}, {"role": "assistant", "content": "hello"}]}
    assert encode(render(plain["messages"][:1], True)) == tok.render_for_completion(plain)
    from jinja2 import TemplateError
    with pytest.raises(TemplateError, match="alternate"):
        render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True)
    with pytest.raises(TemplateError, match="followed by a user message"):  # as render_conversation refuses it
        render([{"role": "system", "content": "a"}], True)


def test_a_split_pattern_tiktoken_cannot_use_is_one_error(trained):
    """A pattern that can match the empty string builds an Encoding, then panics in Rust on first use."""
    _, tok = trained
    for pattern in ("a*|[^a]", "(?=a)", "([unclosed"):
        with pytest.raises(UserError, match="does not work with tiktoken"):
            RustBPETokenizer.from_ranks(tok.enc._mergeable_ranks, pattern, "t.json")


def test_export_refuses_a_non_empty_directory(trained, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        exported(tmp_path)
    exported(tmp_path, overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_export_refuses_what_config_json_cannot_say(trained, tmp_path, monkeypatch):
    """A model field config.json does not carry (here: one that reads back otherwise) stops the export, nothing
    written."""
    read_back = convert.config_from_hf
    monkeypatch.setattr(convert, "config_from_hf", lambda h, where: (dataclasses.replace(read_back(h, where)[0], n_kv_head=4), []))
    with pytest.raises(UserError, match=r"cannot be expressed as a transformers NanoChat model: \{'n_kv_head': 2\}"):
        exported(tmp_path)
    assert not (tmp_path / "out").exists()


def edit_config(out, **changes):
    path = os.path.join(out, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def swap_special_ids(out):
    path = os.path.join(out, "tokenizer.json")
    spec = json.load(open(path))
    first, second = spec["added_tokens"][:2]
    first["id"], second["id"] = second["id"], first["id"]
    json.dump(spec, open(path, "w"))


def edit_tensors(out, change):
    path = os.path.join(out, "model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors.load_file(path)[0].items()}
    change(tensors)
    safetensors.save_file(tensors, path, {"format": "pt"})


@pytest.mark.parametrize("damage, message", [
    (lambda out: shutil.rmtree(out), "no directory"),
    (lambda out: os.remove(os.path.join(out, "config.json")), "neither a transformers model directory \\(no config.json\\)"),
    (lambda out: open(os.path.join(out, "config.json"), "w").write("{"), "damaged .*config.json"),
    (lambda out: edit_config(out, model_type="llama"), "model_type 'llama'"),
    (lambda out: edit_config(out, hidden_act="silu", attention_bias=True), r"activation 'silu' \(jaxchat: relu2\); attention biases"),
    (lambda out: edit_config(out, rope_parameters={"rope_type": "default", "rope_theta": 100000}), "RoPE default base 100000"),
    (lambda out: edit_config(out, intermediate_size=100), "intermediate_size 100"),
    (lambda out: edit_config(out, hidden_size=64.0), "damaged .*hidden_size must be a positive integer, not 64.0"),
    (lambda out: open(os.path.join(out, "config.json"), "w").write('{"model_type": "nanochat", "hidden_size": Infinity}'),
     "damaged .*hidden_size must be a positive integer, not inf"),
    (lambda out: edit_config(out, intermediate_size=None) or edit_config(out, rope_parameters=[1]), "damaged"),
    (lambda out: json.dump({k: v for k, v in json.load(open(os.path.join(out, "config.json"))).items()
                            if k != "intermediate_size"}, open(os.path.join(out, "config.json"), "w")),
     "intermediate_size 8192 ≠ 4·64"),  # absent: transformers' default
    (lambda out: edit_config(out, vocab_size=400), "the tokenizer has 330 tokens but the model a vocabulary of 400"),
    (lambda out: edit_tensors(out, lambda t: t.update({"model.value_embeds.0.weight": np.zeros((2, 2), np.float32)})),
     "unknown model.value_embeds.0.weight"),
    (lambda out: edit_tensors(out, lambda t: t.pop("model.layers.1.mlp.fc2.weight")), "missing model.layers.1.mlp.fc2"),
    (lambda out: edit_tensors(out, lambda t: t.update({"lm_head.weight": np.zeros((330, 32), np.float32)})),
     r"lm_head.weight has shape \[330, 32\], the config asks for \[330, 64\]"),
    (lambda out: open(os.path.join(out, "model.safetensors"), "r+b").truncate(1000), "damaged or foreign safetensors"),
    (lambda out: os.remove(os.path.join(out, "model.safetensors")), "no model.safetensors"),
    (lambda out: os.remove(os.path.join(out, "tokenizer.json")), "no tokenizer.json"),
    (lambda out: swap_special_ids(out), r"special tokens .* are not jaxchat's \(nanochat's\)"),
])
@pytest.mark.slow
def test_bad_directories_are_one_clear_error(trained, tmp_path, damage, message):
    out = exported(tmp_path)
    damage(out)
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: hf_main(["import", out, "-g", "bad"]))
    err = str(e.value.code)
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not os.path.exists(checkpoint_dir("sft", "bad"))  # nothing written


def test_import_keeps_existing_checkpoints_unless_overwrite(trained, tmp_path):
    out = exported(tmp_path)
    with pytest.raises(UserError, match=r"already holds checkpoints \(steps \[3\]\)"):
        convert.import_model(out, "small", "sft")
    convert.import_model(out, "small", "sft", overwrite=True)
    assert Checkpointer(checkpoint_dir("sft", "small"), create=False).all_steps() == [0]


@pytest.mark.parametrize("keep_head", [False, True])
def test_tied_head_and_other_eps_import(trained, tmp_path, capsys, keep_head):
    """A tied head is the embedding, as transformers reads it, whether or not the file also has lm_head.weight;
    an absent rms_norm_eps is transformers' default 1e-6."""
    model, _ = trained
    out = exported(tmp_path)
    edit_config(out, tie_word_embeddings=True)
    config = json.load(open(os.path.join(out, "config.json")))
    del config["rms_norm_eps"]
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    if not keep_head:
        edit_tensors(out, lambda t: t.pop("lm_head.weight"))
    convert.import_model(out, "tied", "sft")
    assert "rms_norm_eps 1e-06 computed as jaxchat's" in capsys.readouterr().out
    back, _, _ = load_model("sft", "tied")
    np.testing.assert_array_equal(np.asarray(back.lm_head.kernel[...]), np.asarray(model.wte[...]).T)


def test_an_imported_checkpoint_is_not_resumed(trained, tmp_path):
    import argparse
    from jaxchat.run import TrainingRun
    convert.import_model(exported(tmp_path), "imported", "mid")
    with pytest.raises(UserError, match="holds weights only, no run to resume; start a run from it with --source"):
        TrainingRun("mid", "imported", argparse.Namespace(resume=1, keep=2), {}, {}, optim=None, resume_keys=(),
                    fresh=None)


def test_sharded_weights_import(trained, tmp_path):
    model, _ = trained
    out = exported(tmp_path)
    tensors = {k: np.array(v) for k, v in safetensors.load_file(os.path.join(out, "model.safetensors"))[0].items()}
    os.remove(os.path.join(out, "model.safetensors"))
    names, weight_map = sorted(tensors), {}
    for part, chunk in enumerate((names[:5], names[5:])):
        file = f"model-{part + 1:05d}-of-00002.safetensors"
        safetensors.save_file({n: tensors[n] for n in chunk}, os.path.join(out, file), {"format": "pt"})
        weight_map |= {n: file for n in chunk}
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(out, safetensors.INDEX), "w"))
    convert.import_model(out, "sharded", "sft")
    back, _, _ = load_model("sft", "sharded")
    np.testing.assert_array_equal(np.asarray(back.h[1].attn.c_v.kernel[...]), np.asarray(model.h[1].attn.c_v.kernel[...]))


def test_safetensors_round_trip_and_damage(tmp_path):
    path = str(tmp_path / "t.safetensors")
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5, -2], ml_dtypes.bfloat16),
              "c": np.array([[1, 2]], np.int64), "d": np.zeros((0, 4), np.float16), "e": np.array(True)}
    safetensors.save_file(arrays, path, {"k": "v"})
    back, metadata = safetensors.load_file(path)
    assert metadata == {"k": "v"} and set(back) == set(arrays)
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape
        np.testing.assert_array_equal(back[name], a)
    assert (8 + int.from_bytes(open(path, "rb").read(8), "little")) % 8 == 0  # data 8-byte aligned
    with open(path, "r+b") as f:  # claim a header longer than the file
        f.write((10 ** 9).to_bytes(8, "little"))
    with pytest.raises(UserError, match="header length"):
        safetensors.load_file(path)


def test_safetensors_agrees_with_the_reference_implementation(tmp_path):
    """Files jaxchat writes (a transposed view, a cast on the way) read the same through the `safetensors` package,
    and the package's files read the same through jaxchat."""
    reference = pytest.importorskip("safetensors.numpy")
    kernel = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    arrays = {"t": kernel.T, "b": np.array([1.5, -2, 3e38], np.float32), "i": np.array([[1, 2]], np.int64)}
    for dtype in (None, ml_dtypes.bfloat16):
        ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
        safetensors.save_file(arrays, ours, {"format": "pt"}, dtype)
        expected = {n: np.asarray(a, dtype or a.dtype) for n, a in arrays.items()}
        for name, back in reference.load_file(ours).items():
            assert back.dtype == expected[name].dtype
            np.testing.assert_array_equal(back, expected[name])
        reference.save_file({n: np.ascontiguousarray(a) for n, a in expected.items()}, theirs, {"format": "pt"})
        back, metadata = safetensors.load_file(theirs)
        assert metadata == {"format": "pt"} and set(back) == set(expected)
        for name, a in expected.items():
            assert back[name].dtype == a.dtype
            np.testing.assert_array_equal(back[name], a)


# ---- the Hub, served locally --------------------------------------------------------------------------------------
REPO = "someone/nanochat-small"


@pytest.fixture
def published(trained, tmp_path, hub):
    """The exported small model on the local Hub as REPO's main and refs/pr/1: (its files, the commit)."""
    out = exported(tmp_path)
    files = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    files["pytorch_model.bin"] = b"not fetched"
    commit = hub.add(REPO, files)
    hub.add(REPO, files, revision="refs/pr/1", commit=commit)
    return files, commit


def test_import_from_the_hub(hub, published, trained, capsys):
    model, _ = trained
    files, commit = published
    with hub_environment(HF_TOKEN="secret"):
        hf_main(["import", "--repo", REPO, "--revision", "refs/pr/1", "-g", "hub"])
    back, _, meta = load_model("sft", "hub")
    assert meta["imported_from"] == f"{REPO}@{commit}"
    np.testing.assert_array_equal(np.asarray(back.wte[...]), np.asarray(model.wte[...]))
    assert hub.requests("revision")[0] == f"/api/models/{REPO}/revision/refs/pr/1"
    fetched = sorted({p.rsplit("/", 1)[1] for p in hub.requests("resolve")})
    assert fetched == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json"]  # not pytorch_model.bin, not README.md
    assert all(auth == "Bearer secret" for _, path, auth in hub.log if REPO in path)
    assert f"downloading model.safetensors of {REPO}@{commit}" in capsys.readouterr().out
    snapshot = os.path.join(os.environ["HF_HOME"], "hub", "models--someone--nanochat-small", "snapshots", commit)
    assert os.path.realpath(os.path.join(snapshot, "model.safetensors")).startswith(os.environ["HF_HOME"])

    hub.log.clear()  # again: the cache has every file, only the branch is asked for, with no token when none is set
    hf_main(["import", "--repo", REPO, "-g", "again"])
    assert [(method, path) for method, path, _ in hub.log if REPO in path] == \
        [("GET", f"/api/models/{REPO}/revision/main")]
    assert all(auth is None for _, _, auth in hub.log)
    hub.log.clear()
    with hub_environment(HF_HUB_OFFLINE="1"):  # offline: the cache alone, no request
        hf_main(["import", "--repo", REPO, "-g", "offline"])
        np.testing.assert_array_equal(np.asarray(load_model("sft", "offline")[0].wte[...]), np.asarray(model.wte[...]))
        with pytest.raises(SystemExit) as e:
            run_main(lambda argv: hf_main(["import", "--repo", "someone/elsewhere", "-g", "x"]))
    err = str(e.value.code)
    assert len(err.splitlines()) == 1 and "someone/elsewhere" in err and "HF_HUB_OFFLINE" in err, err
    assert hub.log == []


def test_import_uses_what_the_cache_already_has(hub, published, trained):
    """A model another Hub tool downloaded (its files in the shared cache) is not downloaded again."""
    from huggingface_hub import snapshot_download
    files, commit = published
    snapshot_download(REPO)  # what transformers' from_pretrained would have fetched, and more
    hub.log.clear()
    hf_main(["import", "--repo", REPO, "-g", "hub"])
    assert hub.requests("resolve") == [] and load_model("sft", "hub")[2]["imported_from"] == f"{REPO}@{commit}"


def test_hub_bad_names_and_unknown_repos(hub, published):
    with pytest.raises(UserError, match="expected owner/name"):
        hf_main(["import", "--repo", "../../etc", "-g", "hub"])
    with pytest.raises(UserError, match="someone/other at 'main': not found on http.*hf auth login.*HF_TOKEN"):
        hf_main(["import", "--repo", "someone/other", "-g", "hub"])
    with pytest.raises(UserError, match="no such revision"):
        hf_main(["import", "--repo", REPO, "--revision", "v9", "-g", "hub"])


def test_hub_repo_without_safetensors(hub, published):
    files, _ = published
    hub.add(REPO, {n: d for n, d in files.items() if not n.endswith(".safetensors")}, revision="nosafetensors")
    with pytest.raises(UserError, match="holds neither safetensors weights nor nanochat's model_<step>.pt.*pytorch_model.bin"):
        hf_main(["import", "--repo", REPO, "--revision", "nosafetensors", "-g", "hub"])

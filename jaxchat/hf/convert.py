"""jaxchat checkpoints to and from Hugging Face transformers' `nanochat` model type (NanoChatForCausalLM).

transformers' NanoChat computes jaxchat's function: embedding, parameter-free RMSNorm, pre-norm blocks with
rotate-half RoPE (the sign nanochat uses) then QK-norm, GQA, relu² MLP 4·d wide, a final norm, an untied head and a
15·tanh(x/15) softcap. Only names and layouts differ: torch's Linear weight is (out, in), a JAX kernel (in, out),
so every kernel is transposed; the embedding is (vocab, d) in both; the norms have no weights, so no tensors.
What the format cannot say (another activation, biases, rope scaling or base, softcap, a head_dim other than
d / heads, an MLP other than 4·d, tensors jaxchat has no place for, such as newer nanochat's value embeddings)
makes import refuse with one line; export checks that its config.json reads back as the same model.

Import also reads nanochat's own checkpoint files (model_<step>.pt, meta_<step>.json, tokenizer.pkl: how nanochat
saves and its authors publish; `nanochat_checkpoint`, no torch, no code run from the pickles). It writes a
checkpoint (step 0) with its tokenizer, like any stage's, so chat_cli, chat_eval, base_eval, chat_web and the
training stages (`--source`) use it unchanged. `download_model` gets either kind from the Hub into the Hugging Face
cache (`hub`).
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxchat.checkpoint_manager import Checkpointer, checkpoint_dir, load_model
from jaxchat.common import UserError, get_base_dir, write_atomic
from jaxchat.custom_grads import NORM_EPS
from jaxchat.hf import hub, nanochat_checkpoint, safetensors
from jaxchat.hf.tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, from_hf, save_hf_tokenizer
from jaxchat.model import EXECUTION_FIELDS, GPT, ROPE_BASE, SOFTCAP, GPTConfig

LAYER_TENSORS = {("attn", "c_q"): "self_attn.q_proj", ("attn", "c_k"): "self_attn.k_proj",
                 ("attn", "c_v"): "self_attn.v_proj", ("attn", "c_proj"): "self_attn.o_proj",
                 ("mlp", "c_fc"): "mlp.fc1", ("mlp", "c_proj"): "mlp.fc2"}
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
CONFIG, GENERATION_CONFIG = "config.json", "generation_config.json"


def tensor_names(n_layer):
    """(jaxchat parameter path, transformers tensor name, nanochat tensor name) of every weight; paths ending in
    "kernel" are stored transposed (both torch models keep Linear weights as (out, in))."""
    yield ("wte",), "model.embed_tokens.weight", "transformer.wte.weight"
    for i in range(n_layer):
        for path, name in LAYER_TENSORS.items():
            yield ("h", i, *path, "kernel"), f"model.layers.{i}.{name}.weight", f"transformer.h.{i}.{'.'.join(path)}.weight"
    yield ("lm_head", "kernel"), "lm_head.weight", "lm_head.weight"


# ---- config ---------------------------------------------------------------------------------------------------
def hf_config(config, tokenizer, dtype="float32"):
    """config.json of a GPTConfig (only its model fields matter)."""
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    return {"architectures": ["NanoChatForCausalLM"], "model_type": "nanochat", "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd, "intermediate_size": 4 * config.n_embd,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head, "max_position_embeddings": config.sequence_len,
            "hidden_act": "relu2", "rms_norm_eps": NORM_EPS, "final_logit_softcapping": SOFTCAP,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(ROPE_BASE)},
            "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False, "use_cache": True,
            "bos_token_id": bos, "eos_token_id": end, "pad_token_id": bos, "dtype": dtype}


def config_from_hf(hf, where):
    """(GPTConfig, notes) of a NanoChat config.json; one UserError naming what jaxchat's model cannot express.
    A key that is absent means what it means to transformers (its NanoChatConfig defaults)."""
    def refuse(why):
        return UserError(f"{where} describes a model jaxchat cannot load: {why}")

    def count(key, default=None):  # absent or null: the default (none: required)
        value = default if hf.get(key) is None else hf[key]
        assert type(value) is int and value > 0, f"{key} must be a positive integer, not {value!r}"
        return value

    if hf.get("model_type") != "nanochat":
        raise refuse(f"model_type {hf.get('model_type')!r}, not 'nanochat'")
    try:
        d, heads = count("hidden_size"), count("num_attention_heads")
        config = GPTConfig(sequence_len=count("max_position_embeddings", 2048), vocab_size=count("vocab_size"),
                           n_layer=count("num_hidden_layers"), n_head=heads,
                           n_kv_head=count("num_key_value_heads", heads), n_embd=d)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", ROPE_BASE))
        eps = hf.get("rms_norm_eps", 1e-6)
    except (KeyError, TypeError, ValueError, AssertionError, AttributeError) as e:
        raise UserError(f"damaged {where}: {type(e).__name__}: {e}") from None
    kv_heads = config.n_kv_head
    problems = [
        (hf.get("hidden_act", "relu2") != "relu2", f"activation {hf.get('hidden_act')!r} (jaxchat: relu2)"),
        (bool(hf.get("attention_bias") or hf.get("qkv_bias")), "attention biases"),
        (d % heads or heads % kv_heads, f"{d} wide with {heads} heads and {kv_heads} kv heads"),
        (hf.get("head_dim") not in (None, d // heads), f"head_dim {hf.get('head_dim')} ≠ hidden_size/heads"),
        (hf.get("intermediate_size", 8192) != 4 * d, f"intermediate_size {hf.get('intermediate_size', 8192)} ≠ 4·{d}"),
        (rope_type != "default" or rope_theta != ROPE_BASE, f"RoPE {rope_type} base {rope_theta} (jaxchat: default "
                                                            f"{ROPE_BASE})"),
        (hf.get("final_logit_softcapping", SOFTCAP) != SOFTCAP,
         f"final_logit_softcapping {hf.get('final_logit_softcapping')} (jaxchat: {SOFTCAP})"),
        (type(eps) not in (int, float) or not 0 <= eps <= 1e-5, f"rms_norm_eps {eps} (jaxchat: {NORM_EPS:.3g})"),
    ]
    if found := [why for bad, why in problems if bad]:
        raise refuse("; ".join(found))
    # an eps this small is nothing against mean(x²) ~ 1: computing it as jaxchat's changes no visible digit
    notes = [f"rms_norm_eps {eps:g} computed as jaxchat's {NORM_EPS:.3g}"] if eps != NORM_EPS else []
    return config, notes


def _model_fields(config):
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in EXECUTION_FIELDS}


# ---- export ---------------------------------------------------------------------------------------------------
def export(source, model_tag, step, out, dtype="float32", overwrite=False):
    """Write checkpoint `source`/`model_tag` (step: default the last) as a transformers model directory `out`."""
    model, tokenizer, meta = load_model(source, model_tag, step)
    config = model.config
    hf = hf_config(config, tokenizer, dtype)
    back, _ = config_from_hf(hf, CONFIG)
    if _model_fields(back) != _model_fields(config):  # a GPTConfig field config.json cannot carry: refuse
        differ = {k: v for k, v in _model_fields(config).items() if _model_fields(back)[k] != v}
        raise UserError(f"{source}/{meta['model_tag']} cannot be expressed as a transformers NanoChat model: {differ}")
    _prepare_out(out, overwrite)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {}  # views of the weights (host arrays: no copy on CPU), transposed and cast one at a time as written
    for path, name, _ in tensor_names(config.n_layer):
        w = np.asarray(jax.device_get(_get(params, path)))
        tensors[name] = w.T if path[-1] == "kernel" else w
    safetensors.save_file(tensors, os.path.join(out, safetensors.SINGLE), {"format": "pt"},  # transformers needs "pt"
                          EXPORT_DTYPES[dtype])
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    generation = {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": bos}  # stop where the engine stops
    for name, content in ((CONFIG, hf), (GENERATION_CONFIG, generation)):
        write_atomic(os.path.join(out, name), (json.dumps(content, indent=2) + "\n").encode())
    save_hf_tokenizer(tokenizer, out, config.sequence_len)
    write_atomic(os.path.join(out, "README.md"), _model_card(source, meta, config, model.num_params()).encode())
    print(f"exported {source}/{meta['model_tag']} step {meta['step']} ({model.num_params():,} parameters, {dtype}) "
          f"to {out}\nload it with transformers: AutoModelForCausalLM.from_pretrained({out!r}) and "
          f"AutoTokenizer.from_pretrained({out!r})")
    return out


def _prepare_out(out, overwrite):
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise UserError(f"{out} is not empty: choose another --out, or --overwrite=1 to write over its model")
        for name in os.listdir(out):  # an older export's weights would otherwise be mixed with these
            if name.endswith(".safetensors") or name == safetensors.INDEX:
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)


def _model_card(source, meta, config, n_params):
    return (f"---\nlibrary_name: transformers\ntags: [nanochat, jaxchat]\n---\n# {meta['model_tag']} ({source})\n\n"
            f"A nanochat-architecture model trained with jaxchat (JAX), exported from its `{source}` checkpoint "
            f"`{meta['model_tag']}` at step {meta['step']}: {n_params:,} parameters, {config.n_layer} layers, width "
            f"{config.n_embd}, {config.n_head} heads ({config.n_kv_head} key/value), vocabulary "
            f"{config.vocab_size}, context {config.sequence_len}.\n\n```python\nfrom transformers import "
            f"AutoModelForCausalLM, AutoTokenizer\ntokenizer = AutoTokenizer.from_pretrained(DIR)\nmodel = "
            f"AutoModelForCausalLM.from_pretrained(DIR)\nids = tokenizer.apply_chat_template([{{'role': 'user', "
            f"'content': 'Hello!'}}], add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
            f"print(tokenizer.decode(model.generate(**ids, max_new_tokens=64)[0]))\n```\n")


# ---- import ---------------------------------------------------------------------------------------------------
def read_model_dir(directory, step=None):
    """(config.json's dict, tensors, tokenizer, where, naming) of a transformers NanoChat directory (naming
    "transformers"), or of a directory of nanochat's own checkpoint files (model_<step>.pt, meta_<step>.json,
    tokenizer.pkl; `step`: default the last; naming "nanochat")."""
    if not os.path.isdir(directory):
        raise UserError(f"no directory {directory}")
    config_path = os.path.join(directory, CONFIG)
    if not os.path.exists(config_path) and nanochat_checkpoint.is_nanochat_dir(directory):
        return (*nanochat_checkpoint.read(directory, step), "nanochat")
    if step is not None:
        raise UserError(f"-s/--step picks among nanochat's checkpoint files; {directory} is a transformers directory")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf = json.load(f)
        assert isinstance(hf, dict), "not a JSON object"
    except FileNotFoundError:
        raise UserError(f"{directory} is neither a transformers model directory (no {CONFIG}) nor a nanochat "
                        f"checkpoint directory (no model_<step>.pt)") from None
    except (ValueError, AssertionError, RecursionError) as e:
        raise UserError(f"damaged {config_path}: {type(e).__name__}: {e}") from None
    return hf, safetensors.load_dir(directory), from_hf(directory), config_path, "transformers"


def import_model(directory, model_tag=None, source="sft", overwrite=False, origin=None, step=None):
    """Read a transformers NanoChat directory (or nanochat's own checkpoint files) into checkpoint
    `source`/`model_tag` (default d<layers>), step 0. Returns the checkpoint directory."""
    hf, tensors, tokenizer, where, naming = read_model_dir(directory, step)
    config, notes = config_from_hf(hf, where)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"{directory}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model a "
                        f"vocabulary of {config.vocab_size}")
    params = _params_from_tensors(tensors, naming, config, hf.get("tie_word_embeddings"), directory)
    del tensors  # unmaps the weight files before the checkpoint is written: less memory at the peak
    model_tag = model_tag or f"d{config.n_layer}"
    meta = {"model_config": dataclasses.asdict(config), "imported_from": origin or os.path.abspath(directory),
            "hf_config": hf, "weights_only": True}
    with Checkpointer(checkpoint_dir(source, model_tag)).lock() as ckpt:
        if steps := ckpt.all_steps():
            if not overwrite:
                raise UserError(f"{ckpt.directory} already holds checkpoints (steps {steps}): --overwrite=1 replaces "
                                f"them, -g NAME imports under another tag")
            ckpt.clear()
        ckpt.save(0, params, None, meta, tokenizer)
    base_tokenizer = os.path.join(get_base_dir(), "tokenizer")
    if not os.path.isdir(base_tokenizer):  # a first model in this base dir: its tokenizer becomes the default one
        tokenizer.save(base_tokenizer)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(f"imported {origin or directory} ({n_params:,} parameters) as {source}/{model_tag} step 0"
          + "".join(f"; note: {n}" for n in notes)
          + f"\nchat with it: python -m jaxchat.chat_cli -i {source} -g {model_tag}")
    return ckpt.directory


def _params_from_tensors(tensors, naming, config, tied, where):
    """jaxchat's parameters (a pure dict of fp32 arrays) from tensors named as `naming` ("transformers" or
    "nanochat") names them, every name and shape checked."""
    def some(names):
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    if len(tensors) + 1 < len(LAYER_TENSORS) * config.n_layer + 2:  # before building a model of that many layers to compare with
        raise UserError(f"{where}: its config says {config.n_layer} layers, but it holds only {len(tensors)} tensors")
    column = 1 if naming == "transformers" else 2
    names = {spellings[0]: spellings[column] for spellings in tensor_names(config.n_layer)}
    if tied:  # transformers uses the embedding as the head (a stored lm_head.weight is not read): copy it
        tensors = {**tensors, names["lm_head", "kernel"]: tensors.get(names["wte",])}
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))), nnx.Param))
    unknown = sorted(set(tensors) - set(names.values()))
    missing = sorted(n for n in names.values() if tensors.get(n) is None)
    if unknown or missing:
        raise UserError(f"{where} does not hold NanoChat's tensors for its config: "
                        + (f"missing {some(missing)}; " if missing else "")
                        + (f"unknown {some(unknown)} (a newer nanochat architecture, e.g. value embeddings, has no "
                           f"place in this model)" if unknown else ""))
    params = jax.tree.map(lambda _: None, abstract)
    for path, name in names.items():
        kernel, shape = path[-1] == "kernel", _get(abstract, path).shape
        if tensors[name].shape != (shape[::-1] if kernel else shape):
            raise UserError(f"{where}: tensor {name} has shape {list(tensors[name].shape)}, the config asks for "
                            f"{list(shape[::-1] if kernel else shape)}")
        _set(params, path, jnp.asarray(tensors[name].T if kernel else tensors[name], jnp.float32))
    return params


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    _get(tree, path[:-1])[path[-1]] = value


# ---- the Hub ----------------------------------------------------------------------------------------------------
HUB_SMALL_FILES = [CONFIG, GENERATION_CONFIG, TOKENIZER_JSON, TOKENIZER_CONFIG, safetensors.INDEX, "tokenizer.pkl",
                   "meta_*.json"]


def download_model(repo, revision="main", step=None):
    """A model repository at `revision` in the Hugging Face cache: its transformers files (config, tokenizer,
    safetensors), or else its nanochat checkpoint files (`step`: default the last). Returns (the snapshot
    directory, "repo@commit"). The small files come first; they and the cached file list say which weights to get."""
    hub.check_repo_name(repo)
    directory = hub.snapshot(repo, revision, HUB_SMALL_FILES)
    commit = os.path.basename(directory)
    top = [name for name in hub.repo_files(repo, commit, directory) if "/" not in name]
    weights = [safetensors.SINGLE] if safetensors.SINGLE in top else \
        [name for name in top if name == safetensors.INDEX or name.endswith(".safetensors")]  # the index and shards
    wanted = weights or nanochat_checkpoint.files_to_fetch(top, step)
    if not wanted:
        raise UserError(f"{repo} at {revision} holds neither safetensors weights nor nanochat's model_<step>.pt, "
                        f"meta_<step>.json and tokenizer.pkl{f' at step {step}' if step is not None else ''} "
                        f"(files: {', '.join(sorted(top)[:12])})")
    if not all(os.path.exists(os.path.join(directory, name)) for name in wanted):  # else cached: no request
        hub.download(repo, commit, wanted, f"{', '.join(wanted)} of {repo}@{commit}")
    return directory, f"{repo}@{commit}"

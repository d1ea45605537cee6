"""nanochat's own checkpoint files, read without torch: `model_<step>.pt`, `meta_<step>.json` and `tokenizer.pkl`.

This is how nanochat saves its stages and how its authors publish models on the Hub (e.g. karpathy/nanochat-d32's
main branch). Both files are pickles, which can run code when loaded; this reader allows only what such files
hold and refuses any other name a pickle asks for:
- model_<step>.pt is torch's zip format: `<name>/data.pkl` pickles an OrderedDict of tensors, each rebuilt by
  `torch._utils._rebuild_tensor_v2` from a storage (`torch.FloatStorage`, `torch.BFloat16Storage`, ...) whose raw
  little-endian bytes are the zip member `<name>/data/<key>`; here each becomes a numpy array.
- tokenizer.pkl pickles a tiktoken `Encoding` as its state: name, split pattern, mergeable ranks, special tokens.

`read` turns a directory of them into what `jaxchat.hf` imports: the model's config in transformers' keys (with
nanochat's MLP width and norm epsilon), the tensors under nanochat's names, and the tokenizer.
"""
import collections
import glob
import json
import math
import os
import pickle
import re
import zipfile

import ml_dtypes
import numpy as np

from jaxchat.common import UserError
from jaxchat.custom_grads import NORM_EPS
from jaxchat.tokenizer import RustBPETokenizer

STORAGES = {"FloatStorage": np.float32, "BFloat16Storage": ml_dtypes.bfloat16, "HalfStorage": np.float16,
            "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
            "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
MODEL_CONFIG_KEYS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"}


class _Storage:
    """One storage's elements (1-D), as persistent_load hands them to the pickle. No name in a pickle makes one,
    and a pickle cannot change one (no __dict__; BUILD ends in __setstate__'s refusal)."""
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a storage has no state to set")


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2: `size` elements of `storage` from `offset` with element `stride`s, checked
    to lie inside the storage (a crafted file must not read memory beyond it)."""
    def counts(t):
        return isinstance(t, tuple) and all(type(v) is int and 0 <= v <= data.size for v in t)

    data = storage.data if isinstance(storage, _Storage) else np.zeros(0)
    if not (isinstance(storage, _Storage) and type(offset) is int and 0 <= offset <= data.size and counts(size)
            and counts(stride) and len(size) == len(stride) <= 32):
        raise pickle.UnpicklingError("malformed tensor record")
    if math.prod(size) and offset + sum((k - 1) * s for k, s in zip(size, stride)) >= data.size:
        raise pickle.UnpicklingError(f"a tensor of shape {list(size)} reaches past its storage")
    view = np.lib.stride_tricks.as_strided(data[offset:], size, [s * data.itemsize for s in stride], writeable=False)
    return np.array(view)  # owns its memory, C order


class _TensorUnpickler(pickle.Unpickler):
    """Knows three names: the tensor rebuilder, OrderedDict and the storage classes, which stand here as their
    names (plain strings: nothing a pickle could call or set attributes on)."""

    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGES:
            return name
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only tensors are expected)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in STORAGES
                and isinstance(pid[2], str) and type(pid[4]) is int):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if (key, dtype) not in self.storages:  # read once, however often the pickle names it
            data = np.frombuffer(self.archive.read(f"{self.prefix}/data/{key}"), STORAGES[dtype])
            if data.size < numel:
                raise pickle.UnpicklingError(f"storage {key} holds {data.size} elements, {numel} expected")
            self.storages[key, dtype] = _Storage(data)
        return self.storages[key, dtype]


def load_state_dict(path):
    """The tensors of a torch.save'd state dict (torch's zip format) as numpy arrays; UserError when damaged."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise pickle.UnpicklingError("not torch's zip format (one <name>/data.pkl)")
            prefix = pickles[0][:-len("/data.pkl")]
            byteorder = f"{prefix}/byteorder"  # absent in files from torch before 2.1: little-endian
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
                raise pickle.UnpicklingError("big-endian tensors")
            with archive.open(pickles[0]) as f:
                state = _TensorUnpickler(f, archive, prefix).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError,
            IndexError, NotImplementedError, MemoryError, RecursionError, OverflowError) as e:
        raise UserError(f"cannot read {path} as a nanochat model file: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                              for k, v in state.items()):
        raise UserError(f"{path} holds no state dict of named tensors")
    return {name.removeprefix("_orig_mod."): t for name, t in state.items()}  # torch.compile's prefix


class _EncodingState:
    """Stands for tiktoken's Encoding in a pickle: keeps the state it is given."""

    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only a tiktoken Encoding is expected)")


def load_tokenizer_pickle(path):
    """nanochat's tokenizer.pkl as a RustBPETokenizer (its ranks, pattern and nanochat's special tokens)."""
    try:
        with open(path, "rb") as f:
            state = _TokenizerUnpickler(f).load().state
        ranks, pattern, specials = state["mergeable_ranks"], state["pat_str"], state["special_tokens"]
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError, ValueError, IndexError,
            MemoryError, RecursionError, OverflowError) as e:
        raise UserError(f"cannot read {path} as nanochat's tokenizer: {type(e).__name__}: {e}") from None
    return RustBPETokenizer.from_ranks(ranks, pattern, path, specials)  # checks ranks, specials, the pattern


def is_nanochat_dir(directory):
    return bool(glob.glob(os.path.join(glob.escape(directory), "model_*.pt")))


def _steps(names):
    """step -> its digits as the file names spell them, for each model_<step>.pt with its meta_<step>.json."""
    return {int(m[1]): m[1] for name in names if (m := re.fullmatch(r"model_(\d+)\.pt", name))
            and f"meta_{m[1]}.json" in names}


def files_to_fetch(names, step=None):
    """Of a repository's file names, the ones a nanochat checkpoint needs at `step` (default: the last); [] if
    it has none (only top-level files count)."""
    names = {n for n in names if "/" not in n}
    steps = _steps(names)
    if "tokenizer.pkl" not in names or not steps or (step is not None and step not in steps):
        return []
    digits = steps[max(steps) if step is None else step]
    return [f"model_{digits}.pt", f"meta_{digits}.json", "tokenizer.pkl"]


def read(directory, step=None):
    """(config in transformers' keys, tensors, tokenizer, where) of the nanochat checkpoint in `directory` at `step`
    (default: the last that has both files). The tokenizer is found beside the model, in tokenizer/, or where
    nanochat keeps it, <base dir>/tokenizer/ two levels up."""
    steps = _steps(set(os.listdir(directory)))
    if not steps or (step is not None and step not in steps):
        raise UserError(f"no nanochat checkpoint {'at step ' + str(step) + ' ' if step is not None else ''}in "
                        f"{directory} (model_<step>.pt with meta_<step>.json; steps with both: {sorted(steps) or 'none'})")
    digits = steps[max(steps) if step is None else step]
    meta_path, model_path = os.path.join(directory, f"meta_{digits}.json"), os.path.join(directory, f"model_{digits}.pt")
    try:
        with open(meta_path, encoding="utf-8") as f:
            model_config = json.load(f)["model_config"]
        extra = {k: v for k, v in model_config.items() if k not in MODEL_CONFIG_KEYS}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise UserError(f"damaged {meta_path}: {e!r}") from None
    if set(extra) - {"window_pattern"} or set(str(extra.get("window_pattern", "L"))) != {"L"}:  # L: full attention
        raise UserError(f"{meta_path} describes a newer nanochat architecture than jaxchat's ({extra})")
    candidates = [os.path.join(d, "tokenizer.pkl") for d in
                  (directory, os.path.join(directory, "tokenizer"), os.path.join(directory, "..", "..", "tokenizer"))]
    if not (found := [p for p in candidates if os.path.exists(p)]):
        raise UserError(f"no tokenizer.pkl for {directory} (looked in {', '.join(map(os.path.normpath, candidates))})")
    tokenizer = load_tokenizer_pickle(found[0])
    print(f"tokenizer: {os.path.normpath(found[0])}")
    c, d = model_config, model_config.get("n_embd")
    config = {"model_type": "nanochat", "vocab_size": c.get("vocab_size"), "hidden_size": d,
              "num_hidden_layers": c.get("n_layer"), "num_attention_heads": c.get("n_head"),
              "num_key_value_heads": c.get("n_kv_head"), "max_position_embeddings": c.get("sequence_len"),
              "intermediate_size": 4 * d if type(d) is int else None, "rms_norm_eps": NORM_EPS}
    return config, load_state_dict(model_path), tokenizer, model_path

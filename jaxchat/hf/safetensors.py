"""The safetensors format, read and written with numpy alone (no torch): how Hugging Face models store weights.

A file is an 8-byte little-endian header length N, N bytes of JSON (each tensor's dtype, shape and byte range in
the data that follows; "__metadata__": string pairs), then the tensors' bytes back to back, C order, little
endian. Reading memory-maps the file, so a multi-GB model costs no memory until a tensor is used. bfloat16 (how
published checkpoints are usually stored) comes through ml_dtypes, which JAX already needs.

Why not the `safetensors` package (the reference implementation, which the tests check this against): its numpy API
writes only contiguous arrays already in their stored dtype, all at once, so an export would first copy every
transposed kernel (a second model's worth of memory), where this writer copies one tensor at a time; and reading
gains nothing over a memory map.

A model too big for one file is split into shards with an index, `model.safetensors.index.json`
({"weight_map": {tensor name: file name}}); `load_dir` reads either layout.
"""
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from jaxchat.common import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(t): name for name, t in DTYPES.items()}
MAX_HEADER = 100 << 20  # the format's own limit: a larger "header" means a damaged or foreign file
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def save_file(tensors, path, metadata=None, dtype=None):
    """Write `tensors` (name -> numpy array, any layout: a transposed view is fine) to `path` atomically (via
    path.tmp), each stored as `dtype` (default: its own); `metadata`: str -> str. One tensor at a time is copied
    (made contiguous, cast) as it is written, so views of a model's weights cost no memory beyond that."""
    header, offset = {}, 0
    for name, array in tensors.items():
        stored = np.dtype(dtype or array.dtype)
        if stored not in NAMES:
            raise ValueError(f"{name}: dtype {stored} has no safetensors name")
        nbytes = array.size * stored.itemsize
        header[name] = {"dtype": NAMES[stored], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad so that the data starts 8-byte aligned (readers may map it directly)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for array in tensors.values():
            stored = np.dtype(dtype or array.dtype).newbyteorder("<")
            f.write(np.ascontiguousarray(array, dtype=stored).reshape(-1).view(np.uint8))
    os.replace(path + ".tmp", path)


def load_file(path):
    """(name -> read-only numpy array mapped from the file, metadata). A file that breaks the format's rules
    (header, dtypes, byte ranges that overlap, leave gaps or run past the end) is one UserError."""
    def bad(why):
        return UserError(f"damaged or foreign safetensors file {path}: {why}")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise bad(f"header length {n} is larger than the file allows")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:
            raise bad(f"header is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    tensors, end = {}, 0
    for name, info in sorted(header.items(), key=lambda item: _start(item[1])):
        try:
            dtype, shape, (begin, stop) = np.dtype(DTYPES[info["dtype"]]), tuple(info["shape"]), info["data_offsets"]
            assert len(shape) <= 32 and all(type(v) is int and v >= 0 for v in (*shape, begin, stop))
        except (KeyError, TypeError, ValueError, AssertionError):
            raise bad(f"tensor {name!r}: entry {info!r} is not a known dtype, shape and data_offsets") from None
        if begin != end or stop - begin != math.prod(shape) * dtype.itemsize or stop > data.size:
            raise bad(f"tensor {name!r}: bytes {begin}..{stop} do not follow the previous tensor's end {end} or do "
                      f"not hold shape {list(shape)} of {info['dtype']} within the file")
        tensors[name], end = data[begin:stop].view(dtype.newbyteorder("<")).reshape(shape), stop
    if end != data.size:
        raise bad(f"{data.size - end} bytes after the last tensor")
    return tensors, metadata


def _start(info):
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    return offsets[0] if isinstance(offsets, list) and offsets and isinstance(offsets[0], int) else -1


def load_dir(directory):
    """Every tensor of a model directory: model.safetensors, or the shards its index names. UserError where there
    are none, a shard is missing, or a tensor is not in the shard the index names for it."""
    index_path, single_path = os.path.join(directory, INDEX), os.path.join(directory, SINGLE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            assert all(isinstance(name, str) for name in files), "shard names must be strings"
        except (ValueError, KeyError, TypeError, AttributeError, AssertionError, RecursionError) as e:
            raise UserError(f"damaged {index_path}: {type(e).__name__}: {e}") from None
        shards = {}
        for name in files:
            path = os.path.join(directory, name)
            if os.path.basename(name) != name or not os.path.isfile(path):
                raise UserError(f"{index_path} names the shard {name!r}, which is not a file in {directory}")
            shards[name] = load_file(path)[0]
        if misplaced := sorted(n for n, file in weight_map.items() if n not in shards[file]):
            raise UserError(f"{index_path} lists tensors its shards do not hold: {', '.join(misplaced[:5])}")
        return {n: shards[file][n] for n, file in weight_map.items()}  # each from the shard the index names
    if os.path.exists(single_path):
        return load_file(single_path)[0]
    others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".safetensors")))
    raise UserError(f"no {SINGLE} or {INDEX} in {directory}" + (
        f" (it has {', '.join(others)}: jaxchat reads weights from safetensors only; `save_pretrained(DIR, "
        f"safe_serialization=True)` in transformers writes them)" if others else ""))

"""Programs for hardware this machine does not have: compile-only devices of a GPU or TPU target, and what the
compiler says about a program built for them.

The real compilers run here without the hardware: JAX's CUDA plugin builds XLA:GPU programs for a GPU described by
a target file (jaxchat/gpu_targets/, from XLA's own descriptions), and libtpu builds TPU programs for a named
topology. A jitted function lowered on a mesh of such devices with `jax.ShapeDtypeStruct`s goes through the whole
pipeline (SPMD partitioning, fusion, cuDNN / Mosaic kernels, scheduling, buffer assignment); only autotuning is
skipped. `--target=cpu` compiles for fake CPU devices instead (XLA_FLAGS=--xla_force_host_platform_device_count).
"""
import functools
import importlib.util
import math
import os
import re
from collections import Counter, namedtuple

from jaxchat.common import UserError
from jaxchat.hardware import DEVICES, GPU_MEM_FRACTION

GPU_TARGET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
GPU_TARGETS = {"h100": "h100.txtpb", "h200": "h200.txtpb", "a100-80": "a100-80.txtpb"}
# libtpu's topology names by chip count (one JAX device per chip; a v5p chip is two cores run as one device)
TPU_TARGETS = {"tpu-v5p": ("v5p", {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4"}),
               "tpu-v5e": ("v5e", {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"}),
               "tpu-v6e": ("v6e", {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"})}
TARGETS = ("cpu", *GPU_TARGETS, *TPU_TARGETS)
GPUS_PER_HOST = 8


def check_target(target):
    """One error line when `target` is unknown or its compiler is not installed."""
    if target not in TARGETS:
        raise UserError(f"--target={target}: one of {', '.join(TARGETS)}")
    if target in GPU_TARGETS and not any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
        raise UserError(f"--target={target} needs XLA's CUDA compiler (no GPU needed): pip install 'jaxchat[gpu]'")
    if target in TPU_TARGETS and not importlib.util.find_spec("libtpu"):
        raise UserError(f"--target={target} needs the TPU compiler, libtpu (no TPU needed): pip install 'jaxchat[tpu]'")


def target_devices(target, count):
    """`count` devices to compile for: compile-only GPU or TPU devices, or this process's (fake) CPU devices."""
    import jax
    from jax.experimental import topologies

    check_target(target)
    if target == "cpu":
        if jax.device_count() < count:
            raise UserError(f"--devices={count} but JAX started with {jax.device_count()} CPU devices")
        return jax.devices()[:count]
    if target in GPU_TARGETS:
        hosts, rem = divmod(count, GPUS_PER_HOST) if count > GPUS_PER_HOST else (1, 0)
        if rem:
            raise UserError(f"--devices={count}: up to {GPUS_PER_HOST} GPUs, or whole hosts of {GPUS_PER_HOST}")
        with open(os.path.join(GPU_TARGET_DIR, GPU_TARGETS[target])) as f:
            spec = f.read()
        per_host = min(count, GPUS_PER_HOST)
        return topologies.get_topology_desc(platform="cuda", target_config=spec, topology=f"1x{hosts}x{per_host}").devices
    generation, shapes = TPU_TARGETS[target]
    if count not in shapes:
        raise UserError(f"--devices={count}: {target} slices of {', '.join(map(str, shapes))} chips")
    # libtpu looks for a TPU VM's metadata and its workers when it starts (warning at length when there are none)
    # and takes a lock so that one process owns the chips; compiling needs none of it, and several compiles may run
    # at once. What a TPU VM sets itself is kept.
    cores = 2 * count if generation == "v5p" else count
    for key, value in {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                       "TPU_ACCELERATOR_TYPE": f"{generation}-{cores}"}.items():
        os.environ.setdefault(key, value)
    return topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:{shapes[count]}").devices


# XLA:GPU sorts a long array of one row (a batch-1 top-k over the vocabulary) with CUB, and asks a real GPU for the
# scratch that needs while compiling: without a GPU it compiles XLA's own sort instead (neither scratch is counted).
COMPILE_ONLY_OPTIONS = {"gpu": {"xla_gpu_enable_cub_radix_sort": False}}


def compile_options(mesh):
    """The compiler options a program for `mesh`'s devices needs when they are not there."""
    return COMPILE_ONLY_OPTIONS.get(mesh.devices.flat[0].platform, {})


def usable_memory(target):
    """(label, bytes a program may use per device): a GPU's share at the memory fraction the launcher sets."""
    if target == "cpu":
        return None
    label, total = DEVICES[target]
    return label, total * (GPU_MEM_FRACTION if target in GPU_TARGETS else 1.0)


Instruction = namedtuple("Instruction", "name shape op rest")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def computations(hlo_text):
    """({computation: [Instruction]}, the entry computation) of an optimized HLO module's text."""
    comps, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{") and " = " not in line:
            is_entry, current = line.startswith("ENTRY"), line.removeprefix("ENTRY ").split()[0].lstrip("%")
            comps[current], entry = [], current if is_entry else entry
        elif current and (m := _INSTRUCTION.match(line)):
            comps[current].append(Instruction(*m.groups()))
    return comps, entry


def arrays(shape):
    """[(dtype, dims)] of an HLO shape string (a tuple's elements in order)."""
    return [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in _ARRAY.findall(shape)]


def shape_bytes(shape):
    bits = lambda dtype: 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
    return sum(math.prod(dims) * bits(dtype) // 8 for dtype, dims in arrays(shape))


def _dot_flops(ins, shapes):
    """2 · output elements · contracted size of a dot (its lhs's contracting dims)."""
    lhs = re.match(r"%?([\w.\-]+)", ins.rest).group(1)
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
    lhs_dims = arrays(shapes.get(lhs, ""))
    if not dims or not lhs_dims:
        return 0
    contracted = math.prod(lhs_dims[0][1][int(d)] for d in dims.group(1).split(",") if d)
    return 2 * math.prod(arrays(ins.shape)[0][1]) * contracted


def _convolution_flops(ins, shapes):
    """A convolution's multiply-adds ×2: TPU programs express matmuls as convolutions (batch dims as dilated
    windows). Each output element sums over the lhs feature dim and the window's non-hole positions."""
    lhs = re.match(r"%?([\w.\-]+)", ins.rest).group(1)
    labels = re.search(r"dim_labels=(\w+)_", ins.rest)
    lhs_dims = arrays(shapes.get(lhs, ""))
    if not labels or not lhs_dims:
        return 0
    lhs_labels, lhs_shape = labels.group(1), lhs_dims[0][1]
    window = re.search(r"window=\{([^}]*)\}", ins.rest)
    fields = dict(f.split("=") for f in window.group(1).split()) if window else {}
    sizes = [int(x) for x in fields["size"].split("x")] if "size" in fields else []
    dilation = [int(x) for x in fields["lhs_dilate"].split("x")] if "lhs_dilate" in fields else [1] * len(sizes)
    # taps per window in spatial dim i: the window's positions that land on input elements, not on the holes of
    # a dilation or on padding
    taps = [min(-(-size // d), lhs_shape[lhs_labels.index(str(i))]) for i, (size, d) in enumerate(zip(sizes, dilation))]
    return 2 * math.prod(arrays(ins.shape)[0][1]) * lhs_shape[lhs_labels.index("f")] * math.prod(taps)


def _trip_count(loop, comps):
    """A while loop's trip count: XLA's annotation, else a scan's condition `i < N` (from 0 by 1), else 1."""
    if known := re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.rest):
        return int(known.group(1))
    condition = comps.get(re.search(r"condition=%?([\w.\-]+)", loop.rest).group(1), [])
    constants = {i.name: re.match(r"(\d+)\)", i.rest) for i in condition if i.op == "constant"}
    for ins in condition:
        if ins.op == "compare" and "direction=LT" in ins.rest:
            bound = constants.get(re.findall(r"%([\w.\-]+)", ins.rest)[1])
            return int(bound.group(1)) if bound else 1
    return 1


def _fp8_gemm(fusion, comps):
    """Whether a GEMM fusion's dot multiplies fp8 operands (what XLA:GPU makes of fp8.matmul on Hopper)."""
    body = comps.get(re.search(r"calls=%?([\w.\-]+)", fusion.rest).group(1), [])
    shapes = {ins.name: ins.shape for ins in body}
    return any(ins.op == "dot" and all(shapes.get(name, "").startswith("f8")
                                       for name in re.findall(r"%([\w.\-]+)", ins.rest)[:2]) for ins in body)


def program_stats(hlo_text):
    """What one run of the program does, from its optimized HLO, loop bodies times their known trip counts and of
    a conditional the branch with the most FLOPs: matmul FLOPs (dots and convolutions, inside fusions too; kernels
    behind custom calls such as cuDNN attention are not counted), custom calls by target (cuDNN attention, cuBLAS,
    Mosaic TPU kernels, ...), GEMM fusions by kind (" (fp8)" when the dot's operands are fp8), collectives by kind
    with their count and result bytes, and rematerialised instructions (XLA copies instructions under a `.remat`
    name when the program does not fit the device's memory)."""
    comps, entry = computations(hlo_text)
    remat = set()

    @functools.cache
    def run(name):
        """The stats of one run of computation `name`."""
        stats = {"flops": 0, "custom_calls": Counter(), "gemm_fusions": Counter(), "collectives": Counter()}
        instructions = comps.get(name, [])
        shapes = {ins.name: ins.shape for ins in instructions}
        for ins in instructions:
            if ".remat" in ins.name:
                remat.add(ins.name)
            if ins.op in ("dot", "convolution"):
                stats["flops"] += (_dot_flops if ins.op == "dot" else _convolution_flops)(ins, shapes)
            elif ins.op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', ins.rest).group(1)
                if target == "tpu_custom_call":  # a Pallas (Mosaic) kernel: the instruction is named after it
                    target = re.sub(r"(\.[\d]+|\.clone)+$", "", ins.name)
                stats["custom_calls"][target] += 1
            elif ins.op == "fusion" and (kind := re.search(r'"kind":"(__\w*gemm\w*|__cublas\w*)"', ins.rest)):
                stats["gemm_fusions"][kind.group(1) + (" (fp8)" if _fp8_gemm(ins, comps) else "")] += 1
            kind = ins.op.removesuffix("-done")  # an async pair counts once, at its end, whose shape is the result
            if kind in COLLECTIVES:
                stats["collectives"][kind, "n"] += 1
                stats["collectives"][kind, "bytes"] += shape_bytes(ins.shape)
            callees = [run(c) for c in re.findall(r"(?:calls|body|to_apply)=%?([\w.\-]+)", ins.rest)]
            listed = re.search(r"branch_computations=\{([^}]*)\}", ins.rest)
            branches = re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", ins.rest) + \
                (re.findall(r"%?([\w.\-]+)", listed.group(1)) if listed else [])
            if branches:  # one branch runs: count the costliest
                callees.append(max((run(b) for b in branches), key=lambda s: s["flops"]))
            trips = _trip_count(ins, comps) if ins.op == "while" else 1
            for callee in callees:
                stats["flops"] += trips * callee["flops"]
                for key in ("custom_calls", "gemm_fusions", "collectives"):
                    stats[key].update({k: trips * v for k, v in callee[key].items()})
        return stats

    stats = run(entry)
    collectives = {kind: (stats["collectives"][kind, "n"], stats["collectives"][kind, "bytes"])
                   for kind, field in stats["collectives"] if field == "n"}
    return {"flops": stats["flops"], "custom_calls": dict(stats["custom_calls"]),
            "gemm_fusions": dict(stats["gemm_fusions"]), "collectives": collectives, "rematerialized": len(remat)}


def memory(compiled):
    """Per-device bytes of a compiled program from XLA's buffer assignment: arguments, temporaries, outputs not
    donated (aliased to an argument) and the peak, their sum."""
    m = compiled.memory_analysis()
    outputs = m.output_size_in_bytes - m.alias_size_in_bytes
    return {"arguments": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes, "outputs": outputs,
            "peak": m.argument_size_in_bytes + m.temp_size_in_bytes + outputs}


def analyse(compiled):
    """Per-device figures of a compiled program: its `memory` and what one run does (`program_stats`)."""
    return {**memory(compiled), **program_stats(compiled.as_text())}

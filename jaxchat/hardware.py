"""Hardware facts: what a device holds and computes at its peak, and the most memory this process has used."""
import resource

GIB = 2**30
# Memory an application can use, per device (nvidia-smi's total for GPUs).
DEVICES = {
    "h100": ("H100 80GB", 81559 * 2**20),
    "h200": ("H200 141GB", 143771 * 2**20),
    "a100-80": ("A100 80GB", 81920 * 2**20),
    "a100-40": ("A100 40GB", 40960 * 2**20),
    "tpu-v5e": ("TPU v5e", 16 * GIB),
    "tpu-v5p": ("TPU v5p", 95 * GIB),
    "tpu-v6e": ("TPU v6e", 32 * GIB),
}
# The share of a GPU's memory XLA takes up front (XLA_PYTHON_CLIENT_MEM_FRACTION, set at start-up by
# `distributed.configure_accelerator`): JAX's default, 0.75, would leave 20 GB of an H100 unused; the rest is for
# cuDNN and NCCL workspaces and the CUDA context.
GPU_MEM_FRACTION = 0.9
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per device, nanochat's MFU basis


def peak_flops(device_kind):
    """Dense bf16 FLOP/s of one device of this kind (jax's device_kind), or None where unknown (CPUs)."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_kind), None)


def peak_memory():
    """(what, GiB): the most memory this process has held so far: on its devices where JAX tracks it (GPU, TPU),
    else the host's resident set (CPU)."""
    import jax  # not at the top: `python -m jaxchat.memory` fakes its devices before JAX starts
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    if all(peaks):
        return "peak device memory", max(peaks) / GIB
    return "peak host memory, RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

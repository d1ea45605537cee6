"""Run by tests/test_memory.py in a fresh process: jaxchat.memory's compiled figure for a train step beside what
the process's resident memory really grows by while that step runs (Linux: the peak is reset through
/proc/self/clear_refs, then read from VmHWM; MALLOC_MMAP_THRESHOLD_ keeps large buffers out of malloc's cache).

    python tests/_memory_probe.py DEPTH DEVICE_BATCH_SIZE   -> one JSON line
"""
import gc
import json
import sys

import jax
import numpy as np

from jaxchat import aot, memory, sharding
from jaxchat.model import config_for_depth
from jaxchat.optim import OptimConfig, hyperparams
from jaxchat.train import init_train_state, train_step


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


depth, batch = int(sys.argv[1]), int(sys.argv[2])
config = config_for_depth(depth, 4096, 256, head_dim=64)
mesh = sharding.make_mesh()
compiled, figures, _ = memory.compile_train_step(config, OptimConfig(), (1, batch, 256, False), mesh)
figures.update(aot.analyse(compiled))
tokens = np.random.default_rng(0).integers(0, 4096, (1, batch, 257), np.int32)
with jax.set_mesh(mesh):
    state = init_train_state(config, OptimConfig())
    data = sharding.shard_batch({"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}, batch_axis=1)
    compiled = train_step.lower(state, data, hyperparams()).compile()
    state, m = compiled(state, data, hyperparams())  # the first run allocates the runtime's own buffers
    jax.block_until_ready(m)
    gc.collect()
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    state, m = compiled(state, data, hyperparams())
    jax.block_until_ready((state, m))
    grown = status("VmHWM") - before
print(json.dumps({"predicted": figures["temp"] + figures["outputs"], "grown": grown, **figures}))

"""A checkpoint saved on a (1, 8) mesh restores onto (2, 4) and onto one device: same parameters, same next loss.
Runs in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before jax is imported)."""
import json
import textwrap

import pytest

from _harness import run_python

pytestmark = pytest.mark.slow  # a process with 8 fake devices trains and restores

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from jaxchat import sharding
    from jaxchat.checkpoint_manager import Checkpointer
    from jaxchat.model import GPTConfig
    from jaxchat.optim import OptimConfig, hyperparams
    from jaxchat.tokenizer import RustBPETokenizer
    from jaxchat.train import abstract_train_state, init_train_state, train_step

    config = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    tokens = np.random.default_rng(0).integers(0, 256, (1, 8, 33), np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}

    def step_once(state, mesh):
        with jax.set_mesh(mesh):
            state, metrics = train_step(state, sharding.shard_batch(batch, batch_axis=1), hyperparams(1.0, 0.9))
        return state, float(metrics["loss"])

    def params(state):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(state.params))
                + jax.tree.leaves(nnx.to_pure_dict(state.opt_state))]

    saved_mesh = sharding.make_mesh((1, 8))
    with jax.set_mesh(saved_mesh):
        state = init_train_state(config)
    state, _ = step_once(state, saved_mesh)  # non-trivial optimizer state
    ckpt = Checkpointer(sys.argv[1])
    tokenizer = RustBPETokenizer.train_from_iterator([" ".join(f"word{i} {i * i}" for i in range(500))], 300)
    ckpt.save(1, state.params, state.opt_state, {"model_config": config.__dict__}, tokenizer)
    ckpt.wait()
    reference = params(state)
    _, next_loss = step_once(state, saved_mesh)
    out = {"next_loss_saved_mesh": next_loss}
    for name, mesh in [("2x4", sharding.make_mesh((2, 4))),
                       ("1 device", sharding.make_mesh((1, 1), devices=jax.devices()[:1]))]:
        abstract = abstract_train_state(config, OptimConfig())
        with jax.set_mesh(mesh):
            params_state, opt_state, _ = ckpt.restore(1, abstract.params, abstract.opt_state)
        restored = abstract.replace(params=params_state, opt_state=opt_state)
        same = all(np.array_equal(a, b) for a, b in zip(reference, params(restored)))
        wte = restored.params["wte"][...]
        out[name] = {"params_equal": same, "devices": len(wte.sharding.device_set),
                     "wte_spec": str(wte.sharding.spec), "next_loss": step_once(restored, mesh)[1]}
    print(json.dumps(out))
''')


def test_restore_onto_other_meshes(tmp_path):
    r = run_python(["-c", SCRIPT, str(tmp_path / "ckpt")], devices=8)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["2x4"]["params_equal"] and out["1 device"]["params_equal"]  # restored bit for bit
    assert out["2x4"]["devices"] == 8 and out["1 device"]["devices"] == 1
    assert "fsdp" in out["2x4"]["wte_spec"]
    # the next step on another mesh differs only by the order of fp32 reductions
    for name in ("2x4", "1 device"):
        assert abs(out[name]["next_loss"] - out["next_loss_saved_mesh"]) < 1e-5, out

"""Checkpoints: one writer per run directory, damaged steps (truncated, or bytes changed: checksums) named in one
line (resume falls back to the newest intact one), a checkpoint paired with its own tokenizer, weights landing on
the ambient mesh."""
import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat import sharding
from jaxchat.checkpoint_manager import (Checkpointer, DamagedCheckpoint, check_tokenizer, checkpoint_dir,
                                        load_model)
from jaxchat.common import UserError, get_base_dir
from jaxchat.model import GPT, GPTConfig
from jaxchat.tokenizer import RustBPETokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)


@pytest.fixture(scope="module")
def tokenizers():
    """Two different 300-token tokenizers (same size: only the fingerprint tells them apart)."""
    a = RustBPETokenizer.train_from_iterator([" ".join(f"apple {i} banana {i * 7}" for i in range(400))], 300)
    b = RustBPETokenizer.train_from_iterator([" ".join(f"cherry {i} durian {i * 3}" for i in range(400))], 300)
    assert a.fingerprint() != b.fingerprint()
    return a, b


def model_state(seed):
    return nnx.state(GPT(CONFIG, rngs=nnx.Rngs(seed)))


def abstract_model():
    return nnx.split(nnx.eval_shape(lambda: GPT(CONFIG, rngs=nnx.Rngs(0))))[1]


def abstract_optim():
    return nnx.State({"mu": nnx.Variable(jax.ShapeDtypeStruct((3,), jnp.float32))})


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(state))]


def write_run(tokenizer, tag="t", steps=(1, 2), config=CONFIG):
    """A run directory with one step per entry of `steps`, step s holding the model initialised with seed s."""
    with Checkpointer(checkpoint_dir("base", tag)).lock() as ckpt:
        for s in steps:
            ckpt.save(s, model_state(s), {"mu": jnp.full((3,), float(s))},
                      {"model_config": dataclasses.asdict(config)}, tokenizer)
    return ckpt.directory


def truncate_largest_array_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "model")) for f in fs]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)


def write_random_bytes(step_dir, item, n=4096):
    """n random bytes (at most half the file) over the middle of the item's largest file, its size unchanged, as a
    bad disk or copy would leave it; returns the file's path in the step directory."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, item)) for f in fs]
    largest = max(files, key=os.path.getsize)
    size = os.path.getsize(largest)
    n = min(n, size // 2)
    with open(largest, "r+b") as f:
        f.seek((size - n) // 2)
        f.write(np.random.default_rng(0).bytes(n))
    return os.path.relpath(largest, step_dir)


def as_saved_before_checksums(step_dir):
    """What a checkpoint written before checksums looks like: no checksums.json, no `checksums` in its meta."""
    os.remove(os.path.join(step_dir, "checksums.json"))
    path = os.path.join(step_dir, "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    del meta["checksums"]
    with open(path, "w") as f:
        json.dump(meta, f)


# ---- one writer per directory -------------------------------------------------------------------------------
@pytest.mark.slow
def test_second_writer_is_refused_naming_the_holder(tokenizers):
    directory = checkpoint_dir("base", "busy")
    first = Checkpointer(directory).lock()
    holder = rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}, since [-0-9]+ [:0-9]+: .*pytest"
    with pytest.raises(UserError, match=holder + r".*\); wait for it to end or use another --model_tag"):
        Checkpointer(directory).lock()
    with pytest.raises(UserError, match="in use by another run"):  # a save takes the lock too
        Checkpointer(directory).save(1, model_state(0), {"mu": jnp.zeros(3)}, {}, tokenizers[0])
    first.close()
    Checkpointer(directory).lock().close()  # free again once the holder closes


@pytest.mark.slow
def test_a_dead_holders_lock_is_free(tmp_path):
    """The kernel drops a flock with its process: a killed run never leaves its directory locked."""
    directory = str(tmp_path / "run")
    script = "import sys, time; from jaxchat.checkpoint_manager import Checkpointer; " \
             "ckpt = Checkpointer(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", script, directory], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"pid {holder.pid} on .*python -c"):
            Checkpointer(directory).lock()
    finally:
        holder.send_signal(signal.SIGKILL)  # no close(), no cleanup
        holder.wait()
    Checkpointer(directory).lock().close()


# ---- damaged checkpoints ------------------------------------------------------------------------------------
def test_resume_falls_back_to_the_newest_intact_step(tokenizers, capsys):
    directory = write_run(tokenizers[0])
    truncate_largest_array_file(os.path.join(directory, "000002"))
    ckpt = Checkpointer(directory)
    with pytest.raises(DamagedCheckpoint, match=r"t/000002 is damaged \(model/.*: checksum mismatch\)"):
        ckpt.restore(2, abstract_model())
    state, _, meta = ckpt.restore_latest(abstract_model())
    assert meta["step"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(leaves(state), leaves(model_state(1))))  # step 1's arrays
    err = capsys.readouterr().err
    assert "step 2 is damaged (model/" in err and "resuming from step 1" in err and len(err.splitlines()) == 1
    # the damaged step is kept aside, and the resumed run can write step 2 again
    assert os.path.isdir(os.path.join(directory, "000002.damaged")) and ckpt.all_steps() == [1]
    ckpt.save(2, state, {"mu": jnp.zeros(3)}, {"model_config": dataclasses.asdict(CONFIG)}, tokenizers[0])
    ckpt.close()
    assert Checkpointer(directory).all_steps() == [1, 2]


@pytest.mark.parametrize("item", ["model", "optim"])
def test_changed_bytes_are_damage(tokenizers, capsys, item):
    """Bytes overwritten in place (the file's size and format intact) used to restore silently; the step's
    checksums name the file, and resume falls back to the newest intact step as for a truncated file."""
    directory = write_run(tokenizers[0])
    changed = write_random_bytes(os.path.join(directory, "000002"), item)
    ckpt = Checkpointer(directory)
    with pytest.raises(DamagedCheckpoint, match=rf"t/000002 is damaged \({changed}: checksum mismatch\)"):
        ckpt.restore(2, abstract_model(), abstract_optim())
    state, optim, meta = ckpt.restore_latest(abstract_model(), abstract_optim())
    assert meta["step"] == 1 and np.array_equal(optim["mu"][...], [1.0, 1.0, 1.0])
    assert all(np.array_equal(a, b) for a, b in zip(leaves(state), leaves(model_state(1))))
    err = capsys.readouterr().err
    assert f"step 2 is damaged ({changed}: checksum mismatch): resuming from step 1" in err
    assert len(err.splitlines()) == 1
    assert os.path.isdir(os.path.join(directory, "000002.damaged")) and ckpt.all_steps() == [1]
    ckpt.close()


def test_load_model_verifies_what_it_reads(tokenizers):
    """Evals and serving read through load_model: a changed model file is one error line naming it (as a truncated
    one is); a changed optimizer file does not matter to it (it reads no optimizer state)."""
    directory = write_run(tokenizers[0])
    write_random_bytes(os.path.join(directory, "000002"), "optim")
    load_model("base", "t")
    changed = write_random_bytes(os.path.join(directory, "000002"), "model")
    with pytest.raises(UserError, match=rf"000002 is damaged \({changed}: checksum mismatch\)") as e:
        load_model("base", "t")
    assert "\n" not in str(e.value)
    model, _, meta = load_model("base", "t", step=1)  # an intact step still loads
    assert meta["step"] == 1


def test_changed_meta_values_are_damage(tokenizers):
    """A meta that still parses but says something else (a digit of the data position, say) is damage too."""
    directory = write_run(tokenizers[0])
    path = os.path.join(directory, "000002", "meta", "metadata")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"n_layer": 1', '"n_layer": 7'))
    with pytest.raises(DamagedCheckpoint, match=r"000002 is damaged \(meta/metadata: checksum mismatch\)"):
        Checkpointer(directory).restore_meta(2)


def test_lost_checksums_are_damage(tokenizers):
    directory = write_run(tokenizers[0])
    os.remove(os.path.join(directory, "000002", "checksums.json"))
    with pytest.raises(DamagedCheckpoint, match=r"000002 is damaged \(checksums.json: missing\)"):
        Checkpointer(directory).restore(2, abstract_model())
    with open(os.path.join(directory, "000001", "checksums.json"), "w") as f:
        f.write('{"model/manifest.ocdbt": "0')  # cut short
    with pytest.raises(DamagedCheckpoint, match=r"000001 is damaged \(checksums.json: JSONDecodeError"):
        Checkpointer(directory).restore(1, abstract_model())


def test_a_checkpoint_saved_before_checksums_still_loads(tokenizers, capsys):
    directory = write_run(tokenizers[0])
    for step_dir in ("000001", "000002"):
        as_saved_before_checksums(os.path.join(directory, step_dir))
    model, _, meta = load_model("base", "t")
    assert meta["step"] == 2 and all(np.array_equal(a, b) for a, b in zip(leaves(nnx.state(model)),
                                                                          leaves(model_state(2))))
    with Checkpointer(directory) as ckpt:
        state, optim, meta = ckpt.restore_latest(abstract_model(), abstract_optim())
        assert meta["step"] == 2 and np.array_equal(optim["mu"][...], [2.0, 2.0, 2.0])
        assert capsys.readouterr().err == ""  # nothing to say: it restores as it always did
        # and a resumed run's next save has checksums again
        ckpt.save(3, state, {"mu": jnp.zeros(3)}, {"model_config": dataclasses.asdict(CONFIG)}, tokenizers[0])
    assert os.path.exists(os.path.join(directory, "000003", "checksums.json"))


def test_checksums_cover_every_file_of_the_items(tokenizers):
    """Every file under model/, optim/ and meta/ is listed; orbax's step-level bookkeeping, which it rewrites when
    it commits the step, is not."""
    directory = write_run(tokenizers[0], steps=(1,))
    step_dir = os.path.join(directory, "000001")
    with open(os.path.join(step_dir, "checksums.json")) as f:
        recorded = json.load(f)
    on_disk = sorted(os.path.relpath(os.path.join(r, f), step_dir) for item in ("model", "optim", "meta")
                     for r, _, fs in os.walk(os.path.join(step_dir, item)) for f in fs)
    assert sorted(recorded) == on_disk and any(p.startswith("optim/") for p in on_disk)
    assert not any(name.endswith(".orbax-checkpoint-tmp") for name in os.listdir(directory))


def test_no_intact_step_is_one_error(tokenizers):
    directory = write_run(tokenizers[0])
    truncate_largest_array_file(os.path.join(directory, "000002"))
    os.remove(os.path.join(directory, "000001", "model", "manifest.ocdbt"))  # a missing file
    with pytest.raises(UserError, match=r"no intact checkpoint to resume in .*: step 2 is damaged \(model/.*: "
                                        r"checksum mismatch\), step 1 is damaged \(model/manifest.ocdbt: missing\)$"):
        with Checkpointer(directory) as ckpt:  # (restore_latest takes the lock: let it go)
            ckpt.restore_latest(abstract_model())
    for step_dir in ("000001", "000002"):  # saved before checksums, orbax's own errors say the same
        as_saved_before_checksums(os.path.join(directory, step_dir))
    with pytest.raises(UserError, match=r"no intact checkpoint to resume in .*: step 2 is damaged \(model: .*"
                                        r"step 1 is damaged \(model: NOT_FOUND"):
        Checkpointer(directory).restore_latest(abstract_model())


def test_damaged_meta_is_one_line(tokenizers):
    directory = write_run(tokenizers[0])
    with open(os.path.join(directory, "000002", "meta", "metadata"), "w") as f:
        f.write("garbage{")
    with pytest.raises(UserError, match=r"000002 is damaged \(meta: JSONDecodeError: ") as e:
        Checkpointer(directory).restore_meta()
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"000002 is damaged \(meta: "):
        load_model("base", "t")


@pytest.mark.slow
def test_a_damaged_checkpoint_at_the_cli_is_one_line(tmp_path):
    """Through run_main, as a user sees it: one 'error: ...' line on stderr, no traceback before or after exit
    (orbax's closed event loop used to print several, depending on timing: restore a few times to give it a
    chance). A checkpoint saved before checksums, so that orbax's read is what fails."""
    script = textwrap.dedent('''
        import dataclasses, os, sys
        from jaxchat.distributed import run_main
        from jaxchat.checkpoint_manager import Checkpointer, DamagedCheckpoint, load_model
        from jaxchat.tokenizer import RustBPETokenizer
        sys.path.insert(0, "tests")
        import test_checkpoint as t
        tok = RustBPETokenizer.train_from_iterator([" ".join(f"apple {i} banana {i * 7}" for i in range(400))], 300)
        directory = t.write_run(tok)
        t.as_saved_before_checksums(os.path.join(directory, "000002"))
        t.truncate_largest_array_file(os.path.join(directory, "000002"))
        for _ in range(5):
            try:
                Checkpointer(directory).restore(2, t.abstract_model())
            except DamagedCheckpoint:
                pass
        run_main(lambda _: load_model("base", "t"))
    ''')
    env = dict(os.environ, JAXCHAT_BASE_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint ") and "000002 is damaged (model: " in lines[0]
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr and "bound method" not in r.stderr


def test_late_reads_finish_before_orbax_closes_its_loop():
    """The cause of those tracebacks, made deterministic: one read fails while another is still in flight on a
    foreign thread (as TensorStore's are); orbax's run_sync closes its loop on the failure, and the late read
    then reports to a closed loop. While restoring, checkpoint_manager lets such reads finish first."""
    from orbax.checkpoint._src import asyncio_utils
    from jaxchat.checkpoint_manager import _reads_finish_before_loop_close

    def restore_with_a_late_read():
        errors = []

        async def late_read():
            loop, done = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()

            def report():  # what TensorStore's thread does when a read completes
                try:
                    loop.call_soon_threadsafe(done.set_result, None)
                except RuntimeError as e:
                    errors.append(str(e))
            threading.Timer(0.2, report).start()
            await done

        async def failing_read():
            raise ValueError("truncated")

        async def restore():
            await asyncio.gather(late_read(), failing_read())

        with pytest.raises(ValueError, match="truncated"):
            asyncio_utils.run_sync(restore())
        time.sleep(0.4)
        return errors

    assert restore_with_a_late_read() == ["Event loop is closed"]
    with _reads_finish_before_loop_close():
        assert restore_with_a_late_read() == []


# ---- a checkpoint knows its tokenizer -----------------------------------------------------------------------
def test_load_model_returns_the_checkpoints_own_tokenizer(tokenizers):
    a, b = tokenizers
    directory = write_run(a)
    b.save(os.path.join(get_base_dir(), "tokenizer"))  # the base tokenizer retrained after the run
    model, tokenizer, meta = load_model("base", "t")
    assert tokenizer.fingerprint() == meta["tokenizer_fingerprint"] == a.fingerprint()
    assert sorted(os.listdir(os.path.join(directory, "tokenizer"))) == ["token_bytes.npy", "tokenizer.json",
                                                                         "tokenizer.tiktoken"]
    assert meta["step"] == 2 and meta["model_tag"] == "t"
    assert all(np.array_equal(x, y) for x, y in zip(leaves(nnx.state(model)), leaves(model_state(2))))


def test_a_swapped_tokenizer_copy_is_refused(tokenizers):
    a, b = tokenizers
    directory = write_run(a)
    shutil.rmtree(os.path.join(directory, "tokenizer"))
    b.save(os.path.join(directory, "tokenizer"))
    with pytest.raises(UserError, match=rf"the tokenizer at {directory}/tokenizer is not the one base/t step 2 was "
                                        rf"trained with \(fingerprint {b.fingerprint()} vs {a.fingerprint()}\): "
                                        r"was it retrained or replaced\?"):
        load_model("base", "t")


def test_check_tokenizer_refuses_another_tokenizer(tokenizers):
    """What a resumed run checks against $JAXCHAT_BASE_DIR/tokenizer: the fingerprint, then the vocab size."""
    a, b = tokenizers
    meta = Checkpointer(write_run(a, steps=(1,))).restore_meta()
    check_tokenizer(meta, a, "base/t step 1")
    with pytest.raises(UserError, match=r"tokenizer/? is not the one base/t step 1 was trained with"):
        check_tokenizer(meta, b, "base/t step 1")
    other = {"tokenizer_fingerprint": b.fingerprint(), "model_config": {**dataclasses.asdict(CONFIG), "vocab_size": 512}}
    with pytest.raises(UserError, match="has 300 tokens but the model of other has a vocabulary of 512"):
        check_tokenizer(other, b, "other")
    with pytest.raises(UserError, match=r"is not the one unrecorded was trained with \(fingerprint \w+ vs None\)"):
        check_tokenizer({"model_config": dataclasses.asdict(CONFIG)}, a, "unrecorded")


def test_a_run_without_its_tokenizer_copy_is_refused(tokenizers):
    """Every save writes the tokenizer beside the steps; a run whose copy is gone names what is missing."""
    directory = write_run(tokenizers[0], steps=(1,))
    shutil.rmtree(os.path.join(directory, "tokenizer"))
    with Checkpointer(directory, create=False) as ckpt, \
            pytest.raises(UserError, match=r"^base/t has no copy of the tokenizer it was trained with \(.*tokenizer is "
                                           r"missing\): put that tokenizer's files there$"):
        ckpt.load_tokenizer(ckpt.restore_meta(), "base/t")


@pytest.mark.slow
def test_vocab_mismatch_is_refused(tokenizers):
    config = dataclasses.replace(CONFIG, vocab_size=320)
    with Checkpointer(checkpoint_dir("base", "v")).lock() as ckpt:
        ckpt.save(1, nnx.state(GPT(config, rngs=nnx.Rngs(0))), {"mu": jnp.zeros(3)},
                  {"model_config": dataclasses.asdict(config)}, tokenizers[0])
    with pytest.raises(UserError, match="has 300 tokens but the model of base/v step 1 has a vocabulary of 320"):
        load_model("base", "v")


# ---- the ambient mesh ---------------------------------------------------------------------------------------
def test_load_model_lands_on_the_ambient_mesh(tokenizers):
    write_run(tokenizers[0], steps=(1,))
    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        model, _, _ = load_model("base", "t")
    arrays = jax.tree.leaves(nnx.state(model))
    assert arrays and all(isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh
                          for x in arrays)
    model, _, _ = load_model("base", "t")  # no mesh set: one device
    assert all(isinstance(x.sharding, jax.sharding.SingleDeviceSharding) for x in jax.tree.leaves(nnx.state(model)))

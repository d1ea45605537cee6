"""The chat stages on a tiny model: exact resume of mid, SFT and RL; the midtraining schedule; bad sources."""
import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxchat import chat_rl, chat_sft, mid_train
from jaxchat.checkpoint_manager import Checkpointer, checkpoint_dir, load_model
from jaxchat.common import UserError, get_base_dir
from jaxchat.model import GPT, GPTConfig
from jaxchat.tokenizer import RustBPETokenizer

from test_model import randomize


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, module_monkeypatch):
    """A tokenizer, a word list and a random 2-layer base model 'tiny' (context 64)."""
    d = tmp_path_factory.mktemp("chat_stages")
    module_monkeypatch.setenv("JAXCHAT_BASE_DIR", str(d))
    text = " ".join(f"Who are you? I am jaxchat. What is {i} plus {i % 9}? {i + i % 9}. Spell: a,b,c"
                    for i in range(500))
    tok = RustBPETokenizer.train_from_iterator([text], 350)
    tok.save(os.path.join(d, "tokenizer"))
    (d / "words.txt").write_text("\n".join(["apple", "banana", "cherry", "grape", "lemon", "mango", "peach"]))
    config = GPTConfig(sequence_len=64, vocab_size=350, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = randomize(GPT(config, rngs=nnx.Rngs(0)), scale=0.1)
    ckpt = Checkpointer(checkpoint_dir("base", "tiny"))
    ckpt.save(5, nnx.state(model), {"dummy": jnp.zeros(())}, {"model_config": dataclasses.asdict(config)}, tok)
    ckpt.close()
    return d


@pytest.fixture
def env(base_dir, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setenv("JAXCHAT_WORD_LIST", str(base_dir / "words.txt"))
    return base_dir


def params(source, tag, step):
    model, _, _ = load_model(source, tag, step)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def check_resume(stage, module, argv, total, cut, tag, source):
    """`total` steps straight == `cut` steps, a stop, and --resume=1: same per-step numbers and parameters; resumed
    once more, the finished run does nothing."""
    straight = module.main(argv + [f"--model_tag={tag}", f"--source={source}"])
    root = os.path.join(get_base_dir(), os.path.dirname(checkpoint_dir(stage, "x")))
    shutil.copytree(os.path.join(root, tag), os.path.join(root, f"{tag}_resumed"))
    shutil.rmtree(os.path.join(root, f"{tag}_resumed", f"{total:06d}"))  # as if killed after step `cut` was saved
    resumed = module.main(argv + [f"--model_tag={tag}_resumed", f"--source={source}", "--resume=1"])
    a, b = params(stage, tag, total), params(stage, f"{tag}_resumed", total)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # finished now: resumed again, it has nothing to do, and returns (a pipeline goes on to its next stage)
    assert module.main(argv + [f"--model_tag={tag}_resumed", f"--source={source}", "--resume=1"]) is None
    assert Checkpointer(os.path.join(root, f"{tag}_resumed")).all_steps() == [cut, total]
    return straight, resumed


def test_mid_lr_schedule_ramps_down():
    lrm = [mid_train.get_lr_multiplier(p / 100) for p in range(101)]
    assert lrm[:80] == [1.0] * 80 and lrm[90] == pytest.approx(0.5) and lrm[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrm, lrm[1:]))


@pytest.mark.slow
def test_mid_resume_is_exact(env):
    argv = ["--device_batch_size=2", "--total_batch_size=256", "--max_seq_len=64", "--num_iterations=4",
            "--eval_every=2", "--eval_tokens=128", "--save_every=2", "--overwrite=1"]
    straight, resumed = check_resume("mid", mid_train, argv, 4, 2, "tiny", "base")
    assert sorted(resumed["losses"]) == [2, 3]
    assert all(resumed["losses"][s] == straight["losses"][s] for s in (2, 3))
    assert straight["val_bpb"] == resumed["val_bpb"]


@pytest.mark.slow
def test_sft_resume_is_exact(env):
    argv = ["--device_batch_size=2", "--target_examples_per_step=4", "--num_iterations=4", "--eval_every=2",
            "--eval_steps=2", "--eval_metrics_every=-1", "--save_every=2", "--overwrite=1", "--init_lr_frac=0.5"]
    straight, resumed = check_resume("sft", chat_sft, argv, 4, 2, "tiny", "base")
    assert all(resumed["losses"][s] == straight["losses"][s] for s in (2, 3))
    assert straight["val_loss"] == resumed["val_loss"] and straight["losses"][3] < straight["losses"][0]
    assert "ARC-Easy" in straight["missing"]  # offline: left out, and said so


@pytest.mark.slow
def test_rl_resume_is_exact(env):
    argv = ["--device_batch_size=4", "--examples_per_step=2", "--num_samples=2", "--max_new_tokens=8",
            "--num_iterations=4", "--eval_every=-1", "--eval_examples=2", "--eval_samples=2", "--save_every=2",
            "--overwrite=1"]
    straight, resumed = check_resume("rl", chat_rl, argv, 4, 2, "tiny", "base")
    assert sorted(resumed["rewards"]) == [2, 3] and straight["data"] == "Arithmetic"
    assert all(resumed["rewards"][s] == straight["rewards"][s] for s in (2, 3))


@pytest.mark.slow
def test_missing_source_and_clobbering_are_clear_errors(env):
    argv = ["--device_batch_size=2", "--target_examples_per_step=4", "--num_iterations=1", "--eval_every=-1",
            "--eval_metrics_every=-1"]
    with pytest.raises(UserError, match="no checkpoint directory .*mid_checkpoints.nope"):
        chat_sft.main(argv + ["--source=mid", "--model_tag=nope"])
    chat_sft.main(argv + ["--source=base", "--model_tag=tiny", "--overwrite=1"])
    with pytest.raises(UserError, match="already holds checkpoints"):
        chat_sft.main(argv + ["--source=base", "--model_tag=tiny"])
    with pytest.raises(UserError, match="other settings"):
        chat_sft.main(argv + ["--source=base", "--model_tag=tiny", "--resume=1", "--init_lr_frac=0.5"])

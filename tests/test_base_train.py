"""Pretraining end to end on tiny shapes: exact resume, checkpoints, bpb, the tiny pipeline, bad input."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxchat import base_eval, base_train, core_eval, dataset, launch, tok_train
from jaxchat.checkpoint_manager import Checkpointer, load_model
from jaxchat.common import UserError, get_base_dir
from jaxchat.download import DownloadError
from jaxchat.loss_eval import evaluate_bpb
from jaxchat.model import config_for_depth
from jaxchat.report_card import get_report, read_scalars
from test_core_eval import make_bundle

TINY = ["--depth=1", "--head_dim=32", "--max_seq_len=32", "--device_batch_size=4", "--total_batch_size=256",
        "--eval_every=3", "--eval_tokens=256", "--sample_every=-1", "--core_metric_every=-1"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, module_monkeypatch):
    """Shards of the shipped corpus and a 512-token tokenizer, shared by the tests of this file."""
    d = tmp_path_factory.mktemp("pretrain")
    module_monkeypatch.setenv("JAXCHAT_BASE_DIR", str(d))
    dataset.build_default_shards()
    tok_train.main(["--vocab-size=512", "--max-chars=400000"])
    return d


@pytest.fixture
def env(base_dir, monkeypatch):
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(base_dir))
    return base_dir


def params_of(tag, step=None):
    model, _, meta = load_model("base", tag, step)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))), meta


@pytest.fixture(scope="module")
def straight_run(base_dir, tmp_path_factory):
    """6 steps straight, saved at steps 3 and 6: what a resumed run must reproduce (tag "straight"), in a base dir
    of its own with base_dir's shards and tokenizer (which the pipeline test retrains). Returns (dir, results)."""
    d = tmp_path_factory.mktemp("straight")
    for name in ("base_data", "tokenizer"):
        shutil.copytree(base_dir / name, d / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXCHAT_BASE_DIR", str(d))
        return d, base_train.main(TINY + ["--num_iterations=6", "--save_every=3", "--keep=5", "--model_tag=straight"])


@pytest.fixture
def straight(straight_run, monkeypatch):
    """The straight run's results, its base dir the test's."""
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(straight_run[0]))
    return straight_run[1]


def copy_of_straight(tag):
    """A copy of the straight run's checkpoints under another tag; returns its directory."""
    root = os.path.join(get_base_dir(), "base_checkpoints")
    shutil.copytree(os.path.join(root, "straight"), os.path.join(root, tag))
    return os.path.join(root, tag)


def assert_continues_the_straight_run(straight, resumed, tag):
    """Resumed at step 3, the run's steps 3-5 and its step 6 are the straight run's, bit for bit."""
    assert sorted(resumed["losses"]) == [3, 4, 5]
    assert all(resumed["losses"][s] == straight["losses"][s] for s in (3, 4, 5))
    assert resumed["val_bpb"] == straight["val_bpb"]
    a, meta_a = params_of("straight", 6)
    b, meta_b = params_of(tag, 6)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert meta_a["dataloader_state_dict"] == meta_b["dataloader_state_dict"]
    assert meta_a["loop_state"]["smooth_train_loss"] == meta_b["loop_state"]["smooth_train_loss"]
    assert meta_a["loop_state"]["min_val_bpb"] == meta_b["loop_state"]["min_val_bpb"]


@pytest.mark.slow
def test_resume_is_exact(straight):
    """6 steps straight == 3 steps, a stop, and --resume for the rest: same losses, same parameters (bitwise)."""
    directory = copy_of_straight("resumed")
    shutil.rmtree(os.path.join(directory, "000006"))  # as if killed before step 6 was saved
    resumed = base_train.main(TINY + ["--num_iterations=6", "--save_every=3", "--model_tag=resumed", "--resume=1"])
    assert_continues_the_straight_run(straight, resumed, "resumed")
    _, meta = params_of("straight", 6)
    assert meta["device_batch_size"] == 4 and meta["max_seq_len"] == 32 and meta["model_config"]["n_layer"] == 1
    assert straight["losses"][5] < straight["losses"][0]  # it learns


@pytest.mark.slow
def test_resume_refuses_a_different_model(env):
    base_train.main(TINY + ["--num_iterations=1", "--model_tag=m1"])
    with pytest.raises(UserError, match="n_layer saved 1 vs requested 2"):
        base_train.main(TINY + ["--num_iterations=2", "--model_tag=m1", "--resume=1", "--depth=2"])
    with pytest.raises(UserError, match="no checkpoint to resume"):
        base_train.main(TINY + ["--num_iterations=2", "--model_tag=never_trained", "--resume=1"])
    with pytest.raises(UserError, match="num_iterations saved 1 vs now 5"):
        base_train.main(TINY + ["--num_iterations=5", "--model_tag=m1", "--resume=1"])
    with pytest.raises(UserError, match="already holds checkpoints"):  # a fresh run never clobbers silently
        base_train.main(TINY + ["--num_iterations=1", "--model_tag=m1"])
    with pytest.raises(UserError, match="multiple of device_batch_size"):
        base_train.main(TINY + ["--num_iterations=2", "--total_batch_size=300"])


@pytest.mark.slow
def test_corrupt_checkpoint_is_a_clear_error(env):
    base_train.main(TINY + ["--num_iterations=1", "--model_tag=corrupt", "--overwrite=1"])
    step_dir = os.path.join(get_base_dir(), "base_checkpoints", "corrupt", "000001", "model")
    for root, _, files in os.walk(step_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(UserError, match="corrupt/000001"):
        load_model("base", "corrupt")


@pytest.mark.slow
def test_bpb_by_hand():
    """A fresh GPT has a zero lm_head, so every token costs exactly ln(V) nats; bpb = Σ nats over targets that
    carry bytes / (ln 2 · Σ their bytes): special tokens (0 bytes) and −1 targets count in neither sum."""
    from jaxchat.model import GPT, config_for_depth
    V = 8
    model = GPT(config_for_depth(1, V, 8, head_dim=32), rngs=nnx.Rngs(0))
    token_bytes = np.array([1, 2, 3, 1, 1, 1, 0, 0], np.int32)  # ids 6 and 7 are special
    targets = np.array([[0, 1, 2, 6, -1], [7, 3, 4, 5, 1]], np.int32)
    bpb = evaluate_bpb(model, iter([{"inputs": np.zeros_like(targets), "targets": targets}]), 1, token_bytes)
    # counted targets: 0,1,2 and 3,4,5,1 -> 7 tokens, 1+2+3+1+1+1+2 = 11 bytes, log2(8) = 3 bits each
    assert bpb == pytest.approx(7 * 3 / 11, rel=1e-6)


@pytest.mark.slow
def test_tiny_pipeline_through_the_launcher(env, capsys):
    """The README's command, shortened: data -> tok_train -> base_train -> base_eval -> mid -> SFT -> RL -> chat evals."""
    launch.main(["--config=tiny", "--vocab_size=512", "--max_chars=300000", "--depth=1", "--head_dim=32",
                 "--max_seq_len=32", "--device_batch_size=4", "--total_batch_size=256", "--num_iterations=4",
                 "--eval_every=2", "--eval_tokens=256", "--sample_every=4", "--save_every=2", "--split_tokens=256",
                 "--tok_eval.compare=", "--model_tag=tinyrun"])
    out = capsys.readouterr().out
    assert "val bpb" in out and "results written" in out and "To be, or not to be" in out
    steps = Checkpointer(os.path.join(get_base_dir(), "base_checkpoints", "tinyrun")).all_steps()
    assert steps == [2, 4]
    for stage in ("mid_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"):
        assert Checkpointer(os.path.join(get_base_dir(), stage, "tinyrun")).all_steps() == [2, 4], stage
    assert "ChatCORE: not computed" in out and "Arithmetic" in out and "HumanEval" in out
    assert os.listdir(os.path.join(get_base_dir(), "runs"))  # TensorBoard events
    # the report card: every stage's section, the curves of the training stages, the summary printed at the end
    text = open("report.md").read()  # the copy in the working directory
    sections = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model evaluation",
                "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft", "Chat RL", "Chat evaluation rl"]
    positions = [text.index(f"\n## {title}\n") for title in sections]
    assert positions == sorted(positions)
    for slug in ("base-model-training", "midtraining", "chat-sft", "chat-rl"):
        plot = os.path.join(get_base_dir(), "report", slug + ".png")
        assert f"]({plot})" in text and os.path.exists(plot)  # the copy links the plot beside the report
    summary = out[out.index("## Summary"):]
    assert "| CORE | skipped | - | - | - |" in summary  # no bundle offline: skipped, not 0
    assert "| ARC-Easy | - | skipped | skipped | skipped |" in summary
    arithmetic = next(line for line in summary.splitlines() if line.startswith("| Arithmetic |")).split(" | ")
    assert all(0 <= float(cell.strip(" |")) <= 1 for cell in arithmetic[2:])  # measured for mid, SFT and RL
    assert "Cost: $0.00" in summary and os.path.join(get_base_dir(), "report", "report.md") in out


@pytest.mark.slow
def test_second_run_on_a_model_tag_is_refused(env):
    """While a run holds a model tag's checkpoint directory, another run on it stops at once, naming the holder."""
    holder = Checkpointer(os.path.join(get_base_dir(), "base_checkpoints", "busy")).lock()
    try:
        with pytest.raises(UserError, match=r"busy is in use by another run \(pid %d" % os.getpid()):
            base_train.main(TINY + ["--num_iterations=1", "--model_tag=busy", "--overwrite=1"])
    finally:
        holder.close()
    base_train.main(TINY + ["--num_iterations=1", "--model_tag=busy", "--overwrite=1"])  # free again


def truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def overwrite_4kib(path):
    """4 KiB of random bytes over the middle of the file, its size unchanged (what restored silently before
    checksums: the file still decoded, to other numbers)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 - 2048)
        f.write(np.random.default_rng(0).bytes(4096))


@pytest.mark.parametrize("item,damage", [("model", truncate), ("model", overwrite_4kib), ("optim", overwrite_4kib)])
@pytest.mark.slow
def test_resume_skips_a_damaged_latest_checkpoint(straight, capsys, item, damage):
    """Step 6's largest model or optimizer file (array data) truncated or overwritten in place: --resume names it in
    one line, moves step 6 aside, continues from step 3, and ends exactly where the straight run did."""
    tag = f"damaged_{item}_{damage.__name__}"
    directory = copy_of_straight(tag)
    step_dir = os.path.join(directory, "000006")
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, item)) for f in fs]
    biggest = max(files, key=os.path.getsize)
    assert os.path.getsize(biggest) > 8192  # array data, not metadata
    damage(biggest)
    capsys.readouterr()
    resumed = base_train.main(TINY + ["--num_iterations=6", "--save_every=3", f"--model_tag={tag}", "--resume=1"])
    err = capsys.readouterr().err
    assert f"step 6 is damaged ({os.path.relpath(biggest, step_dir)}: checksum mismatch): resuming from step 3" in err
    assert os.path.isdir(step_dir + ".damaged")
    assert_continues_the_straight_run(straight, resumed, tag)


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_exits_0(straight):
    """Its last step saved, a run resumed with --resume=1 has nothing to do: it says so, changes nothing, exits 0
    (a pipeline resumed with --resume=1 goes on to its next stage)."""
    directory = copy_of_straight("finished")
    before = sorted(os.listdir(directory))
    env_vars = dict(os.environ, JAXCHAT_BASE_DIR=get_base_dir(), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "jaxchat.base_train", *TINY, "--num_iterations=6", "--save_every=3",
                        "--model_tag=finished", "--resume=1"], env=env_vars, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{directory}: this run finished at step 6; nothing to resume" in r.stdout
    assert "done:" not in r.stdout and "val bpb" not in r.stdout  # no step, no evaluation again
    assert "error" not in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(directory)) == before
    assert base_train.main(TINY + ["--num_iterations=6", "--save_every=3", "--model_tag=finished",
                                   "--resume=1"]) is None  # in a process (the launcher): returns, for the next stage


@pytest.mark.slow
def test_optimizer_2026_trains_and_resumes_exactly(env, monkeypatch):
    """--optimizer=2026 end to end: the train step gets the 2026 schedules (warmup, momentum ramp, cosine Muon weight
    decay scaled by the batch and the d12 reference), it learns, and a run stopped at step 2 and resumed (NorMuon's
    state and the Adam groups' restored) ends bitwise where the straight run does."""
    hypers = []
    train_step = base_train.train_step
    monkeypatch.setattr(base_train, "train_step", lambda state, batch, hyper: hypers.append(hyper)
                        or train_step(state, batch, hyper))
    flags = TINY + ["--optimizer=2026", "--num_iterations=4", "--save_every=2", "--warmup_steps=2", "--eval_every=-1"]
    straight = base_train.main(flags + ["--model_tag=o26", "--overwrite=1"])
    warmdown = [2 / 3 + 0.05 / 3, 1 / 3 + 0.05 * 2 / 3]  # the last round(0.65·4) = 3 steps, down to 0.05
    assert [h["lr_multiplier"] for h in hypers] == [np.float32(x) for x in [0.5, 1.0, *warmdown]]
    assert [h["muon_momentum"] for h in hypers] == [np.float32(0.85 + 0.12 * s / 400) for s in range(4)]
    d12, d1 = (base_train.scaling_params(config_for_depth(d, 512, 32, head_dim=32)) for d in (12, 1))
    decay = 0.28 * (256 / 2**19) ** 0.5 * d12 / d1  # × √(B/2¹⁹) × D_REF/D, then cosine over the 4 steps
    assert [h["muon_weight_decay"] for h in hypers] == pytest.approx(
        [decay * (1 + np.cos(np.pi * s / 4)) / 2 for s in range(4)], rel=1e-6)
    assert straight["losses"][3] < straight["losses"][0]
    directory = os.path.join(get_base_dir(), "base_checkpoints", "o26")
    shutil.copytree(directory, directory + "_resumed")
    shutil.rmtree(os.path.join(directory + "_resumed", "000004"))
    resumed = base_train.main(flags + ["--model_tag=o26_resumed", "--resume=1"])
    assert sorted(resumed["losses"]) == [2, 3] and all(resumed["losses"][s] == straight["losses"][s] for s in (2, 3))
    a, _ = params_of("o26", 4)
    b, _ = params_of("o26_resumed", 4)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_model_2026_trains_saves_and_loads(env):
    """--model=2026 (with --optimizer=2026): the saved config has nanochat's 2026 architecture, the checkpoint loads
    as that model, it learns, and a resume that asks for the October model is refused."""
    flags = TINY + ["--model=2026", "--optimizer=2026", "--num_iterations=3", "--warmup_steps=0", "--eval_every=-1"]
    result = base_train.main(flags + ["--model_tag=m26"])
    assert result["losses"][2] < result["losses"][0]
    model, _, meta = load_model("base", "m26")
    c = model.config
    assert (c.n_embd, c.window_pattern, c.value_embeds, c.smear, c.init, c.padded_vocab) == (64, "SSSL", True, True,
                                                                                             "2026", 512)
    assert meta["model_config"]["qk_scale"] == 1.2 and hasattr(model, "backout_lambda")
    with pytest.raises(UserError, match="window_pattern saved SSSL vs requested None, value_embeds saved True"):
        base_train.main(TINY + ["--optimizer=2026", "--num_iterations=3", "--warmup_steps=0", "--eval_every=-1",
                                "--model_tag=m26", "--resume=1"])


def test_final_save_comes_before_the_final_evaluation(env, monkeypatch):
    """A crash in the last evaluation loses nothing: the last step is already on disk."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(base_train, "evaluate_bpb", interrupted)  # with eval_every=-1, only the final one runs
    with pytest.raises(KeyboardInterrupt):
        base_train.main(TINY + ["--num_iterations=2", "--eval_every=-1", "--model_tag=crash", "--overwrite=1"])
    assert Checkpointer(os.path.join(get_base_dir(), "base_checkpoints", "crash")).all_steps() == [2]


@pytest.mark.slow
def test_fp8_trains_in_fp8_and_evaluates_and_saves_without(env, monkeypatch):
    """--fp8=1: the train step runs fp8, val bpb and samples run the same weights without it (nanochat's
    disable_fp8), and the checkpoint is an ordinary one (its config says fp8 off; a resumed run may drop --fp8)."""
    seen = {"train": set(), "eval": set()}
    train_step, evaluate_bpb, sample_greedy = base_train.train_step, base_train.evaluate_bpb, base_train.sample_greedy
    monkeypatch.setattr(base_train, "train_step", lambda state, *a: seen["train"].add(state.model.config.fp8)
                        or train_step(state, *a))
    monkeypatch.setattr(base_train, "evaluate_bpb", lambda model, *a, **k: seen["eval"].add(model.config.fp8)
                        or evaluate_bpb(model, *a, **k))
    monkeypatch.setattr(base_train, "sample_greedy", lambda model, *a, **k: seen["eval"].add(model.config.fp8)
                        or sample_greedy(model, *a, **k))
    fp8 = TINY + ["--depth=2", "--head_dim=128", "--dtype=bfloat16", "--sample_every=2", "--model_tag=fp8"]  # 128 wide
    base_train.main(fp8 + ["--num_iterations=2", "--save_every=1", "--fp8=1"])
    assert seen == {"train": {True}, "eval": {False}}
    _, meta = params_of("fp8")
    assert meta["model_config"]["fp8"] is False and meta["model_config"]["compute_dtype"] == "bfloat16"
    shutil.rmtree(os.path.join(get_base_dir(), "base_checkpoints", "fp8", "000002"))  # as if stopped after step 1
    resumed = base_train.main(fp8 + ["--num_iterations=2", "--save_every=1", "--resume=1", "--fp8=0"])
    assert sorted(resumed["losses"]) == [1] and seen["train"] == {True, False}


def test_default_eval_tokens_are_proportionate():
    from jaxchat.run import NANOCHAT_EVAL_TOKENS, eval_tokens
    assert eval_tokens(-1, 524288, 30) == 3 * 524288  # a tenth of a 30-step run, not nanochat's 20 steps' worth
    assert eval_tokens(-1, 4096, 5) == 4096  # at least one step's worth
    assert eval_tokens(-1, 524288, 21400) == NANOCHAT_EVAL_TOKENS  # a real run: nanochat's
    assert eval_tokens(1234, 524288, 30) == 1234


@pytest.mark.slow
def test_resume_refuses_a_retrained_tokenizer(env):
    """A base run resumed after $JAXCHAT_BASE_DIR/tokenizer was retrained would read other token ids: refused."""
    from jaxchat.tokenizer import RustBPETokenizer
    base_train.main(TINY + ["--num_iterations=1", "--model_tag=tok_a", "--overwrite=1"])
    tok_dir = os.path.join(get_base_dir(), "tokenizer")
    shutil.copytree(tok_dir, tok_dir + ".orig")
    try:
        from jaxchat.corpus import iter_texts
        texts = [t[::-1] for t in iter_texts("train", max_chars=400_000)]  # the corpus backwards: other merges
        RustBPETokenizer.train_from_iterator(texts, 512).save(tok_dir)
        with pytest.raises(UserError, match="is not the one .*tok_a.* was trained with"):
            base_train.main(TINY + ["--num_iterations=1", "--model_tag=tok_a", "--resume=1"])
        _, tokenizer, _ = load_model("base", "tok_a")  # the checkpoint still brings its own
        assert tokenizer.fingerprint() != RustBPETokenizer.from_directory(tok_dir).fingerprint()
    finally:
        shutil.rmtree(tok_dir)
        os.rename(tok_dir + ".orig", tok_dir)


@pytest.mark.slow
def test_core_during_training(env, tmp_path, monkeypatch, capsys):
    """--core_metric_every: CORE at step 2 and at the end, in TensorBoard beside total_training_flops and
    total_training_time (time to a CORE score), and in the report; the last equals base_eval's on the saved model."""
    bundle = make_bundle(tmp_path / "bundle")
    flags = TINY + ["--num_iterations=4", "--core_metric_every=2", "--core_metric_max_per_task=8", "--save_every=2",
                    "--keep=3", f"--eval_bundle={bundle}"]
    out = base_train.main(flags + ["--model_tag=core", "--overwrite=1"])
    history = out["core_metric"]
    assert [h["step"] for h in history] == [2, 4]
    root = os.path.join(get_base_dir(), "base_checkpoints")  # stopped after step 2's save, then resumed
    shutil.copytree(os.path.join(root, "core"), os.path.join(root, "core_resumed"))
    shutil.rmtree(os.path.join(root, "core_resumed", "000004"))
    resumed = base_train.main(flags + ["--model_tag=core_resumed", "--resume=1"])
    same = lambda h: [(x["step"], x["CORE"], x["total_training_flops"]) for x in h]  # (times differ)
    assert same(resumed["core_metric"]) == same(history)  # the same history, step 2 not measured twice
    assert history[1]["total_training_flops"] == 2 * history[0]["total_training_flops"] > 0
    evaluated = base_eval.main(["--model_tag=core", "--eval=core", "--max_per_task=8", f"--eval_bundle={bundle}"])
    assert evaluated["core"]["core_metric"] == history[1]["CORE"]
    scalars = read_scalars(os.path.join(get_base_dir(), "runs", "base_core", "events.out.tfevents.*.base"))
    assert scalars["core_metric"] == pytest.approx({2: history[0]["CORE"], 4: history[1]["CORE"]})
    flops = scalars["total_training_flops"]
    assert sorted(flops) == [0, 1, 2, 3] and flops[3] == pytest.approx(4 * flops[0])
    assert sorted(scalars["total_training_time"]) == [0, 1, 2, 3]
    section = get_report().sections()["base-model-training"]["data"]
    assert section["CORE during training"] == history and section["iterations"] == 4
    # offline, without a bundle and with downloading off, training goes on without CORE, saying why
    out = base_train.main(TINY + ["--num_iterations=2", "--core_metric_every=1", "--download_bundle=0",
                                  "--model_tag=core", "--overwrite=1"])
    assert out["core_metric"] == []
    # ... and so it does when downloading is on but fails (nanochat's defaults, offline): CORE is a side measurement

    def offline(*args, **kwargs):
        raise DownloadError("could not download the CORE eval bundle: no network", {"eval_bundle.zip": "offline"})
    monkeypatch.setattr(core_eval, "get_eval_bundle", offline)
    capsys.readouterr()
    out = base_train.main(TINY + ["--num_iterations=1", "--core_metric_every=2000", "--model_tag=core",
                                  "--overwrite=1"])
    assert out["core_metric"] == [] and "CORE during training skipped: could not download" in capsys.readouterr().out

"""Several processes, one program: 2 processes × 4 CPU devices against 1 process × 8 (jax.distributed, gloo).

Same global batches, same losses: the two programs differ only in how their collectives reduce (in one process, or
across two through gloo), so losses agree to fp32 rounding (a few ulps), not bit for bit; TOL allows for that.
Checkpoints written by 2 processes resume on 1 and the reverse; a killed process stops its peer within the
distributed timeout, and the last good checkpoint resumes.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from _harness import ROOT, fresh_env, run_group
from jaxchat import dataset, tok_train
from test_core_eval import make_bundle

TOL = dict(rel=2e-5, abs=1e-6)
TINY = ["--depth=1", "--head_dim=32", "--max_seq_len=32", "--device_batch_size=2", "--total_batch_size=512",
        "--eval_every=2", "--eval_tokens=256", "--sample_every=-1", "--keep=5", "--core_metric_every=-1"]
BASE = TINY + ["--num_iterations=5", "--save_every=3"]
EVAL = ["--eval=core,bpb,sample", "--split_tokens=512", "--device_batch_size=2"]


def close(a, b):
    return a == pytest.approx(b, **TOL)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, module_monkeypatch):
    """Shards of the shipped corpus and a 512-token tokenizer."""
    d = tmp_path_factory.mktemp("multiprocess")
    module_monkeypatch.setenv("JAXCHAT_BASE_DIR", str(d))
    dataset.build_default_shards()
    tok_train.main(["--vocab-size=512", "--max-chars=400000"])
    (d / "words.txt").write_text("\n".join(["apple", "banana", "cherry", "grape", "lemon", "mango", "peach"]))
    return d


def cut_copy(base_dir, tag, new_tag, step):
    """A copy of a run's checkpoints without `step`: as if the run had been stopped before saving it."""
    root = base_dir / "base_checkpoints"
    shutil.copytree(root / tag, root / new_tag)
    shutil.rmtree(root / new_tag / f"{step:06d}")


@pytest.fixture(scope="module")
def runs(base_dir):
    """Base training (5 steps, saved at 3 and 5) and base_eval on 2×4 and on 1×8; then each run cut after step 3
    and resumed on the other layout."""
    evals = EVAL + [f"--eval_bundle={make_bundle(base_dir / 'core_bundle')}"]
    two = run_group([["base_train", BASE + ["--model_tag=two"]], ["base_eval", evals + ["--model_tag=two"]]],
                    base_dir, processes=2, devices=4)
    cut_copy(base_dir, "two", "two_then_one", 5)
    one = run_group([["base_train", BASE + ["--model_tag=one"]], ["base_eval", evals + ["--model_tag=one"]],
                     ["base_train", BASE + ["--model_tag=two_then_one", "--resume=1"]]],
                    base_dir, processes=1, devices=8)
    cut_copy(base_dir, "one", "one_then_two", 5)
    one_then_two = run_group([["base_train", BASE + ["--model_tag=one_then_two", "--resume=1"]]],
                             base_dir, processes=2, devices=4)
    return two, one, one_then_two


@pytest.mark.slow
def test_two_processes_train_as_one(runs):
    (a, eval_a), (b, eval_b, _), _ = runs
    assert sorted(a["losses"]) == sorted(b["losses"]) == ["0", "1", "2", "3", "4"]
    assert all(close(a["losses"][s], b["losses"][s]) for s in a["losses"]), (a["losses"], b["losses"])
    assert a["losses"]["4"] < a["losses"]["0"]  # it learns
    assert close(a["val_bpb"], b["val_bpb"])
    assert close(eval_a["train_bpb"], eval_b["train_bpb"]) and close(eval_a["val_bpb"], eval_b["val_bpb"])
    assert eval_a["samples"] == eval_b["samples"]  # greedy decoding: the same tokens
    assert eval_a["core"]["results"] == eval_b["core"]["results"] and close(eval_a["core"]["core_metric"],
                                                                            eval_b["core"]["core_metric"])


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(runs):
    (two, _), (one, _, two_then_one), (one_then_two,) = runs
    for resumed, straight in ((two_then_one, two), (one_then_two, one)):
        assert sorted(resumed["losses"]) == ["3", "4"]
        assert all(close(resumed["losses"][s], straight["losses"][s]) for s in ("3", "4")), (resumed, straight)
        assert close(resumed["val_bpb"], straight["val_bpb"])


@pytest.mark.slow
def test_chat_stages_on_two_processes(runs, base_dir):
    """One step each of mid, SFT and RL, then chat evals, from the same base model: the same numbers on 2×4."""
    tag = ["--model_tag=one", "--overwrite=1"]
    spec = [["mid_train", tag + ["--device_batch_size=2", "--total_batch_size=512", "--max_seq_len=32",
                                 "--num_iterations=1", "--eval_every=-1", "--eval_tokens=256"]],
            ["chat_sft", tag + ["--source=mid", "--device_batch_size=1", "--target_examples_per_step=8",
                                "--num_iterations=1", "--eval_every=-1", "--eval_steps=2", "--eval_metrics_every=-1"]],
            ["chat_rl", tag + ["--source=sft", "--device_batch_size=1", "--examples_per_step=4", "--num_samples=2",
                               "--max_new_tokens=8", "--num_iterations=1", "--eval_every=-1", "--eval_examples=4",
                               "--eval_samples=2"]],
            ["chat_eval", ["--source=rl", "--model_tag=one", "--task_name=Arithmetic|SpellingBee", "--max_problems=8",
                           "--max_new_tokens=8", "--batch_size=4"]]]
    words = {"JAXCHAT_WORD_LIST": str(base_dir / "words.txt")}
    one = run_group(spec, base_dir, processes=1, devices=8, extra_env=words)
    two = run_group(spec, base_dir, processes=2, devices=4, extra_env=words)
    for (a, b), keys in zip(zip(one, two), (("val_bpb",), ("val_loss",), ("pass@1",))):
        assert all(close(a[k], b[k]) for k in keys), (a, b)
    assert close(one[0]["losses"]["0"], two[0]["losses"]["0"]) and close(one[1]["losses"]["0"], two[1]["losses"]["0"])
    assert one[2]["rewards"] == two[2]["rewards"]  # the same samples, so the same rewards
    assert one[3] == two[3]


def wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_process_stops_its_peer_and_the_run_resumes(base_dir, tmp_path):
    """SIGKILL one of two processes mid-run: the other exits non-zero within the distributed timeout (it never
    hangs), and the newest complete checkpoint resumes on one process."""
    import json
    flags = TINY + ["--num_iterations=30", "--save_every=2", "--model_tag=killed", "--overwrite=1"]
    command = [sys.executable, os.path.join(ROOT, "tests", "_harness.py"), str(tmp_path / "out.json"),
               json.dumps([["base_train", flags]])]
    env = fresh_env(4, 2, base_dir, JAXCHAT_DISTRIBUTED_TIMEOUT=10)
    procs = [subprocess.Popen(command, env={**env, "JAXCHAT_PROCESS_ID": str(i)}, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        step2 = base_dir / "base_checkpoints" / "killed" / "000002"
        wait_for(step2.is_dir, 240, "the step-2 checkpoint")
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rc = procs[0].wait(timeout=60)
        stopped_after = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert rc != 0 and stopped_after < 10 + 15, (rc, stopped_after)
    (resumed,) = run_group([["base_train", flags[:-1] + ["--resume=1"]]], base_dir, processes=1, devices=8)
    first = min(int(s) for s in resumed["losses"])
    assert first >= 2 and first % 2 == 0 and max(int(s) for s in resumed["losses"]) == 29


@pytest.mark.slow
def test_local_launcher_runs_the_pipeline(tmp_path):
    """`launch/local.sh 2 python -m jaxchat.launch --config=tiny ...`: process 0 prepares the data and trains the
    tokenizer while the other waits, then both train and evaluate; one writer for every file."""
    flags = ["--config=tiny", "--stages=data,tok_train,base_train,base_eval", "--vocab_size=512",
             "--max_chars=300000", "--depth=1", "--head_dim=32", "--max_seq_len=32", "--device_batch_size=2",
             "--total_batch_size=256", "--num_iterations=4", "--eval_every=2", "--eval_tokens=256",
             "--sample_every=-1", "--save_every=2", "--split_tokens=256", "--model_tag=tinyrun"]
    env = fresh_env(2, 2, tmp_path)
    done = subprocess.run([os.path.join(ROOT, "launch", "local.sh"), "2", sys.executable, "-m", "jaxchat.launch",
                           *flags], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "cpu × 4 (cpu) on 2 processes" in done.stdout and done.stdout.count("=== base_train done") == 1
    assert set(os.listdir(tmp_path / "base_checkpoints" / "tinyrun")) == {"000002", "000004", ".lock",
                                                                          "tokenizer"}
    assert len(os.listdir(tmp_path / "runs" / "base_tinyrun")) == 1  # one TensorBoard event file: process 0's
    assert os.path.exists(tmp_path / "base_eval" / "tinyrun_000004.json")
    report = (tmp_path / "report.md").read_text()  # written by process 0, with what every process ran on
    assert "- devices: 4 × cpu (cpu, 2 processes)" in report and "cpu × 4 (cpu) on 2 processes" in report
    assert "## Base model training" in report and "## Base model evaluation" in report


def test_start_up_settings(monkeypatch):
    """No settings: one process, argv untouched; incomplete settings: one clear error before JAX starts."""
    from jaxchat import distributed
    from jaxchat.common import UserError
    for key in ("JAXCHAT_COORDINATOR", "JAXCHAT_NUM_PROCESSES", "JAXCHAT_PROCESS_ID", "SLURM_PROCID",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.initialize(["--depth=4", "--num_processes=1"]) == ["--depth=4"]
    assert distributed.process_count() == 1 and distributed.is_writer()
    with pytest.raises(UserError, match="process_id in 0..N-1"):
        distributed.initialize(["--coordinator=127.0.0.1:1234", "--num_processes=2"])
    monkeypatch.setenv("JAXCHAT_NUM_PROCESSES", "2")
    with pytest.raises(UserError, match="coordinator ''"):
        distributed.initialize([])
    monkeypatch.delenv("JAXCHAT_NUM_PROCESSES")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert distributed._cluster_started_several()  # several SLURM tasks: JAX's detection
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert not distributed._cluster_started_several()

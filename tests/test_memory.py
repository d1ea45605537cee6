"""jaxchat.memory: its compiled figure against what a CPU run allocates, its estimate's parts, the CLI."""
import json
import os

import pytest

from _harness import run_python

pytestmark = pytest.mark.slow  # each test compiles a train step or starts a process


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("batch", [4, 16])
def test_compiled_figure_matches_what_the_cpu_run_allocates(batch):
    out = run_python(["tests/_memory_probe.py", "4", str(batch)], MALLOC_MMAP_THRESHOLD_="65536")
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["predicted"] > 100e6  # large enough that allocator noise does not decide the test
    assert abs(r["grown"] - r["predicted"]) < 0.1 * r["predicted"], r


def test_cli_reports_and_judges_the_fit():
    out = run_python(["-m", "jaxchat.memory", "--config=tiny", "--devices=2", "--vocab_size=4096", "--fits=a100-40",
               "--total_batch_size=8192"])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {l.split("  ")[1].strip(): l for l in out.stdout.splitlines() if l.startswith("  ") and "GiB" in l}
    assert "mesh {'data': 1, 'fsdp': 2} | device batch 16 × 256 tokens" in out.stdout
    assert "fits A100 40GB" in out.stdout and "NOT" not in out.stdout
    assert {"parameters", "optimizer state", "peak of the XLA:CPU program", "accelerator estimate"} <= set(lines)


def test_cli_bad_flag_is_one_line():
    out = run_python(["-m", "jaxchat.memory", "--config=tiny", "--devices=2", "--remat=sometimes"])
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        "error: base_train.remat='sometimes': expected one of none, block, matmuls, attention"]


def test_remat_shrinks_the_saved_activations():
    from jaxchat.memory import saved_activations
    from jaxchat.model import config_for_depth
    saved = {remat: saved_activations(config_for_depth(4, 4096, 256, head_dim=64, compute_dtype="bfloat16",
                                                       remat=remat), 4) for remat in ("none", "attention", "block")}
    # "block" keeps each block's fp32 input only: 4 blocks × 4 rows × 256 × 256 × 4 bytes, plus what the loss keeps
    assert saved["block"] < saved["attention"] < saved["none"], saved

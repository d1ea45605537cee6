"""bench/gpu_check.py at toy sizes on CPU: every part runs in its own process and reports real figures."""
import json
import math

import pytest

from _harness import run_python

pytestmark = pytest.mark.slow  # runs bench/gpu_check.py's parts in processes of their own


def test_gpu_check_toy(tmp_path):
    out = tmp_path / "check.json"
    proc = run_python(["bench/gpu_check.py", "--toy", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert set(parts) == {"attention", "train_2", "train_4", "train_8", "train_xla_4", "decode_1", "decode_4",
                          "predict_8"}
    assert not [k for k, v in parts.items() if "error" in v or "skipped" in v]
    for case in parts["attention"]:  # jaxchat's kernel (no cuDNN on CPU) against the fp32 reference
        assert case["impl"] == "xla" and case["ok"] and not case["fused_cudnn_call"], case
        assert max(case["max_rel_error"].values()) < 2e-2
    for key in ("train_2", "train_4", "train_8", "train_xla_4"):
        r = parts[key]
        assert r["accum"] * r["device_batch_size"] * report["size"]["seq"] == report["size"]["tokens"]
        assert r["tok_s"] > 0 and r["xla_program_peak_bytes"] > 0
        assert 0 < r["loss"] < math.log(report["size"]["vocab"]), r  # four steps of learning random tokens
    # the same step with either attention kernel: cuDNN is unavailable here, so "auto" is the XLA kernel
    assert parts["train_4"]["loss"] == parts["train_xla_4"]["loss"]
    # on CPU the prediction and the run use the same compiler and device kind: the same program, the same peak
    assert parts["predict_8"]["target"] == "cpu"
    assert parts["predict_8"]["peak_bytes"] == parts["train_8"]["xla_program_peak_bytes"], parts
    for key, batch in (("decode_1", 1), ("decode_4", 4)):
        assert parts[key]["batch"] == batch and parts[key]["steps"] == report["size"]["new_tokens"]

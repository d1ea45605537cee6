"""The report card from fixture results: section order, the summary table (skipped tasks, stages that did not run),
wall time and cost, plots from TensorBoard events (a resumed run's repeated steps), and the command line."""
import datetime
import json
import os
import time

import pytest

from jaxchat import report
from jaxchat.common import UserError
from jaxchat.report_card import Report, get_report, hourly_rate, read_scalars
from jaxchat.run import SummaryWriter


def curves(logdir, steps, fresh=True, stage="base"):
    """A training stage's curves; returns the pattern of its event files."""
    writer = SummaryWriter(logdir, stage, fresh=fresh)
    for s in steps:
        writer.scalars(s, {"train/loss": 5.0 - s, "train/lrm": 1.0, "train/tok_per_sec": 1000.0})
    writer.scalars(steps[-1], {"val/bpb": 2.5})
    writer.close()
    return writer.files


def backdate_header(rep, seconds):
    """Move the header's start `seconds` before now, so that the wall time is known."""
    path = os.path.join(rep.dir, "header.json")
    header = json.load(open(path))
    start = datetime.datetime.now() - datetime.timedelta(seconds=seconds)
    header["timestamp"] = start.isoformat(timespec="seconds")
    json.dump(header, open(path, "w"))


def fixture_run(tmp_path):
    rep = Report(str(tmp_path / "report"))
    rep.reset("tiny", ["python -m jaxchat.base_train --depth=4"], ["--depth=4"])
    files = curves(str(tmp_path / "runs" / "base_x"), [0, 1, 2, 3])
    # logged out of pipeline order: generate puts them back in it
    rep.log("Chat evaluation rl", {"model": "rl x step 3", "results": {"Arithmetic": 0.5, "SpellingBee": 0.25},
                                   "skipped": {"ARC-Easy": "offline", "HumanEval": "no sandbox"}, "ChatCORE": None})
    rep.log("Chat evaluation sft", {"model": "sft x step 3", "results": {"Arithmetic": 0.125, "HumanEval": 0.0},
                                    "skipped": {"ARC-Easy": "offline"}, "ChatCORE": None})
    settings = {"depth": 4, "model_tag": "x", **{f"flag{i}": i for i in range(7)}}
    rep.log("Base model training", {"settings": settings, "devices": "cpu × 1 (cpu), mesh {'data': 1}",
                                    "min val bpb": 2.5, "CORE during training": [{"step": 3, "CORE": 0.01}],
                                    "tok/s": 12345.678, "MFU %": None, "total training FLOPs": 2.3e13,
                                    "tensorboard": files})
    rep.log("Tokenizer training", {"vocab_size": 4096, "train_time": 0.1})
    rep.log("Base model evaluation", {"model": "base x step 3", "CORE skipped": "no bundle",
                                      "samples": "To be, or not\nThe capital of"})
    return rep


def test_report_from_fixture_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rep = fixture_run(tmp_path)
    backdate_header(rep, 2 * 3600 + 30 * 60)
    path, summary = rep.generate(hourly_rate=3.0)
    text = open(path).read()
    # the copy in the working directory, its plot links pointing back to the report's directory
    assert open(tmp_path / "report.md").read() == text.replace(
        "](base-model-training.png)", f"]({os.path.join(rep.dir, 'base-model-training.png')})")
    # header, then the sections in pipeline order, then the summary
    order = [text.index(h) for h in ("# jaxchat training report", "## Environment", "## Tokenizer training",
                                     "## Base model training", "## Base model evaluation", "## Chat evaluation sft",
                                     "## Chat evaluation rl", "## Summary")]
    assert order == sorted(order)
    assert "- config: tiny\n- overrides: --depth=4" in text and "python -m jaxchat.base_train --depth=4" in text
    assert "- mesh: cpu × 1 (cpu), mesh {'data': 1}" in text
    assert "| step | CORE |\n|---|---|\n| 3 | 0.0100 |" in text  # a list of rows is a table
    assert "```\nTo be, or not\nThe capital of\n```" in text
    assert "- settings: depth=4, model_tag=x, flag0=0, flag1=1, flag2=2" in text  # many flags: one line
    assert "- tok/s: 12,346\n- MFU %: n/a\n- total training FLOPs: 2.3e+13" in text
    # the summary: numbers where a task ran, "skipped" where it could not, "-" where the stage did not run
    rows = {line.split(" | ")[0][2:]: line for line in summary.splitlines() if line.startswith("| ")}
    assert rows["CORE"] == "| CORE | skipped | - | - | - |"
    assert rows["ARC-Easy"] == "| ARC-Easy | - | - | skipped | skipped |"
    assert rows["HumanEval"] == "| HumanEval | - | - | 0.0000 | skipped |"
    assert rows["SpellingBee"] == "| SpellingBee | - | - | - | 0.2500 |"
    assert rows["Arithmetic"] == "| Arithmetic | - | - | 0.1250 | 0.5000 |"  # an offline task that ran
    assert rows["MMLU"] == "| MMLU | - | - | - | - |"
    assert rows["ChatCORE"] == "| ChatCORE | - | - | skipped | skipped |"  # not computable: tasks were skipped
    assert list(rows)[-1] == "ChatCORE" and list(rows)[1] == "CORE"  # after the header row
    assert "Total wall clock time: 2h30m (9,000 s, from Run started to the last section)" in summary
    assert "Cost: $7.50 (1 × cpu at $3.00 per device-hour, --gpu_hourly_rate)" in summary
    # the curves of the training stage, beside the report and linked from it
    assert "![Base model training](base-model-training.png)" in text
    with open(os.path.join(rep.dir, "base-model-training.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # on a CPU the default rate is $0
    assert "Cost: $0.00 (1 × cpu at $0.00 per device-hour, default for cpu)" in rep.generate()[1]


def test_missing_stages_and_no_header(tmp_path, monkeypatch):
    """Stages run alone, no reset: the report still renders, from what they logged, with their own wall times."""
    monkeypatch.chdir(tmp_path)
    rep = Report(str(tmp_path / "report"))
    rep.log("Midtraining", {"iterations": 60, "wall time (s)": 3700.0, "tensorboard": str(tmp_path / "none")})
    path, summary = rep.generate()
    text = open(path).read()
    assert "no header" in text and "## Midtraining" in text and "Cost" not in summary
    assert "Total wall clock time: 1h1m (3,700 s, the training stages' own wall times, summed)" in summary
    assert "| CORE | - | - | - | - |" in summary and "| GSM8K | - | - | - | - |" in summary
    assert "![" not in text  # no curves, no plot
    rep.reset()  # a new run forgets the old sections
    assert rep.sections() == {} and rep.header()["config"] is None


def test_damaged_section_is_one_clear_error(tmp_path):
    rep = Report(str(tmp_path / "report"))
    rep.log("Chat SFT", {"iterations": 3})
    with open(os.path.join(rep.dir, "chat-sft.json"), "w") as f:
        f.write('{"title": "Chat SFT", "timest')  # cut short
    with pytest.raises(UserError, match=r"report file .*chat-sft.json is unreadable .*rerun its stage, or delete it"):
        rep.generate(copy_to=None)
    with open(os.path.join(rep.dir, "chat-sft.json"), "w") as f:
        json.dump(["not", "a", "record"], f)
    with pytest.raises(UserError, match="is not a report record"):
        rep.sections()
    os.remove(os.path.join(rep.dir, "chat-sft.json"))
    rep.reset("tiny")
    header = json.load(open(os.path.join(rep.dir, "header.json")))
    del header["commands"]  # a header from elsewhere
    json.dump(header, open(os.path.join(rep.dir, "header.json"), "w"))
    with pytest.raises(UserError, match="header.json is not a report record .*commands"):
        rep.generate(copy_to=None)
    with pytest.raises(TypeError, match="data must be a dict"):
        rep.log("Chat SFT", [1, 2])

def test_hourly_rates_by_device_kind():
    hw = lambda backend, kind: {"backend": backend, "device_kind": kind}
    assert hourly_rate(hw("gpu", "NVIDIA H100 80GB HBM3")) == (3.0, "default for NVIDIA H100 80GB HBM3")
    assert hourly_rate(hw("gpu", "NVIDIA A100-SXM4-80GB"))[0] == 1.79
    assert hourly_rate(hw("tpu", "TPU v5 lite")) == (2.0, "no price known for TPU v5 lite: the $2.00 fallback")
    assert hourly_rate(hw("cpu", "cpu"))[0] == 0.0
    assert hourly_rate(hw("cpu", "cpu"), 1.25) == (1.25, "--gpu_hourly_rate")


def test_resumed_curves_keep_the_last_value_per_step(tmp_path):
    """A resumed run writes a second event file that repeats the steps after its checkpoint: the plot follows the
    resumed run. A fresh run on the same TensorBoard run replaces the old curves."""
    logdir = str(tmp_path / "run")
    files = curves(logdir, [0, 1, 2, 3])
    time.sleep(1.1)  # event file names carry the second they were created: the resumed run's sorts after
    writer = SummaryWriter(logdir, "base")  # resumed from step 2
    writer.scalars(2, {"train/loss": 9.0})
    writer.close()
    assert read_scalars(files)["train/loss"] == {0: 5.0, 1: 4.0, 2: 9.0, 3: 2.0}
    mid = curves(logdir, [0], stage="mid")  # another stage in the same TensorBoard run (--run=NAME) ...
    curves(logdir, [0, 1])  # ... is not touched when this stage starts afresh
    assert read_scalars(files)["train/loss"] == {0: 5.0, 1: 4.0}
    assert read_scalars(mid)["train/loss"] == {0: 5.0}


def test_report_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    report.main(["reset"])
    rep = get_report()
    assert rep.header()["config"] is None and rep.header()["hardware"]["device_count"] >= 1
    rep.log("Chat evaluation mid", {"results": {"SpellingBee": 0.75}, "skipped": {}, "ChatCORE": None})
    report.main(["generate", "--gpu_hourly_rate=2"])
    out = capsys.readouterr().out
    assert "| SpellingBee | - | 0.7500 | - | - |" in out and "report written to" in out
    assert os.path.exists(tmp_path / "report.md")
    with pytest.raises(SystemExit):
        report.main(["publish"])

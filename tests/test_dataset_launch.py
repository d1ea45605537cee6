"""Text data (default shards, bring-your-own formats, errors) and the launcher's config/override handling."""
import argparse
import gzip
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jaxchat import base_train, corpus, dataset, launch, pipeline
from jaxchat.common import UserError


def test_default_shards_deterministic(tmp_path):
    files = dataset.build_default_shards(tmp_path / "a")
    again = dataset.build_default_shards(tmp_path / "b")
    assert [os.path.basename(f) for f in files] == ["shard_00000.parquet", "shard_00001.parquet",
                                                    "shard_00002.parquet", "shard_00003.parquet"]
    for f, g in zip(files, again):
        assert pq.read_table(f).column("text").to_pylist() == pq.read_table(g).column("text").to_pylist()
    meta = pq.ParquetFile(files[0]).metadata
    assert meta.row_group(0).num_rows == 600 and pq.ParquetFile(files[0]).schema_arrow.names == ["text"]
    val = list(corpus.iter_texts("val", tmp_path / "a"))
    train = list(corpus.iter_texts("train", tmp_path / "a"))
    assert len(val) == 96 and len(train) == 1713 - 96 and not set(val) & set(train)
    with gzip.open(corpus.DEFAULT_CORPUS, "rt") as f:
        shipped = {json.loads(line)["text"] for line in f}
    assert set(val) | set(train) == shipped


def test_bring_your_own_formats(tmp_path):
    d = tmp_path / "byo"
    d.mkdir()
    corpus.write_shard(str(d / "a.parquet"), ["doc one", "doc two"])
    (d / "b.jsonl").write_text(json.dumps({"text": "doc three"}) + "\n\n" + json.dumps({"text": "doc four"}) + "\n")
    (d / "c.txt").write_text("para one\n\n\npara two\n")
    (d / "ignored.csv").write_text("x")
    assert list(corpus.iter_texts("train", d)) == ["doc one", "doc two", "doc three", "doc four"]
    assert list(corpus.iter_texts("val", d)) == ["para one\n\npara two"]
    assert list(corpus.iter_texts("train", d, max_chars=10, doc_cap=3)) == ["doc", "doc", "doc", "doc"]


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        corpus.list_data_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no data files"):
        corpus.list_data_files(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shard_00000.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match="shard_00000.parquet"):
        list(corpus.iter_texts("train", bad))
    (bad / "shard_00000.parquet").unlink()
    (bad / "x.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(UserError, match="x.jsonl:2"):
        list(corpus.iter_texts("train", bad))


def test_launch_overrides_are_checked():
    config = pipeline.load_config("tiny")
    assert config["stages"][:3] == ["data", "tok_train", "tok_eval"]
    overrides = pipeline.parse_overrides(["--vocab-size=512", "--tok_eval.compare="], config)
    assert overrides["tok_train"] == {"vocab_size": 512} and overrides["tok_eval"] == {"compare": ""}
    with pytest.raises(UserError, match="unknown key 'vocab_sise'; valid keys: .*vocab_size"):
        pipeline.parse_overrides(["--vocab_sise=512"], config)
    with pytest.raises(UserError, match="expected int"):
        pipeline.stage_argv("tok_train", {"vocab_size": "lots"})
    with pytest.raises(UserError, match="expected one of float32, bfloat16"):
        pipeline.stage_argv("base_train", {"dtype": "bf16"})
    with pytest.raises(UserError, match="expected int"):
        pipeline.stage_argv("base_train", {"depth": 20.5})
    with pytest.raises(UserError, match="known configs: .*tiny"):
        pipeline.load_config("no_such_config")


def test_launch_checks_every_value_type_before_any_stage(tmp_path, capsys):
    # the converted value goes on to the stage, not the raw string or TOML value
    config = {"stages": ["base_train"]}
    assert pipeline.parse_overrides(["--depth= 6", "--embedding_lr=2e-1"], config)["base_train"] == \
        {"depth": 6, "embedding_lr": 0.2}
    assert pipeline.stage_argv("base_train", {"depth": 6, "matrix_lr": 1, "embedding_lr": 0.2, "model_tag": "d6"}) \
        == ["--depth=6", "--matrix-lr=1.0", "--embedding-lr=0.2", "--model-tag=d6"]
    wrong = [("num_iterations", True, "base_train.num_iterations=true: expected int: write 1 or 0"),
             ("matrix_lr", False, "base_train.matrix_lr=false: expected float"),
             ("model_tag", True, "base_train.model_tag=true: expected str"),
             ("model_tag", 20, r"base_train.model_tag=20: expected str \(in quotes\)"),
             ("depth", 4.0, "base_train.depth=4.0: expected int"),
             ("depth", [4], r"base_train.depth=\[4\]: expected int"),
             ("matrix_lr", {"lr": 0.02}, "base_train.matrix_lr={'lr': 0.02}: expected float"),
             ("matrix_lr", "fast", "base_train.matrix_lr='fast': expected float")]
    for key, value, message in wrong:
        with pytest.raises(UserError, match=message):
            pipeline.stage_argv("base_train", {key: value})
    # in a config or on the command line: refused before the first stage runs
    bad = tmp_path / "bad.toml"
    bad.write_text('stages = ["data", "tok_train"]\n[tok_train]\nvocab_size = true\n')
    with pytest.raises(UserError, match="tok_train.vocab_size=true: expected int: write 1 or 0"):
        launch.main([f"--config={bad}"])
    with pytest.raises(UserError, match="tok_train.max_chars='lots': expected int"):
        launch.main([f"--config={bad}", "--tok_train.vocab_size=300", "--max_chars=lots"])
    assert "===" not in capsys.readouterr().out
    bad.write_text('stages = ["data"]\ndata = 3\n')
    with pytest.raises(UserError, match=r"data must be a table of flags \(\[data\]\)"):
        pipeline.load_config(str(bad))


def test_launch_refuses_quoted_numbers_and_values_out_of_range(tmp_path, capsys):
    """Before: `num_iterations = -5` meant the default horizon (25,600 steps for tiny), `device_batch_size = 0` was
    a ZeroDivisionError, `depth = "2"` was read as 2. Now each is one line, before any stage runs; -1 (nanochat's
    "unset") is still the default horizon."""
    cfg = tmp_path / "c.toml"
    refused = {'num_iterations = -5': "base_train.num_iterations=-5: must be ≥ 1, or -1; got -5",
               'device_batch_size = 0': "base_train.device_batch_size=0: must be ≥ 1; got 0",
               'depth = "2"': "base_train.depth='2': expected int, a TOML number: write it without quotes",
               'matrix_lr = "0.02"': "base_train.matrix_lr='0.02': expected float, a TOML number: write it without "
                                     "quotes",
               'matrix_lr = nan': "base_train.matrix_lr=nan: must be ≥ 0; got nan",
               'warmdown_ratio = 1.5': "base_train.warmdown_ratio=1.5: must be ≥ 0 and ≤ 1; got 1.5",
               'eval_every = 0': "base_train.eval_every=0: must be ≥ 1, or -1; got 0",
               'resume = 2': "base_train.resume=2: expected one of 0, 1"}
    for line, message in refused.items():
        cfg.write_text(f'stages = ["data", "base_train"]\n[base_train]\n{line}\n')
        with pytest.raises(UserError) as e:
            launch.main([f"--config={cfg}"])
        assert str(e.value) == message
    assert "===" not in capsys.readouterr().out  # nothing ran
    config = {"stages": ["base_train"]}
    for arg, message in [("--num_iterations=-5", "must be ≥ 1, or -1; got -5"),
                         ("--base_train.device_batch_size=0", "must be ≥ 1; got 0"),
                         ("--seed=1099511627776", "must be ≥ 0 and ≤ 2147483647")]:  # 2**40: JAX would use seed 0
        with pytest.raises(UserError, match=message):
            pipeline.parse_overrides([arg], config)
    assert pipeline.stage_argv("base_train", {"num_iterations": -1, "target_flops": -1}) == \
        ["--num-iterations=-1", "--target-flops=-1.0"]


def test_every_numeric_flag_of_every_stage_has_a_range(capsys):
    """One rule for all stages (common.number): no numeric flag takes any int or float; each refuses a negative
    other than nanochat's -1 (where -1 means "unset") and NaN, with argparse's one error line."""
    from jaxchat import chat_cli
    parsers = {stage: pipeline.stage_flags(stage) for stage in pipeline.STAGES}
    parsers["chat_cli"] = {a.dest: a for a in chat_cli.build_parser()._actions if a.option_strings and a.dest != "help"}
    checked = 0
    for stage, flags in parsers.items():
        for key, action in flags.items():
            if action.type in (int, float):
                assert action.choices == (0, 1), f"{stage}.{key} takes any {action.type.__name__}"
                continue
            if not hasattr(action.type, "kind"):
                assert action.type is None, f"{stage}.{key}"  # a string
                continue
            for bad in ("-5", "nan") if action.type.kind is float else ("-5",):
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(bad)
            checked += 1
    assert checked >= 70, checked
    for name in ("tiny", "d4", "d20", "d26", "d32"):  # the shipped configs keep to the ranges
        config = pipeline.load_config(name)
        for stage in config["stages"]:
            pipeline.stage_argv(stage, config.get(stage, {}))  # raises on a value out of range
    with pytest.raises(SystemExit) as e:
        base_train.build_parser().parse_args(["--device_batch_size=0"])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --device-batch-size/--device_batch_size: must be ≥ 1; got 0")


def test_a_horizon_of_no_step_is_refused():
    """-1 leaves the horizon to target_flops or target_param_data_ratio; one that rounds to 0 steps would end the
    run before it began (after saving an untrained model), so it is refused."""
    args = argparse.Namespace(num_iterations=-1, target_flops=-1, target_param_data_ratio=20, total_batch_size=4096)
    assert base_train.horizon(args, num_params=10_000, flops_per_token=6e4) == 20 * 10_000 // 4096
    with pytest.raises(UserError, match="target_param_data_ratio=20 is less than one step of 4,096 tokens"):
        base_train.horizon(args, num_params=100, flops_per_token=600)
    with pytest.raises(UserError, match="target_flops=1e\\+06 is less than one step"):
        base_train.horizon(argparse.Namespace(**{**vars(args), "target_flops": 1e6}), 100, 600)
    assert base_train.horizon(argparse.Namespace(**{**vars(args), "num_iterations": 3}), 100, 600) == 3


@pytest.mark.slow
def test_a_stage_refuses_a_bad_flag_without_a_traceback():
    r = subprocess.run([sys.executable, "-m", "jaxchat.base_train", "--num_iterations=-5"], capture_output=True,
                       text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1].endswith(
        "error: argument --num-iterations/--num_iterations: must be ≥ 1, or -1; got -5")


def test_launch_runs_only_chosen_stages(tmp_path, capsys):
    launch.main(["--config=tiny", "--stages=data"])
    out = capsys.readouterr().out
    assert "=== data" in out and "=== tok_train" not in out
    only_data = tmp_path / "only_data.toml"
    only_data.write_text('stages = ["data"]\n')
    with pytest.raises(UserError, match="not in config .*only_data"):
        launch.main([f"--config={only_data}", "--stages=tok_train"])


@pytest.mark.slow
def test_launch_cli_error_is_one_line():
    r = subprocess.run([sys.executable, "-m", "jaxchat.launch", "--config=tiny", "--depht=3"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "unknown key 'depht'" in r.stderr


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, capsys):
    """data -> tok_train -> tok_eval through the launcher, on the shipped corpus, with a small vocab."""
    cfg = tmp_path / "mini.toml"
    cfg.write_text('stages = ["data", "tok_train", "tok_eval"]\n[tok_train]\nvocab_size = 777\nmax_chars = 300_000\n'
                   '[tok_eval]\ncompare = ""\n')
    launch.main([f"--config={cfg}"])
    out = capsys.readouterr().out
    from jaxchat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    assert tok.get_vocab_size() == 777
    assert "data-val" in out and "news" in out and "token bytes" in out
    text = "To be, or not to be, that is the question."
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) < len(text.encode()) / 2


def test_data_stage_uses_your_own_directory(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "a.txt").write_text("one\n\ntwo\n")
    (d / "b.txt").write_text("three\n")
    dataset.main([f"--data-dir={d}"])
    assert "using the 2 data files in" in capsys.readouterr().out
    assert sorted(os.listdir(d)) == ["a.txt", "b.txt"]  # nothing written into the user's directory


CACHE_PROBE = """
import os, jax, jax.numpy as jnp
from jaxchat.distributed import run_main
def main(argv):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even this small program
    print(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(8.0)).sum())
    print("cache:", jax.config.jax_compilation_cache_dir)
run_main(main)
"""


@pytest.mark.slow
def test_stage_entry_points_keep_compiled_programs(tmp_path):
    """run_main points XLA's persistent compilation cache at $JAXCHAT_BASE_DIR/xla_cache (a re-run loads instead of
    compiling); JAX_COMPILATION_CACHE_DIR wins, and JAXCHAT_XLA_CACHE=0 turns it off."""
    def probe(**env):
        env = {**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
               "JAXCHAT_BASE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu", **env}
        out = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, check=True)
        return out.stdout.splitlines()[-1].removeprefix("cache: ")

    cache = tmp_path / "xla_cache"
    assert probe() == str(cache) and any(cache.iterdir())  # the compiled program was written there
    written = sorted(p.name for p in cache.iterdir())
    assert probe() == str(cache) and sorted(p.name for p in cache.iterdir()) == written  # loaded, not added again
    assert probe(JAXCHAT_XLA_CACHE="0") in ("", "None")
    assert probe(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine")) == str(tmp_path / "mine")

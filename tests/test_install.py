"""A plain (non-editable) install works from any directory: the wheel ships the configs and the data files, and
`python -m jaxchat.launch --config=tiny` finds them inside the installed package, not in a checkout.

Offline: the wheel is built without build isolation (maturin comes with the `test` extra, and cargo reuses the
release build of the editable install), and the fresh venv borrows this venv's dependencies through a .pth file
instead of downloading jax and the rest again."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from jaxchat.tokenizer import META_FILE, RANKS_FILE, TOKEN_BYTES_FILE

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(cmd, **kwargs):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kwargs)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_from_another_directory(tmp_path):
    assert importlib.util.find_spec("maturin"), "maturin (the build backend) is missing: pip install -e '.[test]'"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing may point back at the checkout
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", dist], env={**env, "CARGO_NET_OFFLINE": "true"})
    wheel, = dist.glob("jaxchat-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"jaxchat/configs/{f}" for f in os.listdir(REPO / "jaxchat" / "configs")}
    shipped |= {"jaxchat/data/default_corpus.jsonl.gz", "jaxchat/data/identity_conversations.jsonl"}
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    assert any(n.startswith("jaxchat/rustbpe.") for n in names)  # the compiled BPE trainer

    fresh = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", fresh])
    python = fresh / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], env=env)
    # Only now lend it this venv's packages (pip above must not see, or touch, the editable jaxchat in there). A
    # directory named in a .pth file is appended after the fresh site-packages, and the .pth files inside it are not
    # read, so the editable install's own .pth (pointing at the checkout) stays out of the fresh sys.path.
    site = pathlib.Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))

    elsewhere = tmp_path / "elsewhere"  # an empty working directory: no checkout, no configs/
    elsewhere.mkdir()
    base = tmp_path / "base"
    env = {**env, "JAXCHAT_BASE_DIR": str(base), "JAX_PLATFORMS": "cpu"}
    where = run([python, "-c", "import jaxchat; print(jaxchat.__file__)"], cwd=elsewhere, env=env).strip()
    assert pathlib.Path(where).is_relative_to(site), f"jaxchat imported from {where}, not the installed wheel"
    out = run([python, "-m", "jaxchat.launch", "--config=tiny", "--stages=data,tok_train", "--vocab_size=300",
               "--max_chars=200000"], cwd=elsewhere, env=env)
    assert "pipeline tiny done" in out
    report = (elsewhere / "report.md").read_text()  # the report card, from an installed package: no git checkout
    assert "- commit: not a git checkout" in report and "## Tokenizer training" in report
    assert {f"shard_{i:05d}.parquet" for i in range(4)} <= set(os.listdir(base / "base_data"))
    assert {RANKS_FILE, META_FILE, TOKEN_BYTES_FILE} <= set(os.listdir(base / "tokenizer"))
    assert json.loads((base / "tokenizer" / META_FILE).read_text())["vocab_size"] == 300

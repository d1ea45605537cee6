import os
import tempfile

import pytest

# huggingface_hub reads its cache location once, when first imported (test modules import it while being
# collected, before any fixture runs): point it at a fresh directory now, so no test reads or writes the user's
# ~/.cache/huggingface. Tests of the Hub set their own through tests/_hub.py.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="jaxchat-tests-hf-")
# The tests run on the CPU. With libtpu or a CUDA plugin installed (to compile for TPUs and GPUs), JAX would first
# try to start those backends, slowly and noisily, on a machine that has neither.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def _isolated_base_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own JAXCHAT_BASE_DIR and working directory, so nothing reads or writes the user's
    ~/.cache/jaxchat or the checkout."""
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path_factory.mktemp("base_dir")))
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # what a stage writes to the working directory (report.md)
    # tiktoken must never try the network in tests
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.join(os.environ["JAXCHAT_BASE_DIR"], "tiktoken"))


@pytest.fixture(scope="module")
def module_monkeypatch():
    """`monkeypatch` for a module's shared fixtures (a base dir they build): undone when the module's tests end."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def boundary_or_skip():
    """Skip where this system cannot give the kernel sandbox (CI sets JAXCHAT_TEST_REQUIRE_SANDBOX=1: it must)."""
    from jaxchat.execution import boundary_problem
    why = boundary_problem()
    if why and not os.environ.get("JAXCHAT_TEST_REQUIRE_SANDBOX"):
        pytest.skip(f"no kernel sandbox here: {why}")


@pytest.fixture(params=["boundary", "weak"])
def sandbox(request):
    """Each execution test runs in both sandboxes: they share every behaviour but the isolation."""
    if request.param == "boundary":
        boundary_or_skip()
    return request.param
